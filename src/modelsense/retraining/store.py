"""One ground-truth store: the outputs of retrained models, keyed by how and on what each was trained.

Every ground truth of the package is models retrained on chosen example sets: random subsets
(memorization, LDS), the training set minus some examples (pruning, leave-one-out, leave-one-class-
out), all of it with other seeds (a zoo), relabeled training sets. A *job* is one such model: an example
set (a boolean mask over the N training examples), a seed (init and batch order) and, for a relabeled
training set, its labels (N,) (part of the job's key; the chunk keeps the key, not the labels).
A *recipe* says how every job is trained: data, model, training options, the batch plan of the engine, and
the initial parameters (fresh from the seed, or a warm start). A job's results depend on the recipe, its mask and its
seed only — not on which other jobs were trained beside it (the engine trains each model exactly
as `fit` would; tested) — so they are stored once and reused by every command that asks for them.

Layout under the store's root (by default in the run directory; `--store DIR` shares one between
runs and commands):

    ROOT/<recipe digest>/recipe.json          the recipe (what the digest stands for)
    ROOT/<recipe digest>/chunks/<hash>.npz    k jobs: keys (k,), seeds (k,), masks (k, N) and per query
                                              q in (train, test): q_loss, q_correct, q_margin (k, n_q),
                                              q_logits (k, n_q, C) when the recipe keeps logits, and
                                              param.<name> (k, *shape) when it keeps parameters (a zoo)

Chunks are written atomically (temporary name, then rename), so a crash loses at most the chunk in
flight; a damaged chunk is detected and trained again; two runs writing the same job write the
same file content. `train_jobs` trains the jobs the store lacks, chunk by chunk, in this process or
as Ray tasks (`backend="ray"`), and returns the tables of all jobs in the order asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError, DataError, ModelsenseError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.options import option
from modelsense.progress import progress_bar
from modelsense.runs import TEMP_PREFIX, _jsonable, atomic_write, read_json
from modelsense.training.config import TrainConfig
from modelsense.training.ensemble import BATCH_PLANS, train_ensemble

RECIPE_FILE = "recipe.json"
#: the store's folder in a run directory (the resumable state of commands that retrain)
STORE_DIR = "store"
CHUNK_DIR = "chunks"
#: the tables of a job's trained parameters (`RetrainRecipe.params`)
PARAM_PREFIX = "param."
QUERIES = ("train", "test")
OUTPUTS = ("loss", "correct", "margin")
#: training options that do not change what a job computes (left out of the recipe's key)
_NOT_IN_KEY = ("device", "checkpoint_epochs", "checkpoint_iterations", "eval_every", "seed")
#: training options added after stores were written, left out of the key at these values (their
#: behaviour before the option existed), so the stores written before keep their digests
_KEY_DEFAULTS = {"loss": "cross_entropy", "schedule": "cosine", "warmup_ratio": 0.1, "milestones": (), "gamma": 0.1,
                 "crop_padding": 0, "hflip": False, "mixup_alpha": 0.0}
#: where the jobs are trained
BACKENDS = ("local", "ray")
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


@dataclass(frozen=True)
class RetrainOptions:
    """Where and how the jobs of a command are trained (the options of every command that retrains)."""

    backend: str = option("local", "local (this process) or ray: where the retrained models are trained")
    address: str | None = option(None, "Ray cluster address (default: a local Ray instance)")
    chunk_size: int = option(32, "retrained models trained together (vmapped) per chunk / Ray task")
    store: str | None = option(None, "folder of the ground-truth store of retrained models (default: OUT/store); "
                                     "runs given the same folder reuse the models they share")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r}; choose {' or '.join(BACKENDS)}")
        if int(self.chunk_size) < 1:
            raise ConfigError(f"--chunk-size must be >= 1, received {self.chunk_size}")

    def root(self, run_path: str | os.PathLike) -> Path:
        """The store's folder: `store`, else `run_path`/store."""
        return Path(self.store) if self.store else Path(run_path) / STORE_DIR


class FarmError(ModelsenseError):
    """Training the jobs failed (e.g. Ray workers died more often than tasks retry)."""


