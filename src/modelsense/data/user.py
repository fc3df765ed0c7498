"""A user's own dataset: `--dataset path/to/file.py:make_data` (or `package.module:make_data`).

`make_data()` returns a `(train, test)` pair of map-style datasets (`torch.utils.data.Dataset`: `len`
and `[i]`) whose items are `(x, y)`: `x` a tensor or array of one example's shape, `y` an integer
class label. The examples are read once, in order, into float32 inputs and labels, checked like a
data file (finite values, whole labels 0..C-1) and then given the same options (`--n-train`,
`--corruption-ratio`, `--standardize` ...).

Data of any size: the inputs of a split that take more than `scratch.IN_MEMORY_BYTES` (1 GiB) are
written into a private temporary memory-mapped file (`scratch.scratch_array`: under
`$MODELSENSE_SCRATCH` or the system temp dir, unlinked at once, its disk space checked first) instead
of RAM, and every later step (checks, subset, class drop, standardisation, the tensors of the
`Dataset`) works on it in chunks without a whole in-memory copy. The labels (8 bytes per example)
are held in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from modelsense.data import scratch
from modelsense.errors import DataError
from modelsense.user import call, load_callable


def _split(split: Any, which: str, reference: str) -> tuple[np.ndarray, np.ndarray]:
    if not hasattr(split, "__len__") or not hasattr(split, "__getitem__"):
        raise DataError(f"--dataset {reference}: the {which} set is a {type(split).__name__}, not a map-style dataset "
                        "(an object with len() and [i], e.g. torch.utils.data.TensorDataset)")
    n = len(split)
    if n == 0:
        raise DataError(f"--dataset {reference}: the {which} set is empty")
    first = split[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise DataError(f"--dataset {reference}: item 0 of the {which} set is a {type(first).__name__}; expected a "
                        "pair (x, y): the input and its class label")
    shape = tuple(np.shape(np.asarray(first[0])))
    need = n * int(np.prod(shape, dtype=np.int64)) * 4
    if need > scratch.IN_MEMORY_BYTES:
        x = scratch.scratch_array((n, *shape), np.float32, f"--dataset {reference}: the inputs of the {which} set")
    else:
        x = np.empty((n, *shape), dtype=np.float32)
    y = np.empty(n, dtype=np.float64)
    ends = {s.stop for s in scratch.row_chunks(x)}
    for i in range(n):
        item = split[i]
        xi = np.asarray(item[0].detach().cpu() if isinstance(item[0], torch.Tensor) else item[0], dtype=np.float32)
        if xi.shape != shape:
            raise DataError(f"--dataset {reference}: item {i} of the {which} set has an input of shape {xi.shape}, "
                            f"item 0 has {shape}; every input must have one shape")
        x[i] = xi
        yi = np.asarray(item[1].detach().cpu() if isinstance(item[1], torch.Tensor) else item[1])
        if yi.size != 1:
            raise DataError(f"--dataset {reference}: item {i} of the {which} set has a label of shape {yi.shape}; "
                            "expected one class label per example")
        y[i] = float(yi.reshape(()))
        if i + 1 in ends:
            scratch.release(x)  # written pages leave the resident set (they stay in the file)
    return x, y


def load_user_arrays(reference: str) -> dict[str, Any]:
    """The arrays of the user's dataset `reference` (see the module docstring), as the file readers give."""
    factory = load_callable(reference, "--dataset")
    pair = call(factory, f"--dataset {reference}")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise DataError(f"--dataset {reference} returned a {type(pair).__name__}; expected a (train, test) pair of "
                        "datasets")
    x_train, y_train = _split(pair[0], "training", reference)
    x_test, y_test = _split(pair[1], "test", reference)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "source": reference,
            "split": "given"}


__all__ = ["load_user_arrays"]
