"""The `sarkit` command line: parse, load plugins, call the stage, report. Nothing else.

Conventions every command follows: stdout carries records only; progress and logs go to
stderr; ``--quiet`` and ``--debug`` work anywhere on the line; exit codes are 0 ok, 1 bad
input, 2 usage; a user error is one line, with a traceback only under ``--debug``.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import warnings

import typer

from sarkit import __version__, log
from sarkit.errors import SarkitError

app = typer.Typer(
    name="sarkit",
    help="SAR scenes -> georeferenced tiles -> HCoT captions -> a SAR vision-language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

#: Subcommand modules (sarkit.commands.<name>); each defines `command` and optional `NAME`
#: and `SETTINGS` (keyword arguments of ``app.command``).
COMMANDS = (
    "plugins",
    "demo",
    "slice",
    "georef",
    "filter",
    "caption",
    "pretrain",
    "shard",
    "scio",
    "finetune",
    "eval",
    "embed",
    "search",
)

GLOBAL_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--debug": "debug"}


def _version(value: bool) -> None:
    if value:
        print(f"sarkit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Tracebacks and debug logs on stderr."),
) -> None:
    """Flags are read in `main` before parsing; declared here so --help shows them."""


def _register() -> None:
    for name in COMMANDS:
        module = importlib.import_module(f"sarkit.commands.{name}")
        settings = getattr(module, "SETTINGS", {})
        app.command(name=getattr(module, "NAME", name), **settings)(module.command)


def _split_global_flags(argv: list[str]) -> tuple[list[str], dict[str, bool]]:
    flags = {"quiet": False, "debug": False}
    rest = []
    for i, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in GLOBAL_FLAGS:
            flags[GLOBAL_FLAGS[arg]] = True
        else:
            rest.append(arg)
    return rest, flags


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (what tests call)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, flags = _split_global_flags(argv)
    flags["debug"] = flags["debug"] or os.environ.get("SARKIT_DEBUG") == "1"
    log.configure(**flags)
    # rasterio warns on every ungeoreferenced file; sarkit checks and reports that itself
    warnings.filterwarnings("ignore", message="Dataset has no geotransform")
    try:
        if not app.registered_commands:
            _register()
        # standalone mode: click/typer print usage errors themselves and exit 2
        typer.main.get_command(app).main(args=argv, prog_name="sarkit", standalone_mode=True)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume where it stopped")
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `| head`): not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        except OSError:
            pass
        return 0
    except SarkitError as exc:
        if flags["debug"]:
            raise
        log.error(str(exc))
        return exc.exit_code
    except Exception as exc:
        if flags["debug"]:
            raise
        log.error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)")
        return 1


def main() -> None:
    code = run()
    # The process ends here. Frozen objects are left to the OS, so the interpreter's teardown
    # does not walk the whole heap looking for cycles (0.1 s after a slice, whose heap holds
    # numpy, GDAL's bindings, typer and pydantic). Objects still die by refcount as modules
    # are cleared, so their finalisers run; only cycles are left to the OS.
    gc.freeze()
    sys.exit(code)
