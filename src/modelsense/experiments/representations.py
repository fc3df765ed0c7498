"""`modelsense zoo`, `compare`, `stitch`: model zoos, layer x layer similarity, stitching sweeps.

Godfrey, Brown, Emerson and Kvinge (2022) compare independently trained networks of one
architecture layer by layer (CKA, Procrustes and their G_ReLU-invariant versions) and stitch them
(model A up to a ReLU -> a trained stitching layer -> model B after it). This module composes the
numerical library `modelsense.representations` into runs:

- Model zoo (`train_zoo`): N models of one architecture from different seeds, trained at once by
  the retraining engine (`train_ensemble` with all-True masks, stacked parameters) when the model
  has no batch norm and the optimizer is sgd/adam, else one by one with `fit`; either way model
  `seed` is the one `modelsense train --seed seed` trains (same init, same batch order; the engine
  equals `fit` to float rounding). Layout of a zoo root:
      <root>/zoo/model_<seed>.pt   checkpoints (`save_model` format, loadable with `load_model`)
      <root>/zoo/zoo.json          the data/model/training settings and each member's accuracies
  Members are reused when the settings match (everything but the seed and the device); a zoo
  trained with other settings is an error, not silently mixed.
- `compare_representations`: S[i, j] = similarity(ReLU layer i of A, ReLU layer j of B) on the
  test inputs. Every metric is reported as a *similarity* (larger = more alike, 1 = identical up to
  the metric's invariances): CKA variants as they are, Procrustes and G_ReLU-Procrustes as
  1 - distance, as the original; metrics.json also gives the distances of the Procrustes metrics.
- `stitching_sweep`: for every chosen layer and stitching kind, train only the stitching layer on
  the training set (both networks frozen, in eval mode) and report the stitched test accuracy and
  the stitching penalty = mean clean test accuracy of A and B - stitched test accuracy.

Run directories:
    zoo:     config.json, metrics.json (seeds, test_accuracy, ...), zoo/
    compare: config.json, metrics.json (matrix, diagonal, layers[, layers_b]), similarity.npy,
             figures/similarity_<metric>.png, zoo/ (members trained for --seed-a/--seed-b)
    stitch:  config.json, metrics.json (layers, stitched_accuracy, penalty, clean_accuracy),
             stitching.npz, stitching_layers.pt, figures/stitching_penalty.png, zoo/
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.source import check_checkpoint_data
from modelsense.models.checkpoint import load_model, save_model
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.progress import progress_bar
from modelsense.representations.features import extract_features, relu_module_names
from modelsense.representations.metrics import SIMILARITIES, similarity_matrix
from modelsense.representations.stitching import (
    BirkhoffStitch,
    LassoStitch,
    StitchConfig,
    evaluate_accuracy,
    stitch_models,
    stitching_penalty,
)
from modelsense.runs import RunDir, finished_metrics, locked, read_json, write_json
from modelsense.training import evaluate, fit, train_ensemble
from modelsense.training.config import TrainConfig

ZOO_SUBDIR = "zoo"
ZOO_INDEX = "zoo.json"
ZOO_METHODS = ("auto", "ensemble", "fit")
#: Metrics of `modelsense compare` (all similarities; see the module docstring).
COMPARE_METRICS = SIMILARITIES
#: What a reader needs to know to read a metric's values next to linear CKA's (printed by `compare`, in the demo).
METRIC_NOTES = {
    "relu-cka": "relu-cka is CKA of the kernel K_ab = max over channels k of (centred, unit-norm) channel k of example "
                "a times that of example b: it is invariant only to permuting and positively rescaling channels (the "
                "ReLU symmetry group), not to rotating them as linear CKA is, so two networks whose representations "
                "agree up to a rotation (linear CKA near 1) but whose single neurons do not match one to one score "
                "much lower (on random ReLU features of 64 channels a randomly rotated copy scores about 0.33 while its "
                "linear CKA is 1; a permuted and positively rescaled copy scores exactly 1).",
    "relu-procrustes": "relu-procrustes aligns the two layers' unit-norm channels by the best permutation only "
                       "(no rotation), so it is below procrustes (best rotation) unless single neurons match one to one.",
}
#: Training settings that do not change the trained parameters (ignored when reusing a zoo).
_NOT_IN_ZOO_KEY = ("seed", "device", "checkpoint_epochs", "checkpoint_iterations", "eval_every", "extra")


# ----------------------------------------------------------------------------------------------
# Model zoo
# ----------------------------------------------------------------------------------------------


@dataclass
class ZooResult:
    """Members of a zoo (in the order of `seeds`).

    Attributes:
        seeds: init / batch-order seed of each member.
        paths: checkpoint of each member (`<root>/zoo/model_<seed>.pt`).
        test_accuracy, train_accuracy: clean accuracies of each member.
        trained: the seeds trained by this call (the others were reused).
        method: "ensemble" (vmapped engine), "fit" (one by one) or "reused" (nothing trained).
        seconds: training time of this call.
    """

    seeds: list[int]
    paths: list[Path]
    test_accuracy: list[float]
    train_accuracy: list[float]
    trained: list[int] = field(default_factory=list)
    method: str = "reused"
    seconds: float = 0.0


def zoo_member_path(root: str | Path, seed: int) -> Path:
    """Checkpoint path of the zoo member with `seed` under the zoo root `root`."""
    return Path(root) / ZOO_SUBDIR / f"model_{int(seed)}.pt"


def zoo_settings(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define a zoo's members (all but the seed), as plain JSON values."""
    train = {k: v for k, v in train_cfg.to_dict().items() if k not in _NOT_IN_ZOO_KEY}
    return json.loads(json.dumps({"data": data_cfg.to_dict(), "model": asdict(model_cfg), "train": train}))


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _read_index(root: Path) -> dict[str, Any] | None:
    path = root / ZOO_SUBDIR / ZOO_INDEX
    return read_json(path) if path.exists() else None


