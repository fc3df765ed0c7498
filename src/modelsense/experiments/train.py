"""`modelsense train`: train one model and save it with its history in a run directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.experiments.command import Command, Prepared
from modelsense.experiments.source import check_model, obtain_model
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.fit import Fit, fit
from modelsense.training.objective import LOSSES


def train_model(
    data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, progress: bool = True
) -> tuple[nn.Module, Fit]:
    """Build the model for `data` with init seed `train_cfg.seed` and fit it."""
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    return module, fit(module, data, train_cfg, progress=progress)


def fit_metrics(result: Fit, module: nn.Module, seconds: float) -> dict[str, Any]:
    """The metrics of a training run: final train/test accuracy and NLL, parameter count, epochs, seconds."""
    final = result.final
    return {
        "train_accuracy": final["train_accuracy"],
        "test_accuracy": final["test_accuracy"],
        "train_nll": final["train_loss"],
        "test_nll": final["test_loss"],
        "n_params": sum(p.numel() for p in module.parameters()),
        "epochs": result.config.epochs,
        "seconds": seconds,
    }


@dataclass(frozen=True)
class TrainSpec:
    """`modelsense train`: the data, the model and how to train it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def check_train(spec: TrainSpec) -> Prepared:
    """Load the dataset and check the model fits it."""
    data = load_dataset_from_config(spec.data)
    check_model(data, spec.model)
    return Prepared(data, {"dataset": data.summary()})


def run_train(spec: TrainSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train; write model.pt (and checkpoint_<key>.pt snapshots), history.npz, the learning curves."""
    from modelsense.training import plots

    data = prepared.data
    run.log(f"training {spec.model.name} on {data.name}")
    start = time.perf_counter()
    got = obtain_model(data, spec.model, spec.train, run=run, progress=progress)
    metrics = fit_metrics(got.fit, got.module, time.perf_counter() - start)
    run.save_arrays("history", **got.fit.history)
    run.save_figure(plots.learning_curves(got.fit.history, f"{spec.model.name} on {data.name}"), "learning_curves")
    return metrics


TRAIN = Command("train", TrainSpec, check_train, run_train, training_losses=LOSSES,
                summary=lambda m: f"train accuracy {m['train_accuracy']:.4f}  test accuracy {m['test_accuracy']:.4f}  "
                                  f"test NLL {m['test_nll']:.4f}",
                help="Train one model; writes metrics.json (train_accuracy, test_accuracy, test_nll), model.pt, "
                     "history, figures.")
