"""`modelsense train`: train one model and save it with its history in a run directory."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments import plots
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.fit import Fit, fit


def save_model(path: Path, module: nn.Module, model_cfg: ModelConfig, data: Dataset, seed: int) -> None:
    """A checkpoint that `load_model` rebuilds without other information."""
    torch.save(
        {
            "state_dict": module.state_dict(),
            "model": asdict(model_cfg),
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "dataset": data.name,
            "seed": seed,
        },
        path,
    )


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a module saved by `save_model`; returns (module in eval mode, checkpoint info)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found (a model.pt written by `modelsense train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        cfg = ModelConfig(**ckpt["model"])
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not our checkpoint
        raise ConfigError(f"{path} is not a modelsense checkpoint ({exc})") from exc
    module = build_model_from_config(cfg, tuple(ckpt["input_shape"]), ckpt["num_classes"], seed=ckpt.get("seed", 0))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), ckpt


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
              progress: bool = True) -> dict[str, Any]:
    """Load data, train, and write config.json, metrics.json, history.npz, model.pt, figures/."""
    data = load_dataset_from_config(data_cfg)  # validates before anything is written
    run = RunDir(out)
    run.write_config("train", {"data": asdict(data_cfg), "model": asdict(model_cfg), "train": train_cfg.to_dict(),
                               "dataset": data.summary(), "seed": train_cfg.seed})
    run.log(f"training {model_cfg.name} on {data.name}")
    start = time.perf_counter()
    module, result = train_model(data, model_cfg, train_cfg, progress)
    metrics = fit_metrics(result, module, time.perf_counter() - start)
    run.save_arrays("history", **result.history)
    save_model(run.path / "model.pt", module, model_cfg, data, train_cfg.seed)
    for key, params in result.checkpoints.items():
        torch.save(params, run.path / f"checkpoint_{key}.pt")
    run.save_figure(plots.learning_curves(result.history, f"{model_cfg.name} on {data.name}"), "learning_curves")
    run.write_metrics(metrics)
    run.log(f"done: {metrics}")
    return metrics