@dataclass(frozen=True)
class RetrainRecipe:
    """How every job of a store is trained.

    Attributes:
        data, model, train: as for `fit` (train's seed is each job's own; its device is where to
            compute, not part of the recipe).
        batch_plan: the engine's "own" (each model's batches over its own examples, as `fit` on the
            subset) or "shared" (everyone's batches over all N examples; removed ones weigh 0).
        init: "scratch" (fresh parameters from the job's seed) or "warm:<digest>" (every job starts
            from the same parameters, whose `params_digest` this is; `train_jobs` gets them).
        logits: also keep each job's logits on the queries (k, n, C), e.g. for leave-one-out.
        params: also keep each job's trained parameters, `param.<name>` (k, *shape), e.g. for a model
            zoo (`modelsense.retraining.zoo`): `job_parameters` gives them back.
    """

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    batch_plan: str = "own"
    init: str = "scratch"
    logits: bool = False
    params: bool = False

    def __post_init__(self) -> None:
        if self.batch_plan not in BATCH_PLANS:
            raise ConfigError(f"unknown batch plan {self.batch_plan!r}; expected one of {BATCH_PLANS}")
        if not (self.init == "scratch" or self.init.startswith("warm:")):
            raise ConfigError(f"init must be 'scratch' or 'warm:<digest>', received {self.init!r}")
        if self.train.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(
                f"retrained models train with sgd, adam or adamw (the engine), not {self.train.optimizer!r}"
            )
        if self.train.mixup_alpha > 0:
            raise ConfigError(
                "retrained models train without mixup (the engine would mix a model's examples with those "
                "it leaves out): use --mixup-alpha 0"
            )

    def key(self) -> dict[str, Any]:
        train = {k: v for k, v in self.train.to_dict().items()
                 if k not in _NOT_IN_KEY and not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}
        return _jsonable({"data": {k: v for k, v in asdict(self.data).items() if k != "data_dir"},
                          "model": asdict(self.model), "train": train, "batch_plan": self.batch_plan,
                          "init": self.init, "logits": self.logits,
                          **({"params": True} if self.params else {})})  # the stores written before keep their key

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]


def params_digest(params: dict[str, torch.Tensor]) -> str:
    """A digest of parameter values (for `RetrainRecipe.init = "warm:<digest>"`)."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One retrained model: trained on the examples where `mask` (N,) is True, from seed `seed`, with
    the dataset's labels or, when `labels` (N,) is given, with these (a relabeled training set)."""

    mask: np.ndarray = field(repr=False)
    seed: int
    labels: np.ndarray | None = field(default=None, repr=False)

    def key(self) -> str:
        bits = np.packbits(np.asarray(self.mask, dtype=bool))
        key = f"{hashlib.sha1(bits.tobytes()).hexdigest()[:20]}-{len(self.mask)}-{int(self.seed)}"
        if self.labels is not None:
            key += "-y" + hashlib.sha1(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()).hexdigest()[:20]
        return key


def subset_size(n: int, ratio: float) -> int:
    """floor(ratio * n) computed as Feldman & Zhang's pipeline did (`int(ratio * n)` in floating point)."""
    import math

    return int(math.floor(float(ratio) * int(n)))


def subset_jobs(n: int, ratio: float, model_ids: Sequence[int], seed0: int = 0) -> list[Job]:
    """The jobs of random ratio-subsets: model r trains on `RandomState(seed0 + r).choice(n, ⌊ratio n⌋)`
    from seed seed0 + r (the sampling of Feldman & Zhang 2020), so memorization, LDS and any other
    command asking for the same r (with the same recipe) share the model."""
    size = subset_size(n, ratio)
    if not 0 < size < n:
        raise ConfigError(f"a subset ratio of {ratio} keeps {size} of {n} examples; choose a ratio in (0, 1) that "
                          "leaves some out")
    jobs = []
    for r in model_ids:
        mask = np.zeros(n, dtype=bool)
        mask[np.random.RandomState(int(seed0 + r)).choice(n, size, replace=False)] = True
        jobs.append(Job(mask, int(seed0 + r)))
    return jobs


