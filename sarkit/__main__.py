"""`python -m sarkit` (what torchrun and the deepspeed launcher run)."""

from sarkit.cli import main

if __name__ == "__main__":
    main()