def _check_index(root: Path, index: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    if index is None:
        return
    for key in ("data", "model", "train"):
        if index.get(key) != settings[key]:
            raise ConfigError(
                f"the zoo in {root / ZOO_SUBDIR} was trained with {key} settings {index.get(key)}, but this run "
                f"asks for {settings[key]}; use the zoo's settings, or another --zoo / --out"
            )


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds must be integers, got {list(seeds)!r}") from None
    if not out:
        raise ConfigError("a zoo needs at least one seed (--n-models >= 1)")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct, got {out}")
    if any(s < 0 for s in out):
        raise ConfigError(f"seeds must be >= 0, got {out}")
    return out


def train_zoo(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    n_models: int | None,
    out: str | Path,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
    *,
    data: Dataset | None = None,
    method: str = "auto",
    chunk_models: int | None = None,
) -> ZooResult:
    """Train (or reuse) the zoo members `seeds` under the zoo root `out`.

    Model `s` is `build_model_from_config(model_cfg, ..., seed=s)` trained with `train_cfg` but seed
    `s` (init and batch order), on the whole training set of `data_cfg`: exactly what
    `modelsense train --seed s` trains.

    Args:
        n_models: number of members; seeds default to train_cfg.seed + 0, ..., n_models - 1.
        seeds: explicit seeds (then n_models may be None; if given it must equal len(seeds)).
        data: the loaded dataset of `data_cfg` (loaded here if None).
        method: "auto" (the engine unless the model has batch norm or the optimizer is ivon),
            "ensemble" or "fit".
        chunk_models: models trained together in one vmapped chunk (default: all).
    Returns:
        a `ZooResult`; checkpoints in `<out>/zoo/model_<seed>.pt`, accuracies in `<out>/zoo/zoo.json`.
    """
    if method not in ZOO_METHODS:
        raise ConfigError(f"unknown zoo training method {method!r}; expected one of {ZOO_METHODS}")
    if seeds is None:
        if n_models is None or n_models < 1:
            raise ConfigError(f"--n-models must be >= 1, got {n_models}")
        seeds = [train_cfg.seed + i for i in range(n_models)]
    seeds = _check_seeds(seeds)
    if n_models is not None and n_models != len(seeds):
        raise ConfigError(f"got n_models={n_models} but {len(seeds)} seeds {seeds}")
    root = Path(out)
    data = load_dataset_from_config(data_cfg) if data is None else data
    settings = zoo_settings(data_cfg, model_cfg, train_cfg)
    index = _read_index(root)
    _check_index(root, index, settings)
    members: dict[str, dict[str, Any]] = dict(index["members"]) if index else {}
    todo = [s for s in seeds if str(s) not in members or not zoo_member_path(root, s).exists()]

    used, start = "reused", time.perf_counter()
    if todo:
        def make(seed: int) -> nn.Module:
            return build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=seed)

        bn = has_batch_norm(make(todo[0]))
        if method == "ensemble" and (bn or train_cfg.optimizer == "ivon"):
            raise ConfigError(
                "the retraining engine cannot train this zoo "
                f"({'the model has batch norm' if bn else 'the optimizer is ivon'}); use method 'fit' or 'auto'"
            )
        used = "fit" if method == "fit" or (method == "auto" and (bn or train_cfg.optimizer == "ivon")) else "ensemble"
        (root / ZOO_SUBDIR).mkdir(parents=True, exist_ok=True)

        def write_index() -> None:
            write_json(root / ZOO_SUBDIR / ZOO_INDEX, {**settings, "dataset": data.summary(), "members": members})

        if used == "ensemble":
            n = len(data.x_train)
            res = train_ensemble(
                make, data.x_train, data.y_train, torch.ones(len(todo), n, dtype=torch.bool), train_cfg,
                seeds=todo, queries={"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)},
                chunk_models=chunk_models, keep_logits=False, return_params=True, progress=progress,
            )
            for m, seed in enumerate(todo):
                module = make(seed)
                state = module.state_dict()
                state.update({k: v[m] for k, v in res.params.items()})
                module.load_state_dict(state)
                save_model(zoo_member_path(root, seed), module.eval(), model_cfg, data, seed)
                members[str(seed)] = {
                    "test_accuracy": float(res.outputs["test"]["correct"][m].float().mean()),
                    "train_accuracy": float(res.outputs["train"]["correct"][m].float().mean()),
                }
        else:
            for seed in todo:
                module = make(seed)
                cfg = dataclasses.replace(train_cfg, seed=seed, eval_every=0)
                fit(module, data, cfg, progress=progress)
                module = module.cpu().eval()
                save_model(zoo_member_path(root, seed), module, model_cfg, data, seed)
                members[str(seed)] = {
                    "test_accuracy": evaluate(module, data.x_test, data.y_test)["accuracy"],
                    "train_accuracy": evaluate(module, data.x_train, data.y_train)["accuracy"],
                }
                write_index()  # after each member: an interrupted zoo keeps what it finished
        write_index()
    return ZooResult(
        seeds=seeds,
        paths=[zoo_member_path(root, s) for s in seeds],
        test_accuracy=[members[str(s)]["test_accuracy"] for s in seeds],
        train_accuracy=[members[str(s)]["train_accuracy"] for s in seeds],
        trained=todo,
        method=used,
        seconds=time.perf_counter() - start,
    )


def run_zoo(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *,
            n_models: int = 8, seeds: Sequence[int] | None = None, method: str = "auto",
            chunk_models: int | None = None, progress: bool = True, resume: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
    """`modelsense zoo`: train the zoo in `out` (`resume`: reusing the members already there); write config
    and metrics."""
    if method not in ZOO_METHODS:
        raise ConfigError(f"unknown zoo training method {method!r}; expected one of {ZOO_METHODS}")
    if seeds is None and n_models < 1:
        raise ConfigError(f"--n-models must be >= 1, got {n_models}")
    if seeds is not None:
        _check_seeds(seeds)
    data = load_dataset_from_config(data_cfg)
    _probe_model(data, model_cfg)  # validates the model options
    settings = zoo_settings(data_cfg, model_cfg, train_cfg)
    config = {**settings, "dataset": data.summary(), "n_models": None if seeds else n_models,
              "seeds": list(seeds) if seeds else None, "method": method, "seed": train_cfg.seed}
    with RunDir.open(out, "zoo", config, resume=resume, overwrite=overwrite, keep=(ZOO_SUBDIR,),
                     resume_keys=["data", "model", "train"]) as run:
        _check_index(run.path, _read_index(run.path), settings)
        return _zoo(run, data, data_cfg, model_cfg, train_cfg, n_models, seeds, method, chunk_models, progress)


def _zoo(run: RunDir, data: Dataset, data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
         n_models: int, seeds: Sequence[int] | None, method: str, chunk_models: int | None,
         progress: bool) -> dict[str, Any]:
    zoo = train_zoo(data_cfg, model_cfg, train_cfg, None if seeds else n_models, run.path, seeds, progress,
                    data=data, method=method, chunk_models=chunk_models)
    acc = np.asarray(zoo.test_accuracy)
    metrics = {
        "seeds": zoo.seeds,
        "test_accuracy": zoo.test_accuracy,
        "train_accuracy": zoo.train_accuracy,
        "mean_test_accuracy": float(acc.mean()),
        "std_test_accuracy": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "n_trained": len(zoo.trained),
        "method": zoo.method,
        "seconds": zoo.seconds,
        "paths": [str(p) for p in zoo.paths],
    }
    run.log(f"zoo of {len(zoo.seeds)} ({len(zoo.trained)} trained by {zoo.method}) in {zoo.seconds:.1f}s")
    run.write_metrics(metrics)
    return metrics


# ----------------------------------------------------------------------------------------------
# Resolving the two models of a comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A network to compare or stitch, with where it came from."""

    module: nn.Module
    source: str  # checkpoint path
    seed: int | None
    dataset: str
    model: dict[str, Any]


def resolve_models(
    data: Dataset,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    model_a: str | Path | None = None,
    model_b: str | Path | None = None,
    seed_a: int | None = None,
    seed_b: int | None = None,
    zoo: str | Path,
    progress: bool = True,
) -> tuple[LoadedModel, LoadedModel]:
    """Models A and B: a checkpoint (`model_a` path) or a zoo member (`seed_a`, trained into `zoo`
    if missing, with `model_cfg`/`train_cfg`). Neither given: seeds train_cfg.seed and +1.
    Both models must have been trained on `data`'s dataset (ConfigError otherwise)."""
    _check_sources(model_a, model_b, seed_a, seed_b)
    if model_a is None and seed_a is None:
        seed_a = train_cfg.seed
    if model_b is None and seed_b is None:
        seed_b = train_cfg.seed + 1 if seed_a == train_cfg.seed else train_cfg.seed
    paths = {which: Path(path) for which, path in (("model-a", model_a), ("model-b", model_b)) if path is not None}
    seeds = sorted({s for s in (seed_a, seed_b) if s is not None})
    if seeds:
        zoo_res = train_zoo(data_cfg, model_cfg, train_cfg, None, zoo, seeds, progress, data=data)
        for which, seed in (("model-a", seed_a), ("model-b", seed_b)):
            if seed is not None:
                paths[which] = zoo_res.paths[zoo_res.seeds.index(seed)]
    return _load_source("model-a", paths["model-a"], data), _load_source("model-b", paths["model-b"], data)


def _check_sources(model_a, model_b, seed_a, seed_b) -> None:
    if model_a is not None and seed_a is not None:
        raise ConfigError("give either --model-a PATH or --seed-a N, not both")
    if model_b is not None and seed_b is not None:
        raise ConfigError("give either --model-b PATH or --seed-b N, not both")


def _load_source(which: str, path: Path, data: Dataset) -> LoadedModel:
    """The checkpoint of model A or B (`which`), checked against `data`."""
    if not path.is_file():
        raise ConfigError(f"--{which} {path}: no such checkpoint (a model.pt of `modelsense train` or "
                          "zoo/model_<seed>.pt of `modelsense zoo`)")
    module, info = load_model(path)
    check_checkpoint_data(info, data, f"{which} ({path})",
                          fix="compare and stitch models trained on the same dataset, and pass that dataset")
    return LoadedModel(module.eval(), str(path), info.get("seed"), info["dataset"], info["model"])


def _layer_list(text: str | Sequence[str] | None) -> list[str] | None:
    """None / "all" -> None (every ReLU); "a,b" or a sequence -> names."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    names = [n for n in names if n]
    if not names or names == ["all"]:
        return None
    return names


def choose_layers(module: nn.Module, layers: str | Sequence[str] | None, which: str = "model") -> list[str]:
    """The layer names to use in `module`: every nn.ReLU module (None / "all"), or the given names,
    each checked to exist (ConfigError listing the available ReLU layers otherwise)."""
    relus = relu_module_names(module)
    names = _layer_list(layers)
    modules = dict(module.named_modules())
    if names is None:
        if not relus:
            raise ConfigError(
                f"{which} ({type(module).__name__}) has no nn.ReLU module; name the layers to use with --layers "
                f"(module names: {', '.join(n for n in modules if n)})"
            )
        return relus
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise ConfigError(
            f"layer(s) {', '.join(repr(n) for n in missing)} not found in {which} ({type(module).__name__}); "
            f"available ReLU layers: {', '.join(relus) or 'none'} (any module name also works: "
            f"{', '.join(n for n in modules if n)})"
        )
    return names


def _probe_model(data: Dataset, model_cfg: ModelConfig) -> nn.Module:
    return build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=0)


def subsample_indices(n: int, n_examples: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded random subset of size min(n_examples, n) of range(n) (all if None)."""
    if n_examples is None or n_examples >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: int(n_examples)].sort().values


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------


def _check_metric(metric: str) -> str:
    m = str(metric).lower()
    if m not in COMPARE_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {', '.join(COMPARE_METRICS)}")
    return m


def compare_representations(
    model_a: nn.Module,
    model_b: nn.Module,
    x: Tensor,
    metric: str = "cka",
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """Layer x layer similarity of two networks on the inputs x (n, *input shape).

        S[i, j] = metric(features of layer i of A on x, features of layer j of B on x),

    features = the outputs of the named modules (default every nn.ReLU, in module order), shape
    (n, *layer output shape); see `modelsense.representations.metrics.similarity_matrix` for each
    metric (every one a similarity: 1 = identical up to its invariances). `options` go to the metric.

    Returns:
        {"matrix": (L_a, L_b) ndarray, "layers": names of A's layers, "layers_b": names of B's}.
    """
    metric = _check_metric(metric)
    names_a = choose_layers(model_a, layers_a, "model-a")
    names_b = choose_layers(model_b, layers_b if layers_b is not None else layers_a, "model-b")
    fa = extract_features(model_a.to(device), x, names_a, batch_size=batch_size, out_device=device)
    fb = extract_features(model_b.to(device), x, names_b, batch_size=batch_size, out_device=device)
    matrix = similarity_matrix(fa, fb, metric, **options)
    return {"matrix": matrix, "layers": list(fa), "layers_b": list(fb)}


def _comparison_data(data_cfg: DataConfig, model_cfg: ModelConfig, model_a, model_b, seed_a, seed_b, layers) -> Dataset:
    """The dataset of `compare` / `stitch`, after checking what can be checked before anything is
    written or trained: the model sources (`_check_sources`, and each checkpoint against the data)
    and the layer names on the architecture of the zoo members."""
    data = load_dataset_from_config(data_cfg)
    _check_sources(model_a, model_b, seed_a, seed_b)
    for which, path in (("model-a", model_a), ("model-b", model_b)):
        if path is not None:
            _load_source(which, Path(path), data)
    if (model_a is None or model_b is None) and layers is not None:
        choose_layers(_probe_model(data, model_cfg), layers, f"model {model_cfg.name}")
    return data


def _models_and_layers(data, data_cfg, model_cfg, train_cfg, out, model_a, model_b, seed_a, seed_b, zoo, layers, *,
                       same_layers: bool, progress: bool):
    """(zoo, model A, model B, A's layer names) of `compare` / `stitch`, training the zoo members they
    need (into `zoo`, default `out`; a zoo elsewhere is locked while they train); the layer names are
    checked on both models (B on A's names when `same_layers`, else on `layers`)."""
    zoo = Path(out) if zoo is None else Path(zoo)
    inside = zoo.resolve() == Path(out).resolve()
    with contextlib.nullcontext() if inside or (model_a is not None and model_b is not None) else locked(zoo, "zoo"):
        a, b = resolve_models(data, data_cfg, model_cfg, train_cfg, model_a=model_a, model_b=model_b, seed_a=seed_a,
                              seed_b=seed_b, zoo=zoo, progress=progress)
    names = choose_layers(a.module, layers, "model-a")
    choose_layers(b.module, names if same_layers else layers, "model-b")
    return zoo, a, b, names


def run_compare(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out: str | Path,
    *,
    model_a: str | Path | None = None,
    model_b: str | Path | None = None,
    seed_a: int | None = None,
    seed_b: int | None = None,
    metric: str = "cka",
    n_examples: int | None = None,
    layers: str | Sequence[str] | None = None,
    zoo: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`modelsense compare`: similarity matrix of two models on the test set (see module docstring).

    `n_examples` subsamples the test set (seeded by the data seed) for the n x n kernel metrics;
    `zoo` is the zoo root holding/receiving the seed-trained members (default `out`).
    """
    metric = _check_metric(metric)
    min_n = 4 if metric in ("unbiased-cka", "relu-cka") else 2
    if n_examples is not None and n_examples < min_n:
        raise ConfigError(f"--n-examples must be >= {min_n} for metric {metric}, got {n_examples}")
    data = _comparison_data(data_cfg, model_cfg, model_a, model_b, seed_a, seed_b, layers)
    config = {"data": data_cfg.to_dict(), "model": asdict(model_cfg), "train": train_cfg.to_dict(),
              "dataset": data.summary(), "model_a": model_a, "model_b": model_b, "seed_a": seed_a, "seed_b": seed_b,
              "metric": metric, "n_examples": n_examples, "layers": _layer_list(layers),
              "zoo": str(Path(out) if zoo is None else zoo), "seed": train_cfg.seed}
    with RunDir.open(out, "compare", config, overwrite=overwrite) as run:
        return _compare(run, data, data_cfg, model_cfg, train_cfg, model_a, model_b, seed_a, seed_b, metric, n_examples,
                        layers, zoo, progress)


def _compare(run: RunDir, data: Dataset, data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
             model_a, model_b, seed_a, seed_b, metric: str, n_examples: int | None, layers, zoo,
             progress: bool) -> dict[str, Any]:
    zoo, a, b, _ = _models_and_layers(data, data_cfg, model_cfg, train_cfg, run.path, model_a, model_b, seed_a, seed_b,
                                      zoo, layers, same_layers=False, progress=progress)
    idx = subsample_indices(data.n_test, n_examples, data_cfg.seed)
    x = data.x_test[idx]
    start = time.perf_counter()
    res = compare_representations(a.module, b.module, x, metric, _layer_list(layers), device=train_cfg.device)
    seconds = time.perf_counter() - start
    matrix = res["matrix"]
    run.save_array("similarity", matrix)
    label_a = f"A (seed {a.seed})" if a.seed is not None else "A"
    label_b = f"B (seed {b.seed})" if b.seed is not None else "B"
    run.save_figure(similarity_heatmap(matrix, res["layers"], res["layers_b"], f"{metric} on {data.name}",
                                       label_a, label_b), f"similarity_{metric}")
    metrics: dict[str, Any] = {
        "metric": metric,
        "value": "similarity",
        "matrix": matrix.tolist(),
        "diagonal": np.diagonal(matrix).tolist(),
        "layers": res["layers"],
        "n_examples": int(len(idx)),
        "model_a": a.source,
        "model_b": b.source,
        "clean_accuracy": [evaluate_accuracy(a.module, data.x_test, data.y_test),
                           evaluate_accuracy(b.module, data.x_test, data.y_test)],
        "seconds": seconds,
    }
    if res["layers_b"] != res["layers"]:
        metrics["layers_b"] = res["layers_b"]
    if metric in ("procrustes", "relu-procrustes"):
        metrics["diagonal_distance"] = (1.0 - np.diagonal(matrix)).tolist()
    run.write_metrics(metrics)
    run.log(f"{metric} diagonal {np.round(np.diagonal(matrix), 4).tolist()} in {seconds:.1f}s")
    return metrics


# ----------------------------------------------------------------------------------------------
# stitch
# ----------------------------------------------------------------------------------------------


def parse_kinds(kinds: str | Sequence[str]) -> list[str]:
    """"linear,permutation" or a sequence -> distinct kind names (checked by StitchConfig)."""
    items = [k.strip().lower() for k in kinds.split(",")] if isinstance(kinds, str) else [str(k).lower() for k in kinds]
    items = list(dict.fromkeys(k for k in items if k))
    if not items:
        raise ConfigError("--kind needs at least one stitching kind (linear, birkhoff, permutation, lowrank, lasso)")
    for k in items:
        StitchConfig(kind=k)  # raises ConfigError for an unknown kind
    return items


@dataclass
class StitchSweep:
    """Results of `stitching_sweep`: per kind, lists over `layers`.

    Attributes:
        clean_accuracy: (accuracy of A, accuracy of B) on the evaluation set.
        stitched_accuracy, penalty, final_loss, seconds: kind -> list over layers; penalty =
            mean(clean_accuracy) - stitched accuracy; final_loss = last epoch's mean training loss
            (cross-entropy + the layer's penalty term).
        extra: kind -> list over layers of per-layer extras (lasso: sparsity = fraction |W| <= 1e-3;
            birkhoff/permutation: the Hungarian permutation and the scales).
        states: (kind, layer) -> state dict of the trained stitching layer.
    """

    layers: list[str]
    kinds: list[str]
    clean_accuracy: tuple[float, float]
    stitched_accuracy: dict[str, list[float]] = field(default_factory=dict)
    penalty: dict[str, list[float]] = field(default_factory=dict)
    final_loss: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    states: dict[tuple[str, str], dict[str, Tensor]] = field(default_factory=dict)


def stitching_sweep(
    model_a: nn.Module,
    model_b: nn.Module,
    layers: Sequence[str],
    configs: Sequence[StitchConfig],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    progress: bool = True,
) -> StitchSweep:
    """Stitch A into B at every layer in `layers` with every config (one per kind), train the
    stitching layer on (x_train, y_train) (`stitch_models`: networks frozen, eval mode) and measure
    the stitched accuracy on (x_test, y_test) and the stitching penalty
        penalty = (acc(A) + acc(B)) / 2 - acc(stitched).
    """
    kinds = [c.kind for c in configs]
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"one config per stitching kind, got kinds {kinds}")
    model_a.eval()
    model_b.eval()
    device = configs[0].device if configs else "cpu"
    acc_a = evaluate_accuracy(model_a.to(device), x_test, y_test)
    acc_b = evaluate_accuracy(model_b.to(device), x_test, y_test)
    sweep = StitchSweep(list(layers), kinds, (acc_a, acc_b))
    with progress_bar(len(configs) * len(layers), "stitching", enabled=progress) as bar:
        for cfg in configs:
            for key in ("stitched_accuracy", "penalty", "final_loss", "seconds", "extra"):
                getattr(sweep, key)[cfg.kind] = []
            for layer in layers:
                start = time.perf_counter()
                stitched, hist = stitch_models(model_a, model_b, layer, x_train, y_train, cfg)
                acc = evaluate_accuracy(stitched, x_test, y_test)
                sweep.stitched_accuracy[cfg.kind].append(acc)
                sweep.penalty[cfg.kind].append(stitching_penalty(acc_a, acc_b, acc))
                sweep.final_loss[cfg.kind].append(hist.loss[-1] if hist.loss else float("nan"))
                sweep.seconds[cfg.kind].append(time.perf_counter() - start)
                layer_mod = stitched.stitch
                extra: dict[str, Any] = {}
                if isinstance(layer_mod, LassoStitch):
                    extra["sparsity"] = layer_mod.sparsity()
                if isinstance(layer_mod, BirkhoffStitch):
                    extra["permutation"] = layer_mod.permutation().tolist()
                    extra["perm_entropy_rows"] = _row_entropy(layer_mod.perm.detach())
                sweep.extra[cfg.kind].append(extra)
                sweep.states[(cfg.kind, layer)] = {k: v.detach().cpu().clone() for k, v in layer_mod.state_dict().items()}
                bar.advance(1, description=f"stitching {cfg.kind} at {layer}")
    return sweep


def _row_entropy(w: Tensor) -> float:
    """Mean entropy (nats) of the rows of a nonnegative matrix (0 for a permutation)."""
    p = w.clamp_min(0) / w.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())


def run_stitch(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out: str | Path,
    *,
    kinds: str | Sequence[str] = "linear",
    stitch_cfg: StitchConfig | None = None,
    layers: str | Sequence[str] | None = None,
    model_a: str | Path | None = None,
    model_b: str | Path | None = None,
    seed_a: int | None = None,
    seed_b: int | None = None,
    zoo: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`modelsense stitch`: stitching sweep over layers and kinds (see module docstring).

    `stitch_cfg` holds the shared stitching settings (its `kind` is replaced by each of `kinds`;
    its device by train_cfg.device). metrics.json: `layers`, `kinds`, `clean_accuracy` [A, B],
    `mean_clean_accuracy`, and `stitched_accuracy` / `penalty`: a list over layers when one kind is
    given, a dict kind -> list otherwise; `by_kind` always holds the dict form.
    """
    kinds = parse_kinds(kinds)
    base = dataclasses.replace(stitch_cfg or StitchConfig(), device=train_cfg.device)
    configs = [dataclasses.replace(base, kind=k) for k in kinds]
    data = _comparison_data(data_cfg, model_cfg, model_a, model_b, seed_a, seed_b, layers)
    config = {"data": data_cfg.to_dict(), "model": asdict(model_cfg), "train": train_cfg.to_dict(),
              "dataset": data.summary(), "model_a": model_a, "model_b": model_b, "seed_a": seed_a, "seed_b": seed_b,
              "kinds": kinds, "stitch": asdict(base), "layers": _layer_list(layers),
              "zoo": str(Path(out) if zoo is None else zoo), "seed": train_cfg.seed}
    with RunDir.open(out, "stitch", config, overwrite=overwrite) as run:
        return _stitch(run, data, data_cfg, model_cfg, train_cfg, kinds, configs, model_a, model_b, seed_a, seed_b,
                       layers, zoo, progress)


def _stitch(run: RunDir, data: Dataset, data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
            kinds: list[str], configs: list[StitchConfig], model_a, model_b, seed_a, seed_b, layers, zoo,
            progress: bool) -> dict[str, Any]:
    zoo, a, b, names = _models_and_layers(data, data_cfg, model_cfg, train_cfg, run.path, model_a, model_b, seed_a,
                                          seed_b, zoo, layers, same_layers=True, progress=progress)
    start = time.perf_counter()
    sweep = stitching_sweep(a.module, b.module, names, configs, data.x_train, data.y_train, data.x_test, data.y_test,
                            progress=progress)
    seconds = time.perf_counter() - start
    single = len(kinds) == 1
    by_kind = {k: {"stitched_accuracy": sweep.stitched_accuracy[k], "penalty": sweep.penalty[k],
                   "final_loss": sweep.final_loss[k], "seconds": sweep.seconds[k], "extra": sweep.extra[k]}
               for k in kinds}
    metrics: dict[str, Any] = {
        "layers": names,
        "kinds": kinds,
        "stitched_accuracy": sweep.stitched_accuracy[kinds[0]] if single else sweep.stitched_accuracy,
        "penalty": sweep.penalty[kinds[0]] if single else sweep.penalty,
        "clean_accuracy": list(sweep.clean_accuracy),
        "mean_clean_accuracy": float(np.mean(sweep.clean_accuracy)),
        "mean_penalty": {k: float(np.mean(sweep.penalty[k])) for k in kinds},
        "by_kind": by_kind,
        "model_a": a.source,
        "model_b": b.source,
        "seconds": seconds,
    }
    run.save_arrays("stitching", layers=np.asarray(names), kinds=np.asarray(kinds),
                    clean_accuracy=np.asarray(sweep.clean_accuracy),
                    stitched_accuracy=np.asarray([sweep.stitched_accuracy[k] for k in kinds]),
                    penalty=np.asarray([sweep.penalty[k] for k in kinds]))
    run.save_torch("stitching_layers", {f"{k}/{layer}": s for (k, layer), s in sweep.states.items()})
    run.save_figure(stitching_penalty_figure(names, sweep.penalty, sweep.stitched_accuracy, sweep.clean_accuracy,
                                             f"stitching A -> B on {data.name}"),
                    "stitching_penalty")
    run.write_metrics(metrics)
    run.log(f"stitching penalties {metrics['mean_penalty']} in {seconds:.1f}s")
    return metrics


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def similarity_heatmap(matrix: np.ndarray, layers_a: Sequence[str], layers_b: Sequence[str], title: str = "",
                       label_a: str = "A", label_b: str = "B"):
    """Heatmap of a layer x layer similarity matrix (rows: A's layers, columns: B's), colour scale [0, 1]."""
    from modelsense.experiments import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    la, lb = len(layers_a), len(layers_b)
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * max(lb, 3), 1.2 + 0.5 * max(la, 3)))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    ax.set_xticks(range(lb), list(layers_b), rotation=45, ha="right")
    ax.set_yticks(range(la), list(layers_a))
    ax.set_xlabel(f"layer of {label_b}")
    ax.set_ylabel(f"layer of {label_a}")
    if la * lb <= 144:
        for i in range(la):
            for j in range(lb):
                v = matrix[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="similarity")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def stitching_penalty_figure(layers: Sequence[str], penalty: dict[str, Sequence[float]],
                             stitched_accuracy: dict[str, Sequence[float]], clean_accuracy: Sequence[float],
                             title: str = ""):
    """Penalty by layer (one line per kind, as the paper's figure) and stitched accuracy by layer."""
    from modelsense.experiments import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    x = np.arange(len(layers))
    fig, (ax_p, ax_a) = plt.subplots(1, 2, figsize=(max(7.0, 2.5 + 0.9 * len(layers) * 2), 3.4))
    for kind, values in penalty.items():
        ax_p.plot(x, values, marker="o", label=kind)
        ax_a.plot(x, stitched_accuracy[kind], marker="o", label=kind)
    ax_p.axhline(0.0, color="gray", lw=0.8)
    for acc, style, name in zip(clean_accuracy, ("--", ":"), ("A", "B")):
        ax_a.axhline(acc, color="gray", ls=style, lw=0.9, label=f"clean {name}")
    for ax, ylabel in ((ax_p, "stitching penalty"), (ax_a, "stitched test accuracy")):
        ax.set_xticks(x, list(layers), rotation=30 if len(layers) > 4 else 0)
        ax.set_xlabel("stitched after layer")
        ax.set_ylabel(ylabel)
    ax_p.legend()
    ax_a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------


def representations_section(out: Path, progress: bool, resume: bool = False) -> "Section":  # noqa: F821
    """Demo: CKA of two digits MLPs (seeds 0, 1) and stitching penalties at both hidden layers."""
    from modelsense.experiments.report import Section

    root = Path(out) / "representations"
    data_cfg, model_cfg, train_cfg = DataConfig("digits"), ModelConfig("mlp"), TrainConfig()
    cmp = (resume and finished_metrics(root / "compare")) or run_compare(
        data_cfg, model_cfg, train_cfg, root / "compare", seed_a=0, seed_b=1, metric="cka", zoo=root, progress=progress,
        overwrite=True)
    relu = (resume and finished_metrics(root / "compare_relu_cka")) or run_compare(
        data_cfg, model_cfg, train_cfg, root / "compare_relu_cka", seed_a=0, seed_b=1, metric="relu-cka", zoo=root,
        progress=progress, overwrite=True)
    st = (resume and finished_metrics(root / "stitch")) or run_stitch(
        data_cfg, model_cfg, train_cfg, root / "stitch", kinds="linear,permutation", seed_a=0, seed_b=1,
        stitch_cfg=StitchConfig(lr=1e-2), zoo=root, progress=progress, overwrite=True)
    metrics: dict[str, Any] = {"clean_accuracy": [round(v, 4) for v in st["clean_accuracy"]]}
    for i, layer in enumerate(cmp["layers"]):
        metrics[f"cka {layer}"] = cmp["diagonal"][i]
    for i, layer in enumerate(relu["layers"]):
        metrics[f"relu-cka {layer}"] = relu["diagonal"][i]
    for k in st["kinds"]:
        for layer, p in zip(st["layers"], st["penalty"][k]):
            metrics[f"penalty {k} {layer}"] = p
    return Section(
        "Representations: CKA and stitching of two MLPs trained from different seeds",
        "Linear CKA between every pair of ReLU layers of two digits MLPs (64-128-128-10) that differ only in "
        "their seed, on the test set (1 = identical up to rotation and scale). " + METRIC_NOTES["relu-cka"] + " "
        "Stitching: model A up to a ReLU, "
        "a trained 128x128 layer, then model B; penalty = mean clean accuracy - stitched accuracy. 'linear' is an "
        "unconstrained matrix, 'permutation' a permutation times a positive diagonal (the ReLU symmetry group "
        "G_ReLU, Godfrey et al. 2022), trained on the Birkhoff polytope and rounded by the Hungarian algorithm. "
        "Stitching layers train for 20 epochs with plain SGD at lr 0.01 (the default of Godfrey et al. 2022's code for G_ReLU layers).",
        metrics,
        [root / "compare" / "figures" / "similarity_cka.png", root / "stitch" / "figures" / "stitching_penalty.png"],
        str(root),
    )


__all__ = [
    "COMPARE_METRICS",
    "METRIC_NOTES",
    "LoadedModel",
    "StitchSweep",
    "ZooResult",
    "choose_layers",
    "compare_representations",
    "parse_kinds",
    "representations_section",
    "resolve_models",
    "run_compare",
    "run_stitch",
    "run_zoo",
    "similarity_heatmap",
    "stitching_penalty_figure",
    "stitching_sweep",
    "subsample_indices",
    "train_zoo",
    "zoo_member_path",
    "zoo_settings",
]
