"""`modelsense train`: train one model and save it with its history in a run directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments import plots
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import load_file, load_model, save_model
from modelsense.runs import RunDir, read_json
from modelsense.training.config import TrainConfig
from modelsense.training.fit import Fit, evaluate, fit


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
    """A model.pt (checked against a dataset) and what its run directory tells.

    module: the network (eval mode, CPU); info: the checkpoint's metadata (`load_model`); model_cfg:
    its architecture; train_cfg / data_cfg: the training and data recipe of the run's config.json,
    None where that file is absent or describes another model (then the learning rates of the
    snapshots are unknown); snapshots: the parameter files `modelsense train` saved next to it
    (checkpoint_<key>.pt with key `epoch_E` / `iteration_T`, `Fit.checkpoints`' keys), key -> path.
    """

    path: Path
    module: nn.Module
    info: dict[str, Any]
    model_cfg: ModelConfig
    train_cfg: TrainConfig | None
    data_cfg: DataConfig | None
    snapshots: dict[str, Path]

    def recipe(self, fallback: TrainConfig) -> TrainConfig:
        """The training options to retrain this model with: the run's, on `fallback.device`; else `fallback`."""
        return fallback if self.train_cfg is None else replace(self.train_cfg, device=fallback.device)

    def summary(self) -> dict[str, Any]:
        """What a run directory records about the checkpoint it used."""
        return {"path": str(self.path), "model": self.info["model"], "seed": self.info.get("seed"),
                "recipe": "options" if self.train_cfg is None else "config.json",
                "data": None if self.data_cfg is None else self.data_cfg.to_dict(), "snapshots": sorted(self.snapshots)}

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
        checkpoints = {k: load_file(p, "parameter snapshot") for k, p in self.snapshots.items()}
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        return Fit(module, params, None, train_cfg, data.n_train, history, checkpoints)


@dataclass(frozen=True)
class Recipe:
    """How the model of a checkpoint was made: its data recipe and training recipe (None where its
    run directory does not say), and its architecture (always: model.pt holds it)."""

    data: DataConfig | None
    model: ModelConfig
    train: TrainConfig | None


def checkpoint_recipe(path: str | Path) -> tuple[Recipe, nn.Module, dict[str, Any]]:
    """(recipe, module, checkpoint info) of a model.pt: the data and training options of the
    config.json beside it when that run made this model (same architecture and seed)."""
    path = Path(path)
    module, info = load_model(path)
    model_cfg = ModelConfig(**{**info["model"], "widths": _tuple(info["model"].get("widths"))})
    config_path = path.parent / "config.json"
    config = read_json(config_path, "the config of the run that trained the checkpoint") if config_path.is_file() else {}
    train = config.get("train") if isinstance(config, dict) else None
    if not (isinstance(train, dict) and config.get("model") == json.loads(json.dumps(info["model"]))
            and train.get("seed") == info.get("seed")):
        return Recipe(None, model_cfg, None), module, info
    known = {f.name for f in fields(TrainConfig)} - set(FREE_OF_RECIPE["train"])  # a GPU run's recipe loads on a CPU
    train_cfg = TrainConfig(**{k: _tuple(v) for k, v in train.items() if k in known})
    data = config.get("data")
    known = {f.name for f in fields(DataConfig)}
    data_cfg = DataConfig(**{k: _tuple(v) for k, v in data.items() if k in known}) if isinstance(data, dict) else None
    return Recipe(data_cfg, model_cfg, train_cfg), module, info


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


#: settings that may differ from a checkpoint's recipe: where the data lie, where to compute
FREE_OF_RECIPE = {"data": ("data_dir",), "model": (), "train": ("device",)}


def recipe_differences(recipe: Recipe, data_cfg: DataConfig | None = None, model_cfg: ModelConfig | None = None,
                       train_cfg: TrainConfig | None = None) -> list[tuple[str, str, Any, Any]]:
    """(group, field, given value, the recipe's value) for every setting that contradicts `recipe`."""
    out = []
    for group, given, stored in (("data", data_cfg, recipe.data), ("model", model_cfg, recipe.model),
                                 ("train", train_cfg, recipe.train)):
        if given is None or stored is None:
            continue
        for f in fields(given):
            a, b = getattr(given, f.name), getattr(stored, f.name)
            if f.name not in FREE_OF_RECIPE[group] and json.dumps(a, default=str) != json.dumps(b, default=str):
                out.append((group, f.name, a, b))
    return out


def check_recipe(path: str | Path, recipe: Recipe, data_cfg: DataConfig | None = None,
                 model_cfg: ModelConfig | None = None, train_cfg: TrainConfig | None = None) -> None:
    """Raise ConfigError when a setting contradicts the recipe of checkpoint `path` (the command line
    fills the settings from the recipe; a Python caller passes them as the run recorded them)."""
    diff = recipe_differences(recipe, data_cfg, model_cfg, train_cfg)
    if diff:
        listed = "; ".join(f"{g} {name} {a!r} (checkpoint: {b!r})" for g, name, a, b in diff)
        raise ConfigError(f"checkpoint {path} was made with another recipe than this run asks for: {listed}; a "
                          "command scoring a checkpoint uses the data, model and training recipe it was made with")


def load_trained_run(path: str | Path, data: Dataset, source: str | None = None,
                     fix: str = "pass the dataset the model was trained on") -> TrainedRun:
    """Load a model.pt, check it against `data` (`check_checkpoint_data`) and read its run directory:
    its recipe (`checkpoint_recipe`) and the checkpoint_<key>.pt snapshots."""
    path = Path(path)
    recipe, module, info = checkpoint_recipe(path)
    check_checkpoint_data(info, data, source or f"checkpoint {path}", fix)
    snapshots = {p.stem.removeprefix("checkpoint_"): p for p in sorted(path.parent.glob("checkpoint_*.pt"))}
    return TrainedRun(path, module, info, recipe.model, recipe.train, recipe.data, snapshots)


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
