"""Option types shared by the commands, and the builders that turn them into config dataclasses."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig
from modelsense.training.config import TrainConfig

Dataset = Annotated[
    str, typer.Option("--dataset", "-d", help="digits, mnist1d, mnist, fmnist, cifar10, or a path to a .npz/.csv file")
]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="directory with the MNIST/FMNIST IDX files or CIFAR-10 batches")
]
NTrain = Annotated[
    int | None, typer.Option("--n-train", help="use a seeded stratified subset of this many training examples")
]
Corruption = Annotated[
    float, typer.Option("--corruption-ratio", help="fraction of training labels flipped to another class (seeded)")
]
DropClasses = Annotated[str, typer.Option("--drop-classes", help="comma-separated class labels to remove, e.g. 3,5")]
Standardize = Annotated[
    bool | None,
    typer.Option(
        "--standardize/--no-standardize",
        help="standardise features with training-set mean and std; automatic where no default is shown: on for "
        "feature vectors from a .npz/.csv file, off for built-in datasets and images (they keep their usual "
        "normalisation)",
    ),
]
DataSeed = Annotated[int, typer.Option("--data-seed", help="seed of subsetting, splitting and label corruption")]

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="linear, mlp, small_mlp, large_mlp, lenet, cnn_deepobs, resnet20_frn, cnn, resnet18"
    ),
]
Widths = Annotated[str | None, typer.Option("--widths", help="hidden widths of mlp, e.g. 128,128")]
Activation = Annotated[str | None, typer.Option("--activation", help="mlp activation: relu, tanh, gelu, ...")]
Width = Annotated[int | None, typer.Option("--width", help="width k of cnn / resnet18")]
Depth = Annotated[int | None, typer.Option("--depth", help="depth of cnn")]
Norm = Annotated[str | None, typer.Option("--norm", help="normalisation of cnn / resnet18: gn, bn, frn, none")]

Optimizer = Annotated[str, typer.Option("--optimizer", help="sgd (momentum 0.9), adam or ivon")]
Lr = Annotated[float, typer.Option("--lr", help="initial learning rate")]
LrMin = Annotated[float, typer.Option("--lrmin", help="final learning rate of the cosine schedule")]
Epochs = Annotated[int, typer.Option("--epochs")]
Bs = Annotated[int, typer.Option("--bs", help="minibatch size")]
Delta = Annotated[float, typer.Option("--delta", help="prior precision δ: loss = mean NLL + δ/(2N)·||θ||²")]
HessInit = Annotated[float, typer.Option("--hess-init", help="IVON's initial Hessian estimate h0")]
Seed = Annotated[int, typer.Option("--seed", help="init and batch-order seed")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda")]
FixedBatches = Annotated[
    bool, typer.Option("--fixed-batches", help="never reshuffle minibatches (as the code of Nickl et al. 2023)")
]
CheckpointEpochs = Annotated[
    str, typer.Option("--checkpoint-epochs", help="comma-separated epochs at which to save parameters")
]
CheckpointIterations = Annotated[
    str,
    typer.Option(
        "--checkpoint-iterations", help="comma-separated iterations (optimizer steps) at which to save parameters"
    ),
]

Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="model.pt of `modelsense train` to use instead of training one (the model options are then unused; the "
        "training recipe, --device aside, comes from its run's config.json when there)",
    ),
]

# attribution method settings (`method_settings`; each method takes those it understands)
NumEns = Annotated[
    int | None, typer.Option("--num-ens", help="ensemble members: gex fine-tuning runs, la-kfac samples")
]
FtLr = Annotated[float | None, typer.Option("--ft-lr", help="gex: peak learning rate of each fine-tuning run")]
FtStep = Annotated[int | None, typer.Option("--ft-step", help="gex: SGD steps per fine-tuning run")]
FtLrSched = Annotated[
    str | None, typer.Option("--ft-lr-sched", help="gex: cosine (restarted, to 0) or constant (with clipping)")
]
GexEps = Annotated[
    float | None,
    typer.Option(
        "--gex-eps",
        help="gex/la-kfac: floor τ of the reference loss max(l(θ*), τ); 0 = none (the GEX code of Kim et al. 2023: "
        "0.05)",
    ),
]
ProjDim = Annotated[int | None, typer.Option("--proj-dim", help="projection dimension of randproj, tracin-rp, trak")]
Damping = Annotated[
    float | None,
    typer.Option("--damping", help="if-*/trak/arnoldi damping (if-*/trak: relative to the mean eigenvalue)"),
]
DampingMode = Annotated[str | None, typer.Option("--damping-mode", help="relative (× mean eigenvalue) or absolute")]
CurvatureMatrix = Annotated[str | None, typer.Option("--matrix", help="curvature of if-*/arnoldi: ggn, hessian or ef")]
ArnoldiRank = Annotated[int | None, typer.Option("--arnoldi-rank", help="arnoldi: number of eigendirections")]
EnsembleModels = Annotated[
    int | None,
    typer.Option(
        "--ensemble-models",
        help="trak and if-*: models trained from scratch whose scores are averaged (trak default 10, if-* 1 = the "
        "trained model only)",
    ),
]
El2nRepeat = Annotated[int | None, typer.Option("--el2n-repeat", help="el2n: early-trained models")]
LossType = Annotated[
    str,
    typer.Option(
        "--loss",
        help="cross_entropy (softmax) or sigmoid_bce (per-class sigmoid, the default of the GEX code of Kim et al. "
        "2023; gradient/ensemble methods only)",
    ),
]
GradChunk = Annotated[
    int | None,
    typer.Option(
        "--bs-jacs", help="examples per vmapped per-example gradient pass (default: as many as fit in memory-gb / 8)"
    ),
]
MemoryGb = Annotated[
    float,
    typer.Option(
        "--memory-gb", help="memory budget in GiB: score matrices larger than this go to a memory-mapped file"
    ),
]

Out = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="run directory to write (refused if it holds anything, unless --overwrite or --resume)"
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="empty --out first if it holds a modelsense run")]
Resume = Annotated[
    bool, typer.Option("--resume", help="continue (or extend) the run in --out; its stored settings must match")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


#: other names of an optimizer: the MPE code calls IVON `iblr`
OPTIMIZER_ALIASES = {"iblr": "ivon"}


def int_list(text: str | None, what: str) -> tuple[int, ...]:
    """The integers of the comma-separated `text` (() when empty or None); ConfigError naming `what` otherwise."""
    if not text:
        return ()
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def data_config(dataset: str, data_dir: Path | None, n_train: int | None, corruption_ratio: float,
                drop_classes: str, standardize: bool | None, data_seed: int) -> DataConfig:
    """The DataConfig of the data options (`--drop-classes` parsed into a tuple)."""
    return DataConfig(dataset, data_dir=None if data_dir is None else str(data_dir), n_train=n_train,
                      corruption_ratio=corruption_ratio, drop_classes=int_list(drop_classes, "--drop-classes"),
                      standardize=standardize, seed=data_seed)


def model_config(model: str, widths: str | None, activation: str | None, width: int | None, depth: int | None,
                 norm: str | None) -> ModelConfig:
    """The ModelConfig of the model options (`--widths` parsed; empty means the model's default)."""
    return ModelConfig(model, widths=int_list(widths, "--widths") or None, activation=activation, width=width,
                       depth=depth, norm=norm)


def train_config(optimizer: str, lr: float, lrmin: float, epochs: int, bs: int, delta: float, hess_init: float,
                 seed: int, device: str, fixed_batches: bool, checkpoint_epochs: str = "",
                 checkpoint_iterations: str = "") -> TrainConfig:
    """The TrainConfig of the training options (optimizer aliases resolved, checkpoint lists parsed)."""
    optimizer = OPTIMIZER_ALIASES.get(optimizer.lower(), optimizer.lower())
    return TrainConfig(optimizer=optimizer, lr=lr, lrmin=lrmin, epochs=epochs, bs=bs, delta=delta, hess_init=hess_init,
                       seed=seed, device=device, fixed_batches=fixed_batches,
                       checkpoint_epochs=int_list(checkpoint_epochs, "--checkpoint-epochs"),
                       checkpoint_iterations=int_list(checkpoint_iterations, "--checkpoint-iterations"))


def method_settings(num_ens: int | None, ft_lr: float | None, ft_step: int | None, ft_lr_sched: str | None,
                    gex_eps: float | None, proj_dim: int | None, damping: float | None, damping_mode: str | None,
                    matrix: str | None, arnoldi_rank: int | None, ensemble_models: int | None,
                    el2n_repeat: int | None, loss: str, bs_jacs: int | None, memory_gb: float) -> dict[str, Any]:
    """The attribution settings dict (names of `modelsense.attribution`; None = the method's default)."""
    if not (math.isfinite(memory_gb) and memory_gb > 0):
        raise ConfigError(f"--memory-gb must be > 0 (a budget in GiB), received {memory_gb:g}")
    for option, value in (("--num-ens", num_ens), ("--ft-step", ft_step), ("--proj-dim", proj_dim),
                          ("--arnoldi-rank", arnoldi_rank), ("--ensemble-models", ensemble_models),
                          ("--el2n-repeat", el2n_repeat), ("--bs-jacs", bs_jacs)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, received {value}")
    return {
        "num_ens": num_ens,
        "ft_lr": ft_lr,
        "ft_step": ft_step,
        "ft_lr_sched": ft_lr_sched,
        "gex_eps": gex_eps,
        "proj_dim": proj_dim,
        "damping": damping,
        "damping_mode": damping_mode,
        "matrix": matrix,
        "rank": arnoldi_rank,
        "n_models": ensemble_models,
        "el2n_repeat": el2n_repeat,
        "loss": loss,
        "chunk_size": bs_jacs,
        "memory_budget": max(1, int(memory_gb * 2**30)),
    }


# -- option groups -----------------------------------------------------------------------------
# Many commands take the same data / model / training / method options. `with_configs` adds a
# group's options to a command's signature (typer reads the signature) and hands the command what
# the group's builder makes of them (a config dataclass, a settings dict) instead, so each option
# is declared once. A group: parameter name -> (builder, [(option name, annotation, default), ...]).

Group = tuple[Callable[..., Any], list[tuple[str, Any, Any]]]

GROUPS: dict[str, Group] = {
    "data_cfg": (data_config, [("dataset", Dataset, "digits"), ("data_dir", DataDir, None), ("n_train", NTrain, None),
                               ("corruption_ratio", Corruption, 0.0), ("drop_classes", DropClasses, ""),
                               ("standardize", Standardize, None), ("data_seed", DataSeed, 0)]),
    "model_cfg": (model_config, [("model", Model, "mlp"), ("widths", Widths, None), ("activation", Activation, None),
                                 ("width", Width, None), ("depth", Depth, None), ("norm", Norm, None)]),
    "train_cfg": (train_config, [("optimizer", Optimizer, "sgd"), ("lr", Lr, 0.05), ("lrmin", LrMin, 0.0),
                                 ("epochs", Epochs, 30), ("bs", Bs, 64), ("delta", Delta, 1.0),
                                 ("hess_init", HessInit, 0.1), ("seed", Seed, 0), ("device", Device, "cpu"),
                                 ("fixed_batches", FixedBatches, False), ("checkpoint_epochs", CheckpointEpochs, ""),
                                 ("checkpoint_iterations", CheckpointIterations, "")]),
    "settings": (method_settings, [("num_ens", NumEns, None), ("ft_lr", FtLr, None), ("ft_step", FtStep, None),
                                   ("ft_lr_sched", FtLrSched, None), ("gex_eps", GexEps, None),
                                   ("proj_dim", ProjDim, None), ("damping", Damping, None),
                                   ("damping_mode", DampingMode, None), ("matrix", CurvatureMatrix, None),
                                   ("arnoldi_rank", ArnoldiRank, None), ("ensemble_models", EnsembleModels, None),
                                   ("el2n_repeat", El2nRepeat, None), ("loss", LossType, "cross_entropy"),
                                   ("bs_jacs", GradChunk, None), ("memory_gb", MemoryGb, 2.0)]),
}


_CONTEXT = "typer_context"


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

#: config field -> the option that sets it, where the names differ
_FIELD_OPTIONS = {"data_cfg": {"name": "dataset", "seed": "data_seed"}, "model_cfg": {"name": "model"}}
_RECIPE_GROUPS = {"data_cfg": "data", "model_cfg": "model", "train_cfg": "train"}


def recipe_configs(checkpoint: Path, configs: dict[str, Any], given: set[str],
                   table: Mapping[str, Group]) -> dict[str, Any]:
    """The data / model / training configs of a command scoring `checkpoint`: the recipe the
    checkpoint was made with (`experiments.train.checkpoint_recipe`) wherever an option was left at
    its default; an option given on the command line that contradicts the recipe is refused."""
    from dataclasses import fields, replace

    from modelsense.experiments.source import FREE_OF_RECIPE, checkpoint_recipe, recipe_differences

    recipe, _, _ = checkpoint_recipe(checkpoint)
    options_of = {g: {name for name, _, _ in table[g][1]} for g in configs}
    out: dict[str, Any] = {}
    for g, cfg in configs.items():
        group = _RECIPE_GROUPS.get(g)
        stored = getattr(recipe, group) if group else None
        if stored is None:
            continue
        keep = {}
        for f in fields(cfg):
            option = _FIELD_OPTIONS.get(g, {}).get(f.name, f.name)
            if f.name in FREE_OF_RECIPE[group] or (option in given and option in options_of[g]):
                keep[f.name] = getattr(cfg, f.name)
        out[g] = replace(stored, **keep)
    diff = recipe_differences(recipe, out.get("data_cfg"), out.get("model_cfg"), out.get("train_cfg"))
    if diff:
        listed = "; ".join(f"--{_FIELD_OPTIONS.get(g + '_cfg', {}).get(name, name).replace('_', '-')} {a!r} "
                           f"(the checkpoint's: {b!r})" for g, name, a, b in diff)
        raise ConfigError(f"--checkpoint {checkpoint} was made with another recipe: {listed}; a command scoring a "
                          "checkpoint uses the data, model and training recipe it was made with: drop these options")
    return out


def with_configs(*, groups: Mapping[str, Group] | None = None, omit: Iterable[str] = (), **defaults: object):
    """Decorator: replace the command's group parameters (`data_cfg`, `model_cfg`, `train_cfg`,
    `settings`, and those of `groups`) by the groups' options.

    Keyword arguments override option defaults for this command (e.g. `epochs=100`). `omit` names
    options the command does not offer: their builder argument stays at the (overridden) default,
    and the command may declare an option of that name itself.
    """
    import functools
    import inspect

    table = {**GROUPS, **(groups or {})}
    omit = frozenset(omit)

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        used = [g for g in table if g in sig.parameters]
        own = [p for p in sig.parameters.values() if p.name not in used]
        options = [opt for g in used for opt in table[g][1]]
        unknown = (set(defaults) | omit) - {name for name, _, _ in options}
        if unknown:
            raise TypeError(f"defaults or omit for unknown options {sorted(unknown)}")
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                   default=defaults.get(name, default))
                 for name, annotation, default in options if name not in omit]
        added.append(inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
        clash = {p.name for p in own} & {p.name for p in added}
        if clash:
            raise TypeError(
                f"options {sorted(clash)} are both the command's own and a group's; omit them from the group"
            )

        @functools.wraps(fn)
        def command(**kwargs):
            ctx = kwargs.pop(_CONTEXT, None)
            given = {name for name, _, default in options if name not in omit and name in kwargs
                     and (_given(ctx, name) if hasattr(ctx, "get_parameter_source")
                          else kwargs[name] != defaults.get(name, default))}
            for g in used:
                builder, opts = table[g]
                kwargs[g] = builder(**{name: defaults.get(name, default) if name in omit else kwargs.pop(name)
                                       for name, _, default in opts})
            if kwargs.get("checkpoint") is not None:
                kwargs.update(recipe_configs(kwargs["checkpoint"], {g: kwargs[g] for g in used}, given, table))
            return fn(**kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return command

    return decorate