def jobs_from(masks: np.ndarray, seeds: Sequence[int], labels: Sequence[np.ndarray | None] | None = None) -> list[Job]:
    """Jobs of the rows of `masks` (M, N) with `seeds` (M,) and, optionally, their own labels (M rows of
    (N,) labels, or None for the dataset's)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or len(masks) != len(seeds):
        raise ConfigError(f"expected (M, N) masks and M seeds, got {masks.shape} and {len(seeds)}")
    labels = [None] * len(masks) if labels is None else list(labels)
    if len(labels) != len(masks) or any(y is not None and np.shape(y) != (masks.shape[1],) for y in labels):
        raise ConfigError(f"expected {len(masks)} label rows of shape ({masks.shape[1]},) or None")
    return [
        Job(m, int(s), None if y is None else np.asarray(y, dtype=np.int64)) for m, s, y in zip(masks, seeds, labels)
    ]


class GroundTruthStore:
    """The jobs of one recipe under `root` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, recipe: RetrainRecipe, n_train: int, n_test: int) -> None:
        self.recipe = recipe
        self.n_train, self.n_test = int(n_train), int(n_test)
        self.path = Path(root) / recipe.digest()
        self.chunks = self.path / CHUNK_DIR
        self.chunks.mkdir(parents=True, exist_ok=True)
        stored = self.path / RECIPE_FILE
        meta = {"recipe": recipe.key(), "n_train": self.n_train, "n_test": self.n_test}
        if stored.exists():
            old = read_json(stored, "the recipe of a ground-truth store")
            if old != json.loads(json.dumps(meta)):
                raise DataError(f"{stored} describes another recipe or dataset size than its digest says; "
                                "remove that folder (it will be trained again)")
        else:
            atomic_write(stored, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        self._index: dict[str, tuple[Path, int]] | None = None

    # -- reading ------------------------------------------------------------------------------
    def chunk_files(self) -> list[Path]:
        return sorted(p for p in self.chunks.glob("*.npz") if not p.name.startswith(TEMP_PREFIX))

    def remove_partial_files(self) -> list[Path]:
        """Temporary files left by writes a crash interrupted (never read)."""
        left = sorted(self.chunks.glob(f"{TEMP_PREFIX}*"))
        for p in left:
            p.unlink(missing_ok=True)
        return left

    def remove_damaged_chunks(self) -> list[tuple[Path, str]]:
        """Delete chunks that cannot be read whole (truncated, a CRC error, a missing table), so their
        jobs are trained again; returns (path, reason) for each."""
        damaged = []
        for path in self.chunk_files():
            try:
                with np.load(path) as f:
                    missing = [k for k in ("keys", "seeds", "masks", *self._fields()) if k not in f.files]
                    if self.recipe.params and not any(k.startswith(PARAM_PREFIX) for k in f.files):
                        missing.append(f"{PARAM_PREFIX}*")
                    for k in f.files:
                        f[k]  # reads and checks the CRC of every table
                reason = f"missing {', '.join(missing)}" if missing else None
            except _UNREADABLE as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if reason:
                path.unlink(missing_ok=True)
                damaged.append((path, reason))
        self._index = None
        return damaged

    def _fields(self) -> list[str]:
        outs = [*OUTPUTS, *(["logits"] if self.recipe.logits else [])]
        return [f"{q}_{o}" for q in QUERIES for o in outs]

    def index(self) -> dict[str, tuple[Path, int]]:
        """Job key -> (chunk file, row)."""
        if self._index is None:
            self._index = {}
            for path in self.chunk_files():
                try:
                    with np.load(path) as f:
                        keys = [str(k) for k in f["keys"]]
                except _UNREADABLE as exc:
                    raise DataError(f"{path}: unreadable chunk ({exc}); resume to train it again") from None
                for row, k in enumerate(keys):
                    self._index.setdefault(k, (path, row))
        return self._index

    def missing(self, jobs: Sequence[Job]) -> list[int]:
        """Positions in `jobs` of those the store does not hold (each distinct job once)."""
        index, seen, out = self.index(), set(), []
        for i, job in enumerate(jobs):
            k = job.key()
            if k not in index and k not in seen:
                seen.add(k)
                out.append(i)
        return out

    def gather(self, jobs: Sequence[Job]) -> dict[str, np.ndarray]:
        """Tables of `jobs` in their order: masks (M, N), seeds (M,), and per query q_loss, q_correct,
        q_margin (M, n_q) (and q_logits (M, n_q, C), param.<name> (M, *shape)); every job must be stored."""
        index = self.index()
        lacking = [j for j in jobs if j.key() not in index]
        if lacking:
            raise DataError(f"{len(lacking)} of {len(jobs)} jobs are not in the store {self.path}; train them first")
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for pos, job in enumerate(jobs):
            path, row = index[job.key()]
            by_file.setdefault(path, []).append((pos, row))
        out: dict[str, np.ndarray] = {}
        for path, pairs in by_file.items():
            with np.load(path) as f:
                rows = np.array([r for _, r in pairs])
                pos = np.array([p for p, _ in pairs])
                params = [k for k in f.files if k.startswith(PARAM_PREFIX)] if self.recipe.params else []
                for name in ("masks", "seeds", *self._fields(), *params):
                    table = f[name]
                    if name not in out:
                        out[name] = np.zeros((len(jobs), *table.shape[1:]), dtype=table.dtype)
                    out[name][pos] = table[rows]
        return out

    # -- writing ------------------------------------------------------------------------------
    def write(self, jobs: Sequence[Job], tables: dict[str, np.ndarray]) -> Path:
        """Store the results of `jobs` (tables with one row per job: `_fields()`, and the parameters
        `param.<name>` when the recipe keeps them) as one chunk."""
        keys = [j.key() for j in jobs]
        arrays = {"keys": np.array(keys), "seeds": np.array([j.seed for j in jobs], dtype=np.int64),
                  "masks": np.stack([np.asarray(j.mask, dtype=bool) for j in jobs])}
        params = [k for k in tables if k.startswith(PARAM_PREFIX)] if self.recipe.params else []
        if self.recipe.params and not params:
            raise DataError("chunk without parameters (param.<name> tables) for a recipe that keeps them")
        for name in (*self._fields(), *params):
            if name not in tables:
                raise DataError(f"chunk without table {name!r}")
            arrays[name] = np.asarray(tables[name])
            if arrays[name].shape[0] != len(jobs):
                raise DataError(f"table {name!r} has {arrays[name].shape[0]} rows for {len(jobs)} jobs")
        path = self.chunks / f"{hashlib.sha1(''.join(keys).encode()).hexdigest()[:24]}.npz"
        atomic_write(path, lambda f: np.savez(f, **arrays))
        self._index = None
        return path


# -- training the missing jobs ---------------------------------------------------------------------
def train_chunk(recipe: RetrainRecipe, jobs: Sequence[Job], data: Dataset | None = None,
                init_params: dict[str, torch.Tensor] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Train `jobs` at once with the engine; their tables (see `GroundTruthStore.gather`)."""
    data = load_dataset_from_config(recipe.data) if data is None else data
    if recipe.init.startswith("warm:") and (init_params is None or params_digest(init_params) != recipe.init[5:]):
        raise ConfigError("a warm-start recipe needs the initial parameters it was made with (their digest differs)")

    def model_fn(seed: int) -> torch.nn.Module:
        return build_model_from_config(recipe.model, data.input_shape, data.num_classes, seed=seed)

    masks = torch.from_numpy(np.stack([np.asarray(j.mask, dtype=bool) for j in jobs]))
    labels = None
    if any(j.labels is not None for j in jobs):
        own = data.y_train.numpy()
        labels = torch.from_numpy(np.stack([own if j.labels is None else np.asarray(j.labels, dtype=np.int64)
                                            for j in jobs]).astype(np.int64))
    res = train_ensemble(model_fn, data.x_train, data.y_train, masks, recipe.train,
                         seeds=torch.tensor([j.seed for j in jobs]), init_params=init_params,
                         batch_plan=recipe.batch_plan, keep_logits=recipe.logits, return_params=recipe.params,
                         progress=progress, labels=labels,
                         queries={"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)})
    out = {}
    for q in QUERIES:
        o = res.outputs[q]
        out[f"{q}_loss"] = o["loss"].numpy().astype(np.float32)
        out[f"{q}_correct"] = o["correct"].numpy().astype(bool)
        out[f"{q}_margin"] = o["margin"].numpy().astype(np.float32)
        if recipe.logits:
            out[f"{q}_logits"] = o["logits"].numpy().astype(np.float32)
    for name, value in (res.params or {}).items():
        out[PARAM_PREFIX + name] = value.detach().cpu().numpy()
    return out


def job_parameters(tables: dict[str, np.ndarray], row: int) -> dict[str, torch.Tensor]:
    """The trained parameters of job `row` of `gather`'s tables (a recipe with `params=True`), name -> tensor,
    for `module.load_state_dict(..., strict=False)`."""
    params = {k[len(PARAM_PREFIX):]: torch.from_numpy(np.array(v[row])) for k, v in tables.items()
              if k.startswith(PARAM_PREFIX)}
    if not params:
        raise DataError("these tables hold no parameters: train the jobs with a recipe that keeps them (params=True)")
    return params


def _ray_task(root: str, recipe: RetrainRecipe, masks: np.ndarray, seeds: list[int], n_train: int, n_test: int,
              init_params: dict[str, torch.Tensor] | None, labels: list[np.ndarray | None] | None = None) -> int:
    store = GroundTruthStore(root, recipe, n_train, n_test)
    jobs = jobs_from(masks, seeds, labels)
    store.write(jobs, train_chunk(recipe, jobs, init_params=init_params))
    return len(jobs)


def train_jobs(recipe: RetrainRecipe, jobs: Sequence[Job], root: str | os.PathLike, *, data: Dataset | None = None,
               init_params: dict[str, torch.Tensor] | None = None, backend: str = "local",
               address: str | None = None, chunk_models: int = 32, progress: bool = True,
               ray_num_cpus: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Train the jobs the store under `root` lacks, `chunk_models` at a time (in this process, or one
    Ray task per chunk), and return the tables of all `jobs` in their order (`gather`)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if chunk_models < 1:
        raise ConfigError(f"--chunk-size must be >= 1, received {chunk_models}")
    data = load_dataset_from_config(recipe.data) if data is None else data
    store = GroundTruthStore(root, recipe, data.n_train, data.n_test)
    store.remove_partial_files()
    for path, reason in store.remove_damaged_chunks():
        if log:
            log(f"ground truth: chunk {path.name} was damaged ({reason}); its jobs are trained again")
    todo = [jobs[i] for i in store.missing(jobs)]
    if log:
        log(f"ground truth: {len(jobs) - len(todo)} of {len(jobs)} jobs stored, {len(todo)} to train ({backend})")
    chunks = [todo[i:i + chunk_models] for i in range(0, len(todo), chunk_models)]
    if chunks and backend == "local":
        with progress_bar(len(todo), "retrained models", enabled=progress) as bar:
            for chunk in chunks:
                store.write(chunk, train_chunk(recipe, chunk, data, init_params))
                bar.advance(len(chunk))
    elif chunks:
        _train_on_ray(store, recipe, chunks, init_params, address, ray_num_cpus, progress)
    return store.gather(jobs)


#: one entry per open `ray_session`: whether a retraining started Ray inside it (shut down when it closes)
_RAY_SESSIONS: list[bool] = []


@contextmanager
def ray_session() -> Iterator[None]:
    """Keep the Ray instance that a `retrain` / `train_jobs` with the ray backend starts inside this
    block running until the block ends, so that several retrainings (a sweep's architectures) share
    one session instead of starting and stopping Ray once each; Ray is started only when a retraining
    needs it. A no-op for the local backend and when Ray was already running."""
    _RAY_SESSIONS.append(False)
    try:
        yield
    finally:
        if _RAY_SESSIONS.pop():
            import ray

            ray.shutdown()


def _train_on_ray(store: GroundTruthStore, recipe: RetrainRecipe, chunks: list[list[Job]], init_params,
                  address: str | None, ray_num_cpus: int | None, progress: bool) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--backend ray needs Ray: pip install 'modelsense[distributed]' (or pip install ray)"
        ) from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, num_cpus=ray_num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise FarmError(f"could not start or reach Ray (--address {address or 'local'}): {err}") from None
        if _RAY_SESSIONS:  # the enclosing ray_session shuts it down
            _RAY_SESSIONS[-1], started = True, False
    pending: list = []
    try:
        task = ray.remote(_ray_task)
        root = str(store.path.parent.resolve())
        params = None if init_params is None else ray.put({k: v.cpu() for k, v in init_params.items()})
        pending = [task.remote(root, recipe, np.stack([j.mask for j in c]), [j.seed for j in c], store.n_train,
                               store.n_test, params, [j.labels for j in c]) for c in chunks]
        with progress_bar(sum(len(c) for c in chunks), "retrained models (ray)", enabled=progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        bar.advance(ray.get(ref))
                    except ray.exceptions.RayError as err:
                        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                        raise FarmError(
                            f"a Ray task failed after its retries ({type(err).__name__}: {first[:300]}); "
                            f"the finished chunks in {store.path} are kept: run again with --resume"
                        ) from None
    finally:
        for ref in pending:  # on an error or Ctrl-C: no task keeps writing after the driver is gone
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    store._index = None


def retrain(recipe: RetrainRecipe, jobs: Sequence[Job], options: RetrainOptions, run_path: str | os.PathLike, *,
            data: Dataset | None = None, init_params: dict[str, torch.Tensor] | None = None, progress: bool = True,
            log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """`train_jobs` with a command's `RetrainOptions` (its store defaults to the run's)."""
    return train_jobs(recipe, jobs, options.root(run_path), data=data, init_params=init_params,
                      backend=options.backend, address=options.address, chunk_models=options.chunk_size,
                      progress=progress, log=log)


__all__ = ["BACKENDS", "FarmError", "GroundTruthStore", "Job", "RetrainOptions", "RetrainRecipe", "STORE_DIR",
           "job_parameters", "jobs_from", "params_digest", "ray_session", "retrain", "subset_jobs", "subset_size",
           "train_chunk", "train_jobs"]
