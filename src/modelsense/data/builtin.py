"""Datasets that need no files: `digits` (scikit-learn) and `mnist1d` (generated offline).

`digits`: sklearn's 1797 8x8 handwritten digits, pixels / 16 in [0, 1], shape (1, 8, 8); a
stratified split of 1297 train / 500 test (`train_test_split(test_size=500, random_state=0,
stratify=y)`), the same for every seed.

`mnist1d`: the MNIST-1D benchmark generated with the `mnist1d` package's `make_dataset` and its
default arguments (5000 signals of length 40, 10 classes, 4000 train / 1000 test, generator seed
42). Nothing is downloaded. Generation takes about a second; the arrays are kept in an in-process
cache and on disk under `$MODELSENSE_CACHE_DIR` (default `$XDG_CACHE_HOME/modelsense` or
`~/.cache/modelsense`), keyed by the package version and the arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_N_TEST = 500
DIGITS_SPLIT_SEED = 0


def load_digits_arrays() -> dict[str, Any]:
    """sklearn digits as (n, 1, 8, 8) float32 in [0, 1] with the fixed 1297/500 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    index = np.arange(y.shape[0])
    i_train, i_test = train_test_split(
        index, test_size=DIGITS_N_TEST, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return {
        "x_train": x[i_train], "y_train": y[i_train], "x_test": x[i_test], "y_test": y[i_test],
        "num_classes": 10, "source": "sklearn.datasets.load_digits",
        "split": f"stratified, {DIGITS_N_TEST} test, random_state={DIGITS_SPLIT_SEED}",
        "class_names": [str(c) for c in range(10)],
    }


# ---------------------------------------------------------------------------------------------
# mnist1d

_MNIST1D_MEMORY: dict[str, dict[str, np.ndarray]] = {}


def cache_dir() -> Path:
    """Where generated datasets are cached on disk."""
    if os.environ.get("MODELSENSE_CACHE_DIR"):
        return Path(os.environ["MODELSENSE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelsense"


def _mnist1d_args() -> Any:
    from mnist1d.data import get_dataset_args

    return get_dataset_args()


def _mnist1d_key(args: Any) -> str:
    try:
        from importlib.metadata import version

        pkg_version = version("mnist1d")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pkg_version = "unknown"
    settings = {k: v for k, v in vars(args).items() if k != "url"}
    blob = json.dumps({"mnist1d": pkg_version, "args": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _generate_mnist1d(args: Any) -> dict[str, np.ndarray]:
    """Run `mnist1d.data.make_dataset`, leaving the global `random`/numpy RNG states untouched
    (the package reseeds them)."""
    from mnist1d.data import make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x_train": np.asarray(raw["x"], dtype=np.float32),
        "y_train": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception:  # missing, partial or damaged cache: regenerate
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically (temporary file in the same folder, then rename);
    a read-only or missing cache folder is silently skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def load_mnist1d_arrays(use_disk_cache: bool = True) -> dict[str, Any]:
    """MNIST-1D (4000 train / 1000 test, features (40,), 10 classes) as float32/int64 arrays.

    The generator standardises the whole set to mean 0, std 1 (one scalar); no further
    normalisation is applied here. Returned arrays are copies (the caches stay intact).
    """
    args = _mnist1d_args()
    key = _mnist1d_key(args)
    arrays = _MNIST1D_MEMORY.get(key)
    path = cache_dir() / f"mnist1d-{key}.npz"
    if arrays is None and use_disk_cache:
        arrays = _read_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d(args)
        if use_disk_cache:
            _write_cache(path, arrays)
    _MNIST1D_MEMORY[key] = arrays
    out: dict[str, Any] = {k: v.copy() for k, v in arrays.items()}
    out.update(
        num_classes=10,
        source="mnist1d.data.make_dataset (default arguments, generated offline)",
        split="the generator's: first 80% train, last 20% test",
        class_names=[str(c) for c in range(10)],
        mnist1d_cache_key=key,
    )
    return out
