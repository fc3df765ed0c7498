"""The `modelsense` command line: a thin mapping from options to config dataclasses.

Every computing command takes `--out DIR` and writes a run directory (see `modelsense.runs`).
Errors on bad input are printed as one clear message (exit code 2), never as a traceback.
Commands live in one module per area (`core`, ...), each adding itself to the shared `app`.
"""

from __future__ import annotations

import sys

from rich.console import Console

from modelsense.cli import core, curvature, influence, memorization, mpe, representations  # noqa: F401  (register commands)
from modelsense.cli.app import app
from modelsense.errors import ModelsenseError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: typer handles usage errors; modelsense errors become one clear message."""
    try:
        app()
    except ModelsenseError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
