"""A farm of models trained on random subsets, streamed chunk by chunk into a resumable store.

Model r (r = 0, 1, ...) trains on the subset `RandomState(seed0 + r).choice(N, floor(ρN))` (the
original's sampling, `memorization.subset_masks`), from the init and with the batch order of seed
`seed0 + r`. Models are trained `chunk_size` at a time by the retraining engine (`train_ensemble`,
vmapped), and every finished chunk is written atomically to a `SubsetRunStore`, so an interrupted
run loses at most the chunks in flight and a run with more models extends the same store.

Backends: `local` trains the chunks one after the other in this process; `ray` makes each chunk a
Ray task (`ray.init(address=...)`, or a local Ray instance), each task loading the data from its
`DataConfig` and writing its chunk through the same store (a directory every worker can reach).
The result of a chunk depends only on the spec and its model ids, so both backends give the same
tables for the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError, ModelsenseError
from modelsense.memorization.estimators import subset_size
from modelsense.memorization.store import SubsetRunStore
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.progress import progress_bar
from modelsense.training.config import TrainConfig
from modelsense.training.ensemble import train_ensemble


@dataclass
class FarmSpec:
    """Everything a worker needs to train any chunk of the farm (plain, picklable settings)."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    subset_ratio: float = 0.7
    seed0: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.subset_ratio) < 1.0:
            raise ConfigError(f"--subset-ratio must lie strictly between 0 and 1 (Feldman & Zhang 2020 use 0.7), got {self.subset_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return {"data": asdict(self.data), "model": asdict(self.model), "train": self.train.to_dict(),
                "subset_ratio": self.subset_ratio, "seed0": self.seed0}


def model_masks(n: int, ratio: float, model_ids: Sequence[int], seed0: int = 0) -> np.ndarray:
    """Subset masks (k, n) of the given model ids: the rows `memorization.subset_masks` would give."""
    size = subset_size(n, ratio)
    masks = np.zeros((len(model_ids), n), dtype=bool)
    for row, r in enumerate(model_ids):
        masks[row, np.random.RandomState(int(seed0 + r)).choice(n, size, replace=False)] = True
    return masks


def train_chunk(spec: FarmSpec, model_ids: Sequence[int], data: Dataset | None = None,
                progress: bool = False) -> dict[str, np.ndarray]:
    """Train the models `model_ids` of the farm at once; their masks and per-example results.

    Returns arrays for `SubsetRunStore.write_chunk`: model_ids, seeds, masks (k, N), correct_train
    (k, N), correct_test (k, M), loss_{train,test}, margin_{train,test}.
    """
    data = load_dataset_from_config(spec.data) if data is None else data
    ids = np.asarray(model_ids, dtype=np.int64)
    seeds = spec.seed0 + ids
    masks = model_masks(data.n_train, spec.subset_ratio, ids, spec.seed0)

    def model_fn(seed: int) -> torch.nn.Module:
        return build_model_from_config(spec.model, data.input_shape, data.num_classes, seed=seed)

    res = train_ensemble(model_fn, data.x_train, data.y_train, torch.from_numpy(masks), spec.train,
                         seeds=torch.from_numpy(seeds), keep_logits=False, progress=progress,
                         queries={"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)})
    out = {"model_ids": ids, "seeds": seeds, "masks": masks}
    for q in ("train", "test"):
        o = res.outputs[q]
        out[f"correct_{q}"] = o["correct"].numpy()
        out[f"loss_{q}"] = o["loss"].numpy().astype(np.float32)
        out[f"margin_{q}"] = o["margin"].numpy().astype(np.float32)
    return out


def _write(store: SubsetRunStore, arrays: dict[str, np.ndarray]) -> Path:
    a = dict(arrays)
    return store.write_chunk(a.pop("model_ids"), a.pop("seeds"), a.pop("masks"), a.pop("correct_train"),
                             a.pop("correct_test"), **a)


def _ray_task(spec: FarmSpec, model_ids: np.ndarray, run_dir: str) -> list[int]:
    store = SubsetRunStore.open(run_dir)
    _write(store, train_chunk(spec, model_ids))
    return [int(i) for i in model_ids]


#: where the chunks of a farm are trained
BACKENDS = ("local", "ray")


class FarmError(ModelsenseError):
    """Training the chunks of a farm failed (e.g. Ray workers died more often than tasks retry)."""


def run_farm(spec: FarmSpec, run_dir: str | Path, n_models: int, chunk_size: int = 32, *, backend: str = "local",
             address: str | None = None, data: Dataset | None = None, progress: bool = True,
             ray_num_cpus: int | None = None) -> SubsetRunStore:
    """Train every model of `0..n_models-1` that the store in `run_dir` does not hold yet.

    Partial files of a crashed run are removed first; finished chunks are kept. Returns the store.
    """
    if int(n_models) < 2:
        raise ConfigError(f"--n-models must be >= 2 (models with and without each example are needed), got {n_models}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    data = load_dataset_from_config(spec.data) if data is None else data
    store = SubsetRunStore(run_dir, data.n_train, data.n_test, spec.subset_ratio, metadata={"farm": spec.to_dict()})
    store.remove_partial_files()
    store.remove_damaged_chunks()  # trained again below
    todo = store.missing_chunks(n_models, chunk_size)
    if not todo:
        return store
    if backend == "local":
        with progress_bar(sum(len(t) for t in todo), "models", enabled=progress) as bar:
            for ids in todo:
                _write(store, train_chunk(spec, ids, data))
                bar.advance(len(ids))
        return store
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'modelsense[distributed]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, num_cpus=ray_num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise FarmError(f"could not start or reach Ray (--address {address or 'local'}): {err}") from None
    pending: list = []
    try:
        task = ray.remote(_ray_task)
        pending = [task.remote(spec, ids, str(Path(run_dir).resolve())) for ids in todo]
        with progress_bar(sum(len(t) for t in todo), "models (ray)", enabled=progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        bar.advance(len(ray.get(ref)))
                    except ray.exceptions.RayError as err:
                        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                        raise FarmError(f"a Ray task failed after its retries ({type(err).__name__}: {first[:300]}); "
                                        f"the finished chunks in {run_dir} are kept: run again with --resume") from None
    finally:
        for ref in pending:  # on an error or Ctrl-C: no task keeps writing after the driver is gone
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return store
