"""Files of a subset-training farm: a chunked, resumable results store, and the original's runs.

Layout of a run directory written by `SubsetRunStore`:

    RUN_DIR/store.json                          n_train, n_test, subset_ratio, metadata
    RUN_DIR/chunks/models-0000000-0000015.npz   one chunk of models (here ids 0..15)

Each chunk file holds `model_ids` (k,) int64, `seeds` (k,) int64, `masks` (k, n_train) bool,
`correct_train` (k, n_train), `correct_test` (k, n_test) and optionally `loss_{train,test}`,
`margin_{train,test}` (float32). A chunk is written to a temporary name (`.tmp-*`) in the same
directory and renamed with `os.replace`, so a chunk file is either complete or absent: a crash
loses at most the chunks in flight, and the temporary files it leaves are ignored (and removed by
`remove_partial_files`). A run is extended by asking `missing_chunks` for a larger model count.

`read_original_runs` reads the released runs of Feldman & Zhang / Jiang et al.
(`<subset_ratio>/<run_id>/aux_arrays.npz`, SEEDS.md section 3.3) into the same (R, N) tables.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.errors import ConfigError, DataError
from modelsense.runs import TEMP_PREFIX, atomic_write

STORE_FILE = "store.json"
CHUNK_DIR = "chunks"
CHUNK_PREFIX = "models-"
FORMAT_VERSION = 1
REQUIRED_FIELDS = ("correct_train", "correct_test")
OPTIONAL_FIELDS = ("loss_train", "loss_test", "margin_train", "margin_test")
ORIGINAL_FILE = "aux_arrays.npz"
ORIGINAL_KEYS = ("correctness_train", "correctness_removed", "correctness_test",
                 "index_train", "index_removed", "index_test")


@dataclass(frozen=True)
class SubsetRuns:
    """Every stored model's subset and per-example results, rows in increasing model id.

    model_ids, seeds: (R,) int64. masks: (R, N) bool (model r trained on example i).
    correct_train: (R, N); correct_test: (R, M) (bool where 0/1, else float32).
    loss_*/margin_*: (R, N) / (R, M) float32, or None where the chunks hold none.
    """

    model_ids: np.ndarray
    seeds: np.ndarray
    masks: np.ndarray
    correct_train: np.ndarray
    correct_test: np.ndarray
    loss_train: np.ndarray | None = None
    loss_test: np.ndarray | None = None
    margin_train: np.ndarray | None = None
    margin_test: np.ndarray | None = None

    @property
    def n_models(self) -> int:
        return int(self.model_ids.shape[0])


#: what reading a damaged .npz raises
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def _as_table(values: Any, name: str, shape: tuple[int, int], *, keep_binary: bool) -> np.ndarray:
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    v = np.asarray(values)
    if v.shape != shape:
        raise DataError(f"{name}: expected shape {shape} (models in the chunk, examples), got {v.shape}")
    if v.dtype == np.bool_:
        return v
    if not np.issubdtype(v.dtype, np.number):
        raise DataError(f"{name}: expected booleans or numbers, got dtype {v.dtype}")
    if keep_binary and np.all((v == 0) | (v == 1)):
        return v.astype(bool)
    return v.astype(np.float32)


class SubsetRunStore:
    """Chunked, resumable store of a subset-training farm in `run_dir` (see module docstring).

    `SubsetRunStore(run_dir, n_train, n_test, subset_ratio)` creates the store or reopens an
    existing one (refusing a different n_train / n_test / subset_ratio); `SubsetRunStore.open`
    reopens one from its `store.json` alone. Writers (one process per chunk, e.g. Ray tasks) call
    `write_chunk`; the driver calls `remove_partial_files` before launching writers on resume,
    `missing_chunks` to know what to train and `load_all` to assemble the tables.
    """

    def __init__(self, run_dir: str | os.PathLike, n_train: int, n_test: int,
                 subset_ratio: float | None = None, metadata: dict | None = None):
        self.run_dir = Path(run_dir)
        self.n_train = int(n_train)
        self.n_test = int(n_test)
        self.subset_ratio = None if subset_ratio is None else float(subset_ratio)
        if self.n_train < 1 or self.n_test < 0:
            raise ConfigError(f"store: expected n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        store_file = self.run_dir / STORE_FILE
        if store_file.exists():
            saved = self._read_store_file(store_file)
            for key, value in (("n_train", self.n_train), ("n_test", self.n_test),
                               ("subset_ratio", self.subset_ratio)):
                if saved.get(key) != value:
                    raise ConfigError(
                        f"{store_file}: this run has {key} = {saved.get(key)!r}, the request has "
                        f"{value!r}; extend a run only with the same data and subset ratio, or "
                        "choose a new --out directory"
                    )
            self.metadata = saved.get("metadata") or {}
        else:
            self.metadata = dict(metadata or {})
            content = {"format_version": FORMAT_VERSION, "n_train": self.n_train, "n_test": self.n_test,
                       "subset_ratio": self.subset_ratio, "metadata": self.metadata}
            text = json.dumps(content, indent=2, sort_keys=True).encode()
            atomic_write(store_file, lambda f: f.write(text))

    @staticmethod
    def _read_store_file(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: could not read the store description ({err})") from err

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> "SubsetRunStore":
        """Reopen an existing store from `run_dir/store.json`."""
        path = Path(run_dir) / STORE_FILE
        if not path.exists():
            raise DataError(f"{path}: not found; {run_dir} is not a subset-run store (no {STORE_FILE})")
        saved = cls._read_store_file(path)
        try:
            return cls(run_dir, saved["n_train"], saved["n_test"], saved.get("subset_ratio"))
        except KeyError as err:
            raise DataError(f"{path}: missing key {err.args[0]!r}") from err

    @property
    def chunk_dir(self) -> Path:
        return self.run_dir / CHUNK_DIR

    # ---------------------------------------------------------------- listing

    def partial_files(self) -> list[Path]:
        """Temporary files left by interrupted writes (never read)."""
        return sorted(self.chunk_dir.glob(f"{TEMP_PREFIX}*"))

    def remove_partial_files(self) -> list[Path]:
        """Delete leftover temporary files; call it before launching writers when resuming."""
        removed = self.partial_files()
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def remove_damaged_chunks(self) -> list[tuple[Path, str]]:
        """Delete the chunk files that cannot be read whole (truncated, bit-flipped: a CRC error, or a
        missing table), so their models are trained again; returns (path, reason) for each. Call it
        with `remove_partial_files` before resuming: nothing damaged is ever read as a result."""
        damaged = []
        for path in self.chunk_files():
            try:
                with np.load(path) as data:
                    missing = [k for k in ("model_ids", "seeds", "masks", *REQUIRED_FIELDS) if k not in data.files]
                    for key in data.files:
                        data[key]  # reads and checks the CRC of every table
                reason = f"missing {', '.join(missing)}" if missing else None
            except _UNREADABLE as err:
                reason = f"{type(err).__name__}: {err}"
            if reason:
                path.unlink(missing_ok=True)
                damaged.append((path, reason))
        self.removed_damaged = damaged
        return damaged

    def chunk_files(self) -> list[Path]:
        """Finished chunk files, in name order (temporary files excluded)."""
        return sorted(p for p in self.chunk_dir.glob(f"{CHUNK_PREFIX}*.npz") if p.is_file())

    @staticmethod
    def _read_ids(path: Path) -> np.ndarray:
        try:
            with np.load(path) as data:
                return np.asarray(data["model_ids"], dtype=np.int64)
        except KeyError as err:
            raise DataError(f"{path}: missing key 'model_ids'; delete the file to retrain its models") from err
        except _UNREADABLE as err:
            raise DataError(f"{path}: unreadable chunk ({err}); delete it to retrain its models") from err

    def _ids_by_file(self) -> dict[Path, np.ndarray]:
        return {path: self._read_ids(path) for path in self.chunk_files()}

    def completed_models(self) -> np.ndarray:
        """Sorted ids of the models whose chunk is written, (k,) int64."""
        ids = list(self._ids_by_file().values())
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)

    def missing_chunks(self, n_models: int, chunk_size: int) -> list[np.ndarray]:
        """Model ids still to train for a run of `n_models`, grouped into chunks.

        The plan splits ids 0..n_models-1 into consecutive chunks of `chunk_size`
        ([0, c), [c, 2c), ...); for each, the ids not yet completed form one entry (chunks already
        complete are skipped, partly complete ones keep only their missing ids, so nothing is
        trained twice when a run is extended or resumed with another chunk size).
        """
        n_models, chunk_size = int(n_models), int(chunk_size)
        if n_models < 1 or chunk_size < 1:
            raise ConfigError(f"expected n_models >= 1 and chunk_size >= 1, got {n_models}, {chunk_size}")
        done = np.zeros(n_models, dtype=bool)
        completed = self.completed_models()
        done[completed[completed < n_models]] = True
        missing = []
        for start in range(0, n_models, chunk_size):
            ids = np.arange(start, min(start + chunk_size, n_models), dtype=np.int64)
            ids = ids[~done[ids]]
            if ids.size:
                missing.append(ids)
        return missing

    # ---------------------------------------------------------------- writing

    def chunk_path(self, model_ids: np.ndarray) -> Path:
        return self.chunk_dir / f"{CHUNK_PREFIX}{int(model_ids.min()):07d}-{int(model_ids.max()):07d}.npz"

    def write_chunk(self, model_ids: Any, seeds: Any, masks: Any, correct_train: Any, correct_test: Any,
                    *, loss_train: Any = None, loss_test: Any = None, margin_train: Any = None,
                    margin_test: Any = None) -> Path:
        """Write one chunk of k models atomically; returns its path.

        model_ids, seeds: (k,) ints; masks: (k, n_train) bool; correct_train: (k, n_train);
        correct_test: (k, n_test); optional loss_*/margin_* with the same shapes. 0/1 tables are
        stored as bool, others as float32. Refuses ids that another chunk file already holds;
        rewriting the same chunk (same ids, e.g. a retried task) replaces it.
        """
        ids = np.asarray(model_ids, dtype=np.int64).reshape(-1)
        k = ids.size
        if k == 0:
            raise DataError("write_chunk: expected at least one model id, got none")
        if np.unique(ids).size != k or ids.min() < 0:
            raise DataError(f"write_chunk: model ids must be distinct and >= 0, got {ids.tolist()}")
        seed_array = np.asarray(seeds, dtype=np.int64).reshape(-1)
        if seed_array.size != k:
            raise DataError(f"seeds: expected {k} seeds (one per model id), got {seed_array.size}")
        arrays = {
            "format_version": np.asarray(FORMAT_VERSION),
            "model_ids": ids,
            "seeds": seed_array,
            "masks": _as_table(masks, "masks", (k, self.n_train), keep_binary=True),
            "correct_train": _as_table(correct_train, "correct_train", (k, self.n_train), keep_binary=True),
            "correct_test": _as_table(correct_test, "correct_test", (k, self.n_test), keep_binary=True),
        }
        if arrays["masks"].dtype != np.bool_:
            raise DataError("masks: expected booleans (or 0/1) marking the training subset of each model")
        for name, value in (("loss_train", loss_train), ("loss_test", loss_test),
                            ("margin_train", margin_train), ("margin_test", margin_test)):
            if value is not None:
                n_cols = self.n_train if name.endswith("train") else self.n_test
                arrays[name] = _as_table(value, name, (k, n_cols), keep_binary=False)
        path = self.chunk_path(ids)
        for other, other_ids in self._ids_by_file().items():
            if other == path:
                if not np.array_equal(np.sort(other_ids), np.sort(ids)):
                    raise DataError(f"{path}: exists with model ids {other_ids.tolist()}, not {ids.tolist()}")
                continue
            clash = np.intersect1d(other_ids, ids)
            if clash.size:
                raise DataError(
                    f"write_chunk: models {clash.tolist()} are already stored in {other}; ask "
                    "missing_chunks() which models remain instead of retraining finished ones"
                )
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    # ---------------------------------------------------------------- reading

    def load_all(self) -> SubsetRuns:
        """Assemble every finished chunk into (R, N) / (R, M) tables ordered by model id.

        Raises DataError if a model id appears in two chunk files, if a chunk has the wrong shapes,
        or if an optional table (loss/margin) is in some chunks but not in others.
        """
        files = self.chunk_files()
        if not files:
            raise DataError(f"{self.chunk_dir}: no finished chunks to load; train some models first")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("model_ids", "seeds", "masks", *REQUIRED_FIELDS)}
        optional: dict[str, list[np.ndarray]] = {k: [] for k in OPTIONAL_FIELDS}
        owner: dict[int, Path] = {}
        for path in files:
            try:
                data = dict(np.load(path))
            except _UNREADABLE as err:
                raise DataError(f"{path}: unreadable chunk ({err}); delete it to retrain its models") from err
            for key in parts:
                if key not in data:
                    raise DataError(f"{path}: missing key {key!r}; delete the file to retrain its models")
            ids = np.asarray(data["model_ids"], dtype=np.int64)
            for model_id in ids.tolist():
                if model_id in owner:
                    raise DataError(
                        f"model {model_id} is stored twice, in {owner[model_id]} and {path}; delete "
                        "one of the files"
                    )
                owner[model_id] = path
            expected = {"masks": self.n_train, "correct_train": self.n_train, "correct_test": self.n_test,
                        "loss_train": self.n_train, "margin_train": self.n_train,
                        "loss_test": self.n_test, "margin_test": self.n_test}
            for key, n_cols in expected.items():
                if key in data and data[key].shape != (ids.size, n_cols):
                    raise DataError(f"{path}: {key} has shape {data[key].shape}, expected {(ids.size, n_cols)}")
            for key in parts:
                parts[key].append(data[key])
            for key in OPTIONAL_FIELDS:
                optional[key].append(data.get(key))
        ids = np.concatenate(parts["model_ids"]).astype(np.int64)
        order = np.argsort(ids, kind="stable")
        tables = {key: np.concatenate(value)[order] for key, value in parts.items()}
        for key, values in optional.items():
            present = [v is not None for v in values]
            if any(present) and not all(present):
                lacking = files[present.index(False)]
                raise DataError(f"{lacking}: has no {key!r} while other chunks do; delete it to retrain its models")
            tables[key] = np.concatenate(values)[order] if all(present) else None
        return SubsetRuns(**tables)


def open_influence_memmap(path: str | os.PathLike, n_test: int, n_train: int,
                          dtype: Any = np.float32) -> np.memmap:
    """A new (n_test, n_train) `.npy` file mapped into memory, for `influence(..., out=...)`."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        raise ConfigError(f"influence matrix dtype: expected float16, float32 or float64, got {dtype}")
    shape = (int(n_test), int(n_train))
    return np.lib.format.open_memmap(os.fspath(path), mode="w+", dtype=dtype, shape=shape)


