"""Core commands: datasets, models, train, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rich.table import Table

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.data import DataConfig
from modelsense.models import ModelConfig
from modelsense.progress import set_quiet
from modelsense.training.config import TrainConfig


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


@app.command()
@o.with_configs()
def train(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: o.Out = Path("runs/train"),
          overwrite: o.Overwrite = False, quiet: o.Quiet = False) -> None:
    """Train one model; writes metrics.json (train_accuracy, test_accuracy, test_nll), model.pt, history, figures."""
    from modelsense.experiments.train import run_train

    set_quiet(quiet)
    metrics = run_train(data_cfg, model_cfg, train_cfg, out, progress=not quiet, overwrite=overwrite)
    console.print(f"train accuracy {metrics['train_accuracy']:.4f}  test accuracy {metrics['test_accuracy']:.4f}  "
                  f"test NLL {metrics['test_nll']:.4f}  -> {out}")


@app.command()
def demo(out: o.Out = Path("demo_out"), resume: o.Resume = False, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
         sections: Annotated[str, typer.Option("--sections", help="comma-separated subset of the sections (default: all); report.html keeps the other sections an earlier demo wrote into --out")] = "") -> None:
    """The main job: a short tour on digits that writes OUT/report.html (--resume reuses finished sections)."""
    from modelsense.experiments.demo import run_demo

    set_quiet(quiet)
    path = run_demo(out, progress=not quiet, sections=[s.strip() for s in sections.split(",") if s.strip()],
                    resume=resume, overwrite=overwrite)
    console.print(f"report written to {path}")
