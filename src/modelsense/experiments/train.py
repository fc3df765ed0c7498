"""`modelsense train`: train one model and save it with its history in a run directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments import plots
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.runs import RunDir, read_json
from modelsense.training.config import TrainConfig
from modelsense.training.fit import Fit, evaluate, fit


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


def check_checkpoint_data(info: dict[str, Any], data: Dataset, source: str,
                          fix: str = "pass the dataset the model was trained on") -> None:
    """Raise ConfigError unless the checkpoint `info` (of `load_model`) was trained on `data`: the same
    dataset name, input shape and number of classes. `source` names the checkpoint in the message
    (e.g. "checkpoint runs/a/model.pt"), `fix` says what to do about a different dataset."""
    if info.get("dataset") != data.name:
        raise ConfigError(f"{source} was trained on dataset {info.get('dataset')!r}, but --dataset is {data.name!r}; {fix}")
    if tuple(info.get("input_shape", ())) != tuple(data.input_shape) or info.get("num_classes") != data.num_classes:
        raise ConfigError(
            f"{source} takes inputs {tuple(info.get('input_shape', ()))} with {info.get('num_classes')} "
            f"classes, but dataset {data.name!r} has inputs {tuple(data.input_shape)} with {data.num_classes} classes"
        )


@dataclass
class TrainedRun:
    """A model.pt of `modelsense train` (checked against a dataset) and what its run directory tells.

    module: the network (eval mode, CPU); info: the checkpoint's metadata (`load_model`); model_cfg:
    its architecture; train_cfg / data_cfg: the training and data options of the run's config.json,
    None where that file is absent or describes another model (then the learning rates of the
    snapshots are unknown); snapshots: the parameter files `modelsense train` saved next to it
    (checkpoint_<key>.pt with key `epoch_E` / `iteration_T`, `Fit.checkpoints`' keys), key -> path.
    """

    path: Path
    module: nn.Module
    info: dict[str, Any]
    model_cfg: ModelConfig
    train_cfg: TrainConfig | None
    data_cfg: dict[str, Any] | None
    snapshots: dict[str, Path]

    def recipe(self, fallback: TrainConfig) -> TrainConfig:
        """The training options to retrain this model with: the run's, on `fallback.device`; else `fallback`."""
        return fallback if self.train_cfg is None else replace(self.train_cfg, device=fallback.device)

    def summary(self) -> dict[str, Any]:
        """What a run directory records about the checkpoint it used."""
        return {"path": str(self.path), "model": self.info["model"], "seed": self.info.get("seed"),
                "recipe": "options" if self.train_cfg is None else "config.json", "data": self.data_cfg,
                "snapshots": sorted(self.snapshots)}

    def as_fit(self, data: Dataset, train_cfg: TrainConfig) -> Fit:
        """The run as a `Fit` of `train_cfg` on `data`: the module on `train_cfg.device`, its mean NLL and
        accuracy on data's train and test sets as a one-row history, the snapshots as checkpoints, and
        no optimizer (`optimizer` is None: model.pt holds no optimizer state)."""
        module = self.module.to(train_cfg.device).eval()
        device = next(module.parameters()).device
        train = evaluate(module, data.x_train.to(device), data.y_train.to(device))
        test = evaluate(module, data.x_test.to(device), data.y_test.to(device))
        history = {"train_loss": [train["loss"]], "train_accuracy": [train["accuracy"]],
                   "test_loss": [test["loss"]], "test_accuracy": [test["accuracy"]]}
        checkpoints = {k: torch.load(p, map_location="cpu", weights_only=True) for k, p in self.snapshots.items()}
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        return Fit(module, params, None, train_cfg, data.n_train, history, checkpoints)


def load_trained_run(path: str | Path, data: Dataset, source: str | None = None,
                     fix: str = "pass the dataset the model was trained on") -> TrainedRun:
    """Load a model.pt of `modelsense train`, check it against `data` (`check_checkpoint_data`) and
    read its run directory: config.json's options when they describe this model (same architecture
    and seed), and the checkpoint_<key>.pt snapshots."""
    path = Path(path)
    module, info = load_model(path)
    check_checkpoint_data(info, data, source or f"checkpoint {path}", fix)
    config_path = path.parent / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    train = config.get("train") if isinstance(config, dict) else None
    train_cfg = data_cfg = None
    if (isinstance(train, dict) and config.get("model") == json.loads(json.dumps(info["model"]))
            and train.get("seed") == info.get("seed")):
        known = {f.name for f in fields(TrainConfig)}
        train_cfg = TrainConfig(**{k: v for k, v in train.items() if k in known})
        data_cfg = config.get("data")
    snapshots = {p.stem.removeprefix("checkpoint_"): p for p in sorted(path.parent.glob("checkpoint_*.pt"))}
    return TrainedRun(path, module, info, ModelConfig(**info["model"]), train_cfg, data_cfg, snapshots)


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