# ------------------------------------------------------------------------------------------------
# the original's released runs


@dataclass(frozen=True)
class OriginalRuns:
    """Runs at one subset ratio of a released tree, rows in run order.

    masks: (R, N) bool; correct_train: (R, N) (trained-on and removed examples, by example index);
    correct_test: (R, M); run_ids: the run directory names; paths: their aux_arrays.npz files.
    """

    ratio: float
    run_ids: list[str]
    masks: np.ndarray
    correct_train: np.ndarray
    correct_test: np.ndarray
    paths: list[Path] = field(default_factory=list)


def _load_aux(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: could not read ({err})") from err
    for key in ORIGINAL_KEYS:
        if key not in arrays:
            raise DataError(
                f"{path}: missing key {key!r}; expected the keys {', '.join(ORIGINAL_KEYS)} (and "
                f"subsample_idx), found {', '.join(sorted(arrays)) or 'none'}"
            )
    for split in ("train", "removed", "test"):
        c, i = arrays[f"correctness_{split}"], arrays[f"index_{split}"]
        if c.ndim != 1 or i.ndim != 1 or c.shape != i.shape:
            raise DataError(
                f"{path}: correctness_{split} {c.shape} and index_{split} {i.shape} must be 1-D of equal length"
            )
        if i.size and not np.issubdtype(i.dtype, np.integer):
            raise DataError(f"{path}: index_{split} must hold integer example indices, got {i.dtype}")
    return arrays


def _is_permutation(index: np.ndarray, n: int) -> bool:
    if index.size != n:
        return False
    seen = np.zeros(n, dtype=bool)
    if n and (index.min() < 0 or index.max() >= n):
        return False
    seen[index] = True
    return bool(seen.all())


def _ratio_of(name: str) -> float | None:
    try:
        return float(name)
    except ValueError:
        return None


def _run_order(name: str) -> tuple:
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def read_original_runs(root: str | os.PathLike) -> dict[float, OriginalRuns]:
    """Read `<root>/<subset_ratio>/<run_id>/aux_arrays.npz` into per-ratio (R, N) tables.

    Each aux file holds correctness_{train,removed,test} with index_{train,removed,test} (the
    examples the run trained on, held out, and the test set, each in the order evaluated) and
    subsample_idx (the trained-on indices). Per run, mask[i] = 1[i in index_train], and
    correct_train[index_train] = correctness_train, correct_train[index_removed] =
    correctness_removed, correct_test[index_test] = correctness_test, so columns are ordered by
    example index. Directories whose name is not a number are skipped; ratios are returned in
    increasing order. Raises DataError naming the file on a missing file or key, indices that do
    not cover 0..N-1 exactly once, sizes that differ between runs, or subsample_idx != index_train.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; expected <root>/<subset_ratio>/<run_id>/{ORIGINAL_FILE}")
    ratio_dirs = sorted((d for d in root.iterdir() if d.is_dir() and _ratio_of(d.name) is not None),
                        key=lambda d: _ratio_of(d.name))
    if not ratio_dirs:
        found = sorted(d.name for d in root.iterdir())[:10]
        raise DataError(
            f"{root}: no subset-ratio directories (named like 0.7); expected "
            f"<root>/<subset_ratio>/<run_id>/{ORIGINAL_FILE}, found {found}"
        )
    sizes: tuple[int, int] | None = None
    size_source: Path | None = None
    result: dict[float, OriginalRuns] = {}
    for ratio_dir in ratio_dirs:
        ratio = _ratio_of(ratio_dir.name)
        if ratio in result:
            raise DataError(f"{ratio_dir}: ratio {ratio} appears under two directory names")
        run_dirs = sorted((d for d in ratio_dir.iterdir() if d.is_dir()), key=lambda d: _run_order(d.name))
        if not run_dirs:
            raise DataError(f"{ratio_dir}: no run directories; expected {ratio_dir}/<run_id>/{ORIGINAL_FILE}")
        masks, train, test, paths = [], [], [], []
        for run_dir in run_dirs:
            path = run_dir / ORIGINAL_FILE
            if not path.is_file():
                raise DataError(f"{path}: missing; every run directory needs its {ORIGINAL_FILE}")
            a = _load_aux(path)
            n = a["index_train"].size + a["index_removed"].size
            m = a["index_test"].size
            if sizes is None:
                sizes, size_source = (n, m), path
            elif (n, m) != sizes:
                raise DataError(
                    f"{path}: {n} training and {m} test examples, but {size_source} has "
                    f"{sizes[0]} and {sizes[1]}; all runs must cover the same data"
                )
            train_index = np.concatenate([a["index_train"], a["index_removed"]]).astype(np.int64)
            if not _is_permutation(train_index, n):
                raise DataError(
                    f"{path}: index_train and index_removed together must list each of the {n} "
                    "training examples 0..N-1 exactly once"
                )
            if not _is_permutation(a["index_test"].astype(np.int64), m):
                raise DataError(f"{path}: index_test must list each of the {m} test examples 0..M-1 exactly once")
            if "subsample_idx" in a and not np.array_equal(np.sort(a["subsample_idx"].astype(np.int64)),
                                                           np.sort(a["index_train"].astype(np.int64))):
                raise DataError(f"{path}: subsample_idx and index_train name different training examples")
            mask = np.zeros(n, dtype=bool)
            mask[a["index_train"]] = True
            correct = np.empty(n, dtype=np.result_type(a["correctness_train"], a["correctness_removed"]))
            correct[a["index_train"]] = a["correctness_train"]
            correct[a["index_removed"]] = a["correctness_removed"]
            correct_test = np.empty(m, dtype=a["correctness_test"].dtype)
            correct_test[a["index_test"]] = a["correctness_test"]
            masks.append(mask)
            train.append(correct)
            test.append(correct_test)
            paths.append(path)
        result[ratio] = OriginalRuns(ratio, [d.name for d in run_dirs], np.stack(masks), np.stack(train),
                                     np.stack(test), paths)
    return result
