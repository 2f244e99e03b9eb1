"""The launcher's rank, without torch: the log reads it at every line, and a command reads it
before (and after) the process group exists."""

from __future__ import annotations

import os


def launch_rank() -> int:
    """This process's rank as torchrun (or the DeepSpeed launcher) set it in ``RANK``: 0 when
    not launched so, or when the variable is not a number (the log must never fail on it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
