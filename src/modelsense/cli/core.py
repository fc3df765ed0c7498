"""Core commands: datasets, models, train, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.cli.generate import add_command
from modelsense.experiments.runs_report import REPORT, report_runs
from modelsense.experiments.train import TRAIN
from modelsense.progress import set_quiet
from modelsense.runs import RunDir


@app.command()
def datasets(data_dir: o.DataDir = None) -> None:
    """List the datasets that can be loaded, with sizes, shapes, classes and source."""
    from modelsense.data import available_datasets

    found = data_dir is not None
    table = Table("name", "train", "test", "input shape", "classes", "source", *(["found"] if found else []))
    for d in available_datasets(None if data_dir is None else str(data_dir)):
        keys = ("name", "n_train", "n_test", "input_shape", "num_classes", "source", *(["found"] if found else []))
        table.add_row(*(str(d.get(k, "")) for k in keys))
    console.print(table)


@app.command()
def models() -> None:
    """List the model architectures by name."""
    from modelsense.models import available_models

    table = Table("name", "description", "inputs")
    for m in available_models():
        table.add_row(str(m.get("name", "")), str(m.get("description", "")), str(m.get("inputs", "")))
    console.print(table)


add_command(app, TRAIN)


@app.command()
def demo(
    out: o.Out = Path("demo_out"),
    resume: o.Resume = False,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
    sections: Annotated[
        str,
        typer.Option(
            "--sections",
            help="comma-separated subset of the sections (default: all); report.html keeps the other sections an "
            "earlier demo wrote into --out",
        ),
    ] = "",
) -> None:
    """The main job: a short tour on digits that writes OUT/report.html (--resume reuses finished sections)."""
    from modelsense.experiments.demo import run_demo

    set_quiet(quiet)
    path = run_demo(out, progress=not quiet, sections=[s.strip() for s in sections.split(",") if s.strip()],
                    resume=resume, overwrite=overwrite)
    console.print(f"report written to {path}")


@app.command(help=REPORT.help)
def report(runs: Annotated[list[Path], typer.Argument(help="run directories (the --out of modelsense commands; a demo "
                                                           "folder stands for the runs it holds)", show_default=False,
                                                      metavar="RUN_DIR")],
           out: o.Out = Path("runs/report"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
           title: Annotated[str, typer.Option("--title", help="title of the report")] = "modelsense report") -> None:
    """Figures and an HTML report (OUT/report.html) from finished run directories."""
    set_quiet(quiet)
    path = report_runs(runs, out, title=title, overwrite=overwrite, progress=not quiet)
    console.print(REPORT.summary(RunDir(out).read_metrics()), highlight=False)
    console.print(f"report written to {path}", highlight=False)
