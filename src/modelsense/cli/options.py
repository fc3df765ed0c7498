"""Option types shared by the commands, and the builders that turn them into config dataclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig
from modelsense.training.config import TrainConfig

Dataset = Annotated[str, typer.Option("--dataset", "-d", help="digits, mnist1d, mnist, fmnist, cifar10, or a path to a .npz/.csv file")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="directory with the MNIST/FMNIST IDX files or CIFAR-10 batches")]
NTrain = Annotated[Optional[int], typer.Option("--n-train", help="use a seeded stratified subset of this many training examples")]
Corruption = Annotated[float, typer.Option("--corruption-ratio", help="fraction of training labels flipped to another class (seeded)")]
DropClasses = Annotated[str, typer.Option("--drop-classes", help="comma-separated class labels to remove, e.g. 3,5")]
Standardize = Annotated[bool, typer.Option("--standardize/--no-standardize", help="standardise features with training-set mean and std")]
DataSeed = Annotated[int, typer.Option("--data-seed", help="seed of subsetting, splitting and label corruption")]

Model = Annotated[str, typer.Option("--model", "-m", help="linear, mlp, small_mlp, large_mlp, lenet, cnn_deepobs, resnet20_frn, cnn, resnet18")]
Widths = Annotated[Optional[str], typer.Option("--widths", help="hidden widths of mlp, e.g. 128,128")]
Activation = Annotated[Optional[str], typer.Option("--activation", help="mlp activation: relu, tanh, gelu, ...")]
Width = Annotated[Optional[int], typer.Option("--width", help="width k of cnn / resnet18")]
Depth = Annotated[Optional[int], typer.Option("--depth", help="depth of cnn")]
Norm = Annotated[Optional[str], typer.Option("--norm", help="normalisation of cnn / resnet18: gn, bn, frn, none")]

Optimizer = Annotated[str, typer.Option("--optimizer", help="sgd (momentum 0.9), adam or ivon")]
Lr = Annotated[float, typer.Option("--lr", help="initial learning rate")]
LrMin = Annotated[float, typer.Option("--lrmin", help="final learning rate of the cosine schedule")]
Epochs = Annotated[int, typer.Option("--epochs")]
Bs = Annotated[int, typer.Option("--bs", help="minibatch size")]
Delta = Annotated[float, typer.Option("--delta", help="prior precision δ: loss = mean NLL + δ/(2N)·||θ||²")]
HessInit = Annotated[float, typer.Option("--hess-init", help="IVON's initial Hessian estimate h0")]
Seed = Annotated[int, typer.Option("--seed", help="init and batch-order seed")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda")]
FixedBatches = Annotated[bool, typer.Option("--fixed-batches", help="never reshuffle minibatches (as the original MPE code)")]
CheckpointEpochs = Annotated[str, typer.Option("--checkpoint-epochs", help="comma-separated epochs at which to save parameters")]
CheckpointIterations = Annotated[str, typer.Option("--checkpoint-iterations", help="comma-separated iterations (optimizer steps) at which to save parameters")]

Out = Annotated[Path, typer.Option("--out", "-o", help="run directory to write")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def int_list(text: str | None, what: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def data_config(dataset: str, data_dir: Path | None, n_train: int | None, corruption_ratio: float,
                drop_classes: str, standardize: bool, data_seed: int) -> DataConfig:
    return DataConfig(dataset, data_dir=None if data_dir is None else str(data_dir), n_train=n_train,
                      corruption_ratio=corruption_ratio, drop_classes=int_list(drop_classes, "--drop-classes"),
                      standardize=standardize, seed=data_seed)


def model_config(model: str, widths: str | None, activation: str | None, width: int | None, depth: int | None,
                 norm: str | None) -> ModelConfig:
    return ModelConfig(model, widths=int_list(widths, "--widths") or None, activation=activation, width=width,
                       depth=depth, norm=norm)


def train_config(optimizer: str, lr: float, lrmin: float, epochs: int, bs: int, delta: float, hess_init: float,
                 seed: int, device: str, fixed_batches: bool, checkpoint_epochs: str = "",
                 checkpoint_iterations: str = "") -> TrainConfig:
    return TrainConfig(optimizer=optimizer, lr=lr, lrmin=lrmin, epochs=epochs, bs=bs, delta=delta, hess_init=hess_init,
                       seed=seed, device=device, fixed_batches=fixed_batches,
                       checkpoint_epochs=int_list(checkpoint_epochs, "--checkpoint-epochs"),
                       checkpoint_iterations=int_list(checkpoint_iterations, "--checkpoint-iterations"))


# -- option groups -----------------------------------------------------------------------------
# Many commands take the same data / model / training options. `with_configs` adds a group's
# options to a command's signature (typer reads the signature) and hands the command the built
# config dataclass instead, so each option is declared once.

_GROUPS = {
    "data_cfg": (data_config, [("dataset", Dataset, "digits"), ("data_dir", DataDir, None), ("n_train", NTrain, None),
                               ("corruption_ratio", Corruption, 0.0), ("drop_classes", DropClasses, ""),
                               ("standardize", Standardize, False), ("data_seed", DataSeed, 0)]),
    "model_cfg": (model_config, [("model", Model, "mlp"), ("widths", Widths, None), ("activation", Activation, None),
                                 ("width", Width, None), ("depth", Depth, None), ("norm", Norm, None)]),
    "train_cfg": (train_config, [("optimizer", Optimizer, "sgd"), ("lr", Lr, 0.05), ("lrmin", LrMin, 0.0),
                                 ("epochs", Epochs, 30), ("bs", Bs, 64), ("delta", Delta, 1.0),
                                 ("hess_init", HessInit, 0.1), ("seed", Seed, 0), ("device", Device, "cpu"),
                                 ("fixed_batches", FixedBatches, False), ("checkpoint_epochs", CheckpointEpochs, ""),
                                 ("checkpoint_iterations", CheckpointIterations, "")]),
}


def with_configs(**defaults: object):
    """Decorator: replace the command's `data_cfg` / `model_cfg` / `train_cfg` parameters by options.

    Keyword arguments override option defaults for this command (e.g. `epochs=100`).
    """
    import functools
    import inspect

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name not in _GROUPS]
        added, groups = [], [g for g in _GROUPS if g in sig.parameters]
        for g in groups:
            for name, annotation, default in _GROUPS[g][1]:
                added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                               default=defaults.get(name, default)))
        unknown = set(defaults) - {p.name for p in added}
        if unknown:
            raise TypeError(f"defaults for unknown options {sorted(unknown)}")

        @functools.wraps(fn)
        def command(**kwargs):
            for g in groups:
                builder, opts = _GROUPS[g]
                kwargs[g] = builder(**{name: kwargs.pop(name) for name, _, _ in opts})
            return fn(**kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return command

    return decorate
