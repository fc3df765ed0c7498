"""A model zoo: N models of one architecture from different seeds, kept in a folder and reused.

Model `seed` of a zoo is `build_model_from_config(model_cfg, ..., seed=seed)` trained with the zoo's
training settings but seed `seed` (init and batch order) on the whole training set: exactly what
`modelsense train --seed seed` trains. When the model has no batch norm and the optimizer is
sgd/adam/adamw, members are jobs of the ground-truth store (`modelsense.retraining.store`: the job
(all examples, seed) of the recipe with `params=True`, trained by the vmapped engine locally or on
Ray, kept chunk by chunk with their parameters and reused by every zoo on the same store); else they
are trained one by one with `fit`, in this process. The engine equals `fit` to float rounding.

Layout of a zoo root:
    <root>/store/                the ground-truth store (default; `RetrainOptions.store` puts it elsewhere)
    <root>/zoo/model_<seed>.pt   checkpoints (`save_model` format, loadable with `load_model`)
    <root>/zoo/zoo.json          the data/model/training settings and each member's accuracies
Members are reused when the settings match (everything but the seed and the device); a zoo trained
with other settings is refused, never silently mixed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import save_model
from modelsense.retraining.store import GroundTruthStore, Job, RetrainOptions, RetrainRecipe, job_parameters, train_jobs
from modelsense.runs import read_json, write_json
from modelsense.training import evaluate, fit
from modelsense.training.config import TrainConfig

ZOO_SUBDIR = "zoo"
ZOO_INDEX = "zoo.json"
ZOO_METHODS = ("auto", "ensemble", "fit")
#: Training settings that do not change the trained parameters (ignored when reusing a zoo).
_NOT_IN_ZOO_KEY = ("seed", "device", "checkpoint_epochs", "checkpoint_iterations", "eval_every", "extra")


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

    def metrics(self) -> dict[str, Any]:
        """The zoo as `modelsense zoo` reports it: seeds, accuracies, their mean and standard deviation
        over the members (ddof 1; 0 for one), n_trained, method, seconds, paths."""
        acc = np.asarray(self.test_accuracy)
        return {"seeds": self.seeds, "test_accuracy": self.test_accuracy, "train_accuracy": self.train_accuracy,
                "mean_test_accuracy": float(acc.mean()),
                "std_test_accuracy": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "n_trained": len(self.trained),
                "method": self.method, "seconds": self.seconds, "paths": [str(p) for p in self.paths]}


def zoo_member_path(root: str | Path, seed: int) -> Path:
    """Checkpoint path of the zoo member with `seed` under the zoo root `root`."""
    return Path(root) / ZOO_SUBDIR / f"model_{int(seed)}.pt"


def zoo_settings(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define a zoo's members (all but the seed), as plain JSON values."""
    train = {k: v for k, v in train_cfg.to_dict().items() if k not in _NOT_IN_ZOO_KEY}
    return json.loads(json.dumps({"data": data_cfg.to_dict(), "model": asdict(model_cfg), "train": train}))


