"""The `modelsense` command line: a thin mapping from options to config dataclasses.

Every computing command takes `--out DIR` and writes a run directory (see `modelsense.runs`).
Errors on bad input are printed as one clear message (exit code 2), never as a traceback.
Commands live in one module per area (`core`, ...), each adding itself to the shared `app`.
"""

from __future__ import annotations

import signal
import sys

from rich.console import Console
from rich.markup import escape

from modelsense.cli import core, curvature, influence, memorization, mpe, representations  # noqa: F401  (register commands)
from modelsense.cli.app import app
from modelsense.errors import ModelsenseError
from modelsense.runs import Interrupted

__all__ = ["app", "main"]


def _interrupt(signum, frame) -> None:
    raise Interrupted("interrupted: nothing was written" if signum == signal.SIGINT else
                      "terminated: nothing was written")


def main() -> None:
    """Entry point: typer handles usage errors; modelsense errors and failed writes become one clear
    line (exit 2) and Ctrl-C one line saying what was kept (exit 130), never a traceback."""
    err = Console(stderr=True, highlight=False)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: mark the run, shut Ray down, then exit
    try:
        app()
    except ModelsenseError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except Interrupted as exc:
        err.print(escape(exc.message), soft_wrap=True)
        sys.exit(130)
    except OSError as exc:  # an unwritable or full disk outside the run-directory checks
        where = f" {exc.filename}" if exc.filename else ""
        err.print(f"[bold red]error:[/] could not access{escape(where)}: {escape(str(exc.strerror or exc))}",
                  soft_wrap=True)
        sys.exit(2)
