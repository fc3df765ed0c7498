"""The released runs of Feldman & Zhang 2020 / Jiang et al. 2021 (`<subset_ratio>/<run_id>/aux_arrays.npz`),
read into the (R, N) tables of the memorization estimators; and the memory-mapped influence matrix.

Models this package trains itself are jobs of the ground-truth store (`modelsense.retraining.store`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.errors import ConfigError, DataError

ORIGINAL_FILE = "aux_arrays.npz"
ORIGINAL_KEYS = ("correctness_train", "correctness_removed", "correctness_test",
                 "index_train", "index_removed", "index_test")


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


SPLITS = ("train", "test")


def read_recorded_correctness(path: str | os.PathLike, split: str = "test") -> np.ndarray:
    """The per-example correctness an aux_arrays.npz recorded for `split`, ordered by example index.

    split "test": correctness_test placed at index_test; "train": the full training set,
    correctness_train at index_train and correctness_removed at index_removed (the examples the
    run trained on and those it held out), as the original demo.py compares them. Returns (n,) bool.
    Raises DataError naming the file on a missing key or indices that do not cover 0..n-1 once.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected an {ORIGINAL_FILE} with correctness_<split> and index_<split>")
    a = _load_aux(path)
    parts = ("train", "removed") if split == "train" else ("test",)
    correct = np.concatenate([a[f"correctness_{p}"] for p in parts])
    index = np.concatenate([a[f"index_{p}"] for p in parts]).astype(np.int64)
    if not _is_permutation(index, index.size):
        raise DataError(f"{path}: index_{' and index_'.join(parts)} must list each of the {index.size} {split} "
                        f"examples 0..{index.size - 1} exactly once")
    out = np.zeros(index.size, dtype=bool)
    out[index] = np.asarray(correct).astype(bool)
    return out
