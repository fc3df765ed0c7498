"""Core commands: datasets, models, train, demo."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.progress import set_quiet


@app.command()
def datasets() -> None:
    """List the datasets that can be loaded, with sizes, shapes, classes and source."""
    from modelsense.data import available_datasets

    table = Table("name", "train", "test", "input shape", "classes", "source")
    for d in available_datasets():
        table.add_row(*(str(d.get(k, "")) for k in ("name", "n_train", "n_test", "input_shape", "num_classes", "source")))
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
def train(
    dataset: o.Dataset = "digits", data_dir: o.DataDir = None, n_train: o.NTrain = None, corruption_ratio: o.Corruption = 0.0,
    drop_classes: o.DropClasses = "", standardize: o.Standardize = False, data_seed: o.DataSeed = 0,
    model: o.Model = "mlp", widths: o.Widths = None, activation: o.Activation = None, width: o.Width = None,
    depth: o.Depth = None, norm: o.Norm = None,
    optimizer: o.Optimizer = "sgd", lr: o.Lr = 0.05, lrmin: o.LrMin = 0.0, epochs: o.Epochs = 30, bs: o.Bs = 64,
    delta: o.Delta = 1.0, hess_init: o.HessInit = 0.1, seed: o.Seed = 0, device: o.Device = "cpu",
    fixed_batches: o.FixedBatches = False, checkpoint_epochs: o.CheckpointEpochs = "",
    out: o.Out = Path("runs/train"), quiet: o.Quiet = False,
) -> None:
    """Train one model; writes metrics.json (train_accuracy, test_accuracy, test_nll), model.pt, history, figures."""
    from modelsense.experiments.train import run_train

    set_quiet(quiet)
    metrics = run_train(
        o.data_config(dataset, data_dir, n_train, corruption_ratio, drop_classes, standardize, data_seed),
        o.model_config(model, widths, activation, width, depth, norm),
        o.train_config(optimizer, lr, lrmin, epochs, bs, delta, hess_init, seed, device, fixed_batches, checkpoint_epochs),
        out, progress=not quiet,
    )
    console.print(f"train accuracy {metrics['train_accuracy']:.4f}  test accuracy {metrics['test_accuracy']:.4f}  "
                  f"test NLL {metrics['test_nll']:.4f}  -> {out}")


@app.command()
def demo(out: o.Out = Path("demo_out"), quiet: o.Quiet = False) -> None:
    """The main job: a short tour on digits that writes OUT/report.html."""
    from modelsense.experiments.demo import run_demo

    set_quiet(quiet)
    path = run_demo(out, progress=not quiet)
    console.print(f"report written to {path}")
