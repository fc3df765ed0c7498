"""`modelsense train`: train one model and save it with its history in a run directory."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.experiments import plots
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import save_model
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.fit import Fit, fit


def train_model(data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, progress: bool = True) -> tuple[nn.Module, Fit]:
    """Build the model for `data` with init seed `train_cfg.seed` and fit it."""
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    return module, fit(module, data, train_cfg, progress=progress)


def fit_metrics(result: Fit, module: nn.Module, seconds: float) -> dict[str, Any]:
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


def run_train(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path,
              progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Load data, train, and write config.json, metrics.json, history.npz, model.pt, figures/."""
    data = load_dataset_from_config(data_cfg)  # validates before anything is written
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    config = {"data": data_cfg.to_dict(), "model": asdict(model_cfg), "train": train_cfg.to_dict(),
              "dataset": data.summary(), "seed": train_cfg.seed}
    with RunDir.open(out, "train", config, overwrite=overwrite) as run:
        run.log(f"training {model_cfg.name} on {data.name}")
        start = time.perf_counter()
        result = fit(module, data, train_cfg, progress=progress)
        metrics = fit_metrics(result, module, time.perf_counter() - start)
        run.save_arrays("history", **result.history)
        for key, params in result.checkpoints.items():
            run.save_torch(f"checkpoint_{key}", params)
        save_model(run.path / "model.pt", module, model_cfg, data, train_cfg.seed)
        run.save_figure(plots.learning_curves(result.history, f"{model_cfg.name} on {data.name}"), "learning_curves")
        run.write_metrics(metrics)
        run.log(f"done: {metrics}")
    return metrics