def has_batch_norm(module: nn.Module) -> bool:
    """Whether `module` holds a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def zoo_method(method: str, module: nn.Module, train_cfg: TrainConfig, backend: str = "local") -> str:
    """How the zoo's members of `module`'s architecture are trained: "ensemble" (jobs of the ground-truth
    store, the engine) or "fit" (one by one); `method` "auto" picks the engine unless the model has batch
    norm or the optimizer is ivon. ConfigError when `method` or `backend` asks for what cannot be done."""
    if method not in ZOO_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(ZOO_METHODS)}, received {method!r}")
    bn = has_batch_norm(module)
    engine_fits = not bn and train_cfg.optimizer in ("sgd", "adam", "adamw")
    if method == "ensemble" and not engine_fits:
        raise ConfigError("the retraining engine cannot train this zoo "
                          f"({'the model has batch norm' if bn else 'the optimizer is ' + train_cfg.optimizer}); "
                          "use method 'fit' or 'auto'")
    used = "ensemble" if method == "ensemble" or (method == "auto" and engine_fits) else "fit"
    if used == "fit" and backend != "local":
        what = "this model" if bn else "with " + train_cfg.optimizer
        raise ConfigError(f"--backend {backend} trains zoo members with the retraining engine, which cannot train "
                          f"{what} (--method fit): use --backend local")
    return used


def read_zoo_index(root: str | Path) -> dict[str, Any] | None:
    """The zoo.json of the zoo root `root`, None when it holds no zoo."""
    path = Path(root) / ZOO_SUBDIR / ZOO_INDEX
    return read_json(path) if path.exists() else None


def check_zoo_index(root: str | Path, index: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Raise ConfigError when the zoo `index` (of `root`) was trained with other `settings` (`zoo_settings`)."""
    if index is None:
        return
    for key in ("data", "model", "train"):
        if index.get(key) != settings[key]:
            raise ConfigError(
                f"the zoo in {Path(root) / ZOO_SUBDIR} was trained with {key} settings {index.get(key)}, but this run "
                f"asks for {settings[key]}; use the zoo's settings, or another --zoo / --out"
            )


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as distinct non-negative ints (at least one)."""
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


def draw_pairs(seeds: Sequence[int], n_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """`n_pairs` distinct pairs (a, b), a before b in `seeds`, drawn uniformly without replacement from
    the len(seeds) (len(seeds) - 1) / 2 pairs of distinct members (generator seeded by `seed`): the
    random model pairs of Godfrey et al. 2022 (--retrain_repeats). With two seeds: their one pair."""
    import itertools

    import numpy as np

    seeds = check_seeds(seeds)
    pairs = list(itertools.combinations(seeds, 2))
    if not 1 <= int(n_pairs) <= len(pairs):
        raise ConfigError(f"cannot draw {n_pairs} distinct pairs from {len(seeds)} zoo models ({len(pairs)} pairs); "
                          "give a larger zoo or fewer pairs")
    chosen = np.random.default_rng(int(seed)).choice(len(pairs), size=int(n_pairs), replace=False)
    return [pairs[i] for i in chosen]


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
    retrain: RetrainOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> ZooResult:
    """Train (or reuse) the zoo members `seeds` under the zoo root `out` (see the module docstring).

    Args:
        n_models: number of members; seeds default to train_cfg.seed + 0, ..., n_models - 1.
        seeds: explicit seeds (then n_models may be None; if given it must equal len(seeds)).
        data: the loaded dataset of `data_cfg` (loaded here if None).
        method: "auto" (the engine unless the model has batch norm or the optimizer is ivon),
            "ensemble" or "fit" (`zoo_method`).
        retrain: where the engine's members train and are stored (backend, address, chunk size, store;
            default: locally, 32 per chunk, in `<out>/store`).
        log: receives the store's progress lines.
    Returns:
        a `ZooResult`; checkpoints in `<out>/zoo/model_<seed>.pt`, accuracies in `<out>/zoo/zoo.json`.
    """
    retrain = RetrainOptions() if retrain is None else retrain
    if seeds is None:
        if n_models is None or n_models < 1:
            raise ConfigError(f"--n-models must be >= 1, got {n_models}")
        seeds = [train_cfg.seed + i for i in range(n_models)]
    seeds = check_seeds(seeds)
    if n_models is not None and n_models != len(seeds):
        raise ConfigError(f"got n_models={n_models} but {len(seeds)} seeds {seeds}")
    root = Path(out)
    data = load_dataset_from_config(data_cfg) if data is None else data
    settings = zoo_settings(data_cfg, model_cfg, train_cfg)
    index = read_zoo_index(root)
    check_zoo_index(root, index, settings)
    members: dict[str, dict[str, Any]] = dict(index["members"]) if index else {}
    todo = [s for s in seeds if str(s) not in members or not zoo_member_path(root, s).exists()]

    used, trained, start = "reused", todo, time.perf_counter()
    if todo:
        def make(seed: int) -> nn.Module:
            return build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=seed)

        used = zoo_method(method, make(todo[0]), train_cfg, retrain.backend)
        (root / ZOO_SUBDIR).mkdir(parents=True, exist_ok=True)

        def write_index() -> None:
            write_json(root / ZOO_SUBDIR / ZOO_INDEX, {**settings, "dataset": data.summary(), "members": members})

        if used == "ensemble":
            recipe = RetrainRecipe(data_cfg, model_cfg, train_cfg, params=True)
            jobs = [Job(np.ones(data.n_train, dtype=bool), seed) for seed in todo]
            trained = [todo[i] for i in GroundTruthStore(retrain.root(root), recipe, data.n_train,
                                                         data.n_test).missing(jobs)]
            tables = train_jobs(recipe, jobs, retrain.root(root), data=data, backend=retrain.backend,
                                address=retrain.address, chunk_models=retrain.chunk_size, progress=progress, log=log)
            for m, seed in enumerate(todo):
                module = make(seed)
                module.load_state_dict({**module.state_dict(), **job_parameters(tables, m)})
                save_model(zoo_member_path(root, seed), module.eval(), model_cfg, data, seed)
                members[str(seed)] = {"test_accuracy": float(tables["test_correct"][m].mean()),
                                      "train_accuracy": float(tables["train_correct"][m].mean())}
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
        trained=trained,
        method=used,
        seconds=time.perf_counter() - start,
    )


__all__ = ["ZOO_INDEX", "ZOO_METHODS", "ZOO_SUBDIR", "ZooResult", "check_seeds", "check_zoo_index", "draw_pairs",
           "has_batch_norm", "read_zoo_index", "train_zoo", "zoo_member_path", "zoo_method", "zoo_settings"]
