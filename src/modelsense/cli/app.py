"""The typer application object, shared by the command modules of `modelsense.cli`."""

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="How a trained network depends on its data, its parameters, and another network's representations.",
)
console = Console()
