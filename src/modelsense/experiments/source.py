"""Where the model a command works on comes from: trained here from the spec's recipe, or a
checkpoint (a model.pt and the run directory that made it), whose recipe the command must follow.

`obtain_model` is the one way to get it; `checkpoint_recipe` reads what made a checkpoint (its data
and training options from the config.json beside it, its architecture from model.pt);
`check_recipe` refuses settings that contradict that recipe.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from modelsense.data import DataConfig, Dataset
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import load_file, load_model, save_model
from modelsense.runs import RunDir, read_json
from modelsense.training.config import TrainConfig
from modelsense.training.fit import Fit, evaluate, fit

#: the help of every command's --checkpoint and --weights (the commands that train a model otherwise)
CHECKPOINT_HELP = ("model.pt of `modelsense train` to study instead of training one; the data, model and training "
                   "recipe come from its run (options that contradict it are refused; --device aside)")
WEIGHTS_HELP = ("a state_dict of --model trained elsewhere (torch.save(model.state_dict(), path)) to study instead of "
                "training one; the command's data and training options stand for its recipe")


def check_checkpoint_data(info: dict[str, Any], data: Dataset, source: str,
                          fix: str = "pass the dataset the model was trained on") -> None:
    """Raise ConfigError unless the checkpoint `info` (of `load_model`) was trained on `data`: the same
    dataset name, input shape and number of classes. `source` names the checkpoint in the message
    (e.g. "checkpoint runs/a/model.pt"), `fix` says what to do about a different dataset."""
    if info.get("dataset") != data.name:
        raise ConfigError(
            f"{source} was trained on dataset {info.get('dataset')!r}, but --dataset is {data.name!r}; {fix}"
        )
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
        """The run as a `Fit` of `train_cfg` on `data`: the module on `train_cfg.device`, its mean loss and
        accuracy on data's train and test sets as a one-row history, the snapshots as checkpoints, and
        no optimizer (`optimizer` is None: model.pt holds no optimizer state)."""
        module = self.module.to(train_cfg.device).eval()
        device = next(module.parameters()).device
        train = evaluate(module, data.x_train.to(device), data.y_train.to(device), loss=train_cfg.loss)
        test = evaluate(module, data.x_test.to(device), data.y_test.to(device), loss=train_cfg.loss)
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
    config = (
        read_json(config_path, "the config of the run that trained the checkpoint") if config_path.is_file() else {}
    )
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


def load_weights_run(path: str | Path, model_cfg: ModelConfig, data: Dataset) -> TrainedRun:
    """A model trained elsewhere: `model_cfg` (a built-in architecture or the user's `file.py:make_model`)
    built for `data` with the state_dict `path` loaded. Its recipe is unknown (no data or training
    options, no snapshots): the command's own options stand in for it."""
    from modelsense.models.checkpoint import load_weights

    module = load_weights(path, build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=0))
    info = {"model": asdict(model_cfg), "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "dataset": data.name, "seed": None, "weights": str(path)}
    return TrainedRun(Path(path), module, info, model_cfg, None, None, {})


# -- the model a command works on ----------------------------------------------------------------
@dataclass
class Obtained:
    """The model of a command: the module, its `Fit` (history, snapshots, optimizer state when
    trained here), the architecture and the training recipe it was made with, and its source."""

    module: nn.Module
    fit: Fit
    model: ModelConfig
    train: TrainConfig
    trained: TrainedRun | None = None

    def summary(self) -> dict[str, Any]:
        return {"source": "trained" if self.trained is None else "checkpoint",
                **({} if self.trained is None else {"checkpoint": self.trained.summary()})}


def check_checkpoint(checkpoint: str | Path, data_cfg: DataConfig, data: Dataset) -> TrainedRun:
    """The run of `checkpoint`, checked against the data (recipe and shapes) before anything is written."""
    trained = load_trained_run(checkpoint, data)
    check_recipe(checkpoint, Recipe(trained.data_cfg, trained.model_cfg, trained.train_cfg), data_cfg)
    return trained


def model_source(checkpoint: str | Path | None, weights: str | Path | None, data_cfg: DataConfig,
                 model_cfg: ModelConfig, data: Dataset, required: bool = False) -> TrainedRun | None:
    """The run of `checkpoint` (checked against the data) or of `weights` (a state_dict of `model_cfg`);
    None when neither is given (the model is trained here), a ConfigError when both are, or neither
    where one is `required`."""
    if (checkpoint is not None and weights is not None) or (required and checkpoint is None and weights is None):
        raise ConfigError("give one model: --checkpoint (a modelsense run's model.pt) or --weights (a state_dict of "
                          "--model), not " + ("both" if checkpoint is not None else "neither"))
    if checkpoint is not None:
        return check_checkpoint(checkpoint, data_cfg, data)
    return None if weights is None else load_weights_run(weights, model_cfg, data)


def obtain_model(data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, *, trained: TrainedRun | None = None,
                 run: RunDir | None = None, progress: bool = True, checkpoint_epochs: Sequence[int] = (),
                 on_epoch: Callable | None = None, setup: Callable[[nn.Module], Any] | None = None) -> Obtained:
    """The model a command works on: `trained` (a checked checkpoint, `check_checkpoint`) as a `Fit`
    of its recipe (on `train_cfg.device`), or a model built from `model_cfg` and fitted with
    `train_cfg` (plus `checkpoint_epochs` snapshots), saved as model.pt (and its snapshots) in `run`.

    `setup(module)` runs before training and returns a context manager held during it (e.g. an
    optimizer-state recorder); `on_epoch` is passed to `fit`.
    """
    if trained is not None:
        recipe = trained.recipe(train_cfg)
        return Obtained(trained.module.to(recipe.device), trained.as_fit(data, recipe), trained.model_cfg, recipe,
                        trained)
    if checkpoint_epochs:
        train_cfg = replace(
            train_cfg, checkpoint_epochs=tuple(sorted({*train_cfg.checkpoint_epochs, *checkpoint_epochs}))
        )
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    with setup(module) if setup is not None else contextlib.nullcontext():
        result = fit(module, data, train_cfg, progress=progress, on_epoch=on_epoch)
    if run is not None:
        for key, params in result.checkpoints.items():
            run.save_torch(f"checkpoint_{key}", params)
        save_model(run.path / "model.pt", result.module, model_cfg, data, train_cfg.seed)
    return Obtained(result.module, result, model_cfg, train_cfg)


def check_model(data: Dataset, model_cfg: ModelConfig) -> nn.Module:
    """Build the model once for `data`: its options are checked before anything is written."""
    return build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=0)
