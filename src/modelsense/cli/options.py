"""Option types of the CLI that no spec declares: where data files live and the run-directory flags every
command gets (`cli/generate.py` adds them; the others are declared on the spec fields, `modelsense.options`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="directory with the MNIST/FMNIST IDX files or CIFAR-10 batches")
]
Out = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="run directory to write (refused if it holds anything, unless --overwrite or --resume)"
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="empty --out first if it holds a modelsense run")]
Resume = Annotated[
    bool, typer.Option("--resume", help="continue (or extend) the run in --out; its stored settings must match")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
