"""Checks on arrays and options at the data boundary.

Every function here raises `DataError` with a message that says what was expected, what was
received and how to fix it. They run on plain numpy arrays before any tensor is built, so a bad
file never ends in a traceback from inside numpy or torch.

One way to say where a bad value is (`row_location`): "row N of ARRAY in FILE (ARRAY[N-1])" for
arrays, "row N of FILE (line L; rows are counted from 1 after the header)" for text tables. Rows
are examples, counted from 1. Numbers are shown plainly (`plain`: `nan`, `1.5`, never a numpy
type name).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from modelsense.data.scratch import release, row_chunks
from modelsense.errors import DataError

#: The largest class id accepted (labels are class ids 0..K-1, K the number of classes).
MAX_CLASS_ID = 2**31 - 1


def plain(value: Any) -> str:
    """A value as a user would type it: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    return repr(value)


def row_location(i: int, name: str, where: str = "", lines: Sequence[int] | None = None) -> str:
    """Where example `i` (0-based) of the array `name` is, said the same way in every message.

    Arrays: "row i+1 of NAME in WHERE (NAME[i])". Text tables (`lines[i]` the line of the file
    holding example i): "row i+1 of WHERE (line L; rows are counted from 1 after the header)".
    """
    if lines is not None:
        return f"row {i + 1} of {where} (line {int(lines[i])}; rows are counted from 1 after the header)"
    src = f" in {where}" if where else ""
    return f"row {i + 1} of {name}{src} ({name}[{i}])"


def check_features(x: Any, split: str, where: str = "", name: str | None = None,
                   lines: Sequence[int] | None = None) -> np.ndarray:
    """Validate a feature array and return it as C-contiguous float32 (no copy when it is one
    already, e.g. a memory-mapped array; the NaN/inf check runs in row chunks).

    Args:
        x: array of shape (n, *input_shape) with n >= 1 and at least 2 dimensions in total.
        split: "train" or "test" (used in messages as `x_train` / `x_test`).
        where: where the array came from (a file path), appended to messages.
        name: the array's name in messages when not `x_{split}` (e.g. "X" of a file not yet split).
        lines: for a text table, the line of the file holding each row (see `row_location`).

    Raises:
        DataError: not numeric, fewer than 2 dimensions, no examples, or NaN/inf values.
    """
    src = f" in {where}" if where else ""
    name = name or f"x_{split}"
    part = f"the {split} split" if split else name
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(
            f"{name}{src} must hold numbers, got dtype {x.dtype}; store features as a numeric "
            "array (int or float)."
        )
    if np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{name}{src} holds complex numbers (dtype {x.dtype}); features must be real.")
    if x.ndim < 2:
        raise DataError(
            f"{name}{src} must have shape (n_examples, *feature_shape) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}; for one feature per example use x.reshape(-1, 1)."
        )
    if x.shape[0] == 0:
        raise DataError(f"{part}{src} is empty ({name} has shape {tuple(x.shape)}); "
                        f"every split needs at least one example.")
    if any(d == 0 for d in x.shape[1:]):
        raise DataError(f"{name}{src} has an empty feature dimension (shape {tuple(x.shape)}).")
    if np.issubdtype(x.dtype, np.floating):
        n_nan = n_inf = 0
        bad = []
        for s in row_chunks(x):  # in row chunks: no whole boolean copy of a large (memory-mapped) array
            part = x[s].reshape(s.stop - s.start, -1)
            finite = np.isfinite(part)
            if not finite.all():
                nan = int(np.isnan(part).sum())
                n_nan, n_inf = n_nan + nan, n_inf + int(finite.size - finite.sum()) - nan
                bad.append(s.start + np.flatnonzero(~finite.all(axis=1)))
            release(x)
        if bad:
            bad_rows = np.concatenate(bad)
            raise DataError(
                f"{name}: {n_nan} NaN and {n_inf} inf values in {bad_rows.size} example(s), the "
                f"first at {row_location(int(bad_rows[0]), name, where, lines)}; remove or impute "
                "those examples before loading."
            )
    return np.ascontiguousarray(x, dtype=np.float32)


def check_labels(
    y: Any, split: str, num_classes: int | None = None, where: str = "", name: str | None = None,
    lines: Sequence[int] | None = None,
) -> np.ndarray:
    """Validate class labels and return them as int64.

    Accepts integer or boolean arrays, and float arrays whose values are all whole numbers
    (e.g. 3.0). Labels must lie in 0..MAX_CLASS_ID and, when `num_classes` is given, be
    < num_classes. `lines`: as in `check_features`.

    Raises:
        DataError: not 1-D, empty, non-numeric, non-integral, negative or out of range.
    """
    src = f" in {where}" if where else ""
    name = name or f"y_{split}"
    part = f"the {split} split" if split else name
    y = np.asarray(y)
    if y.ndim != 1:
        hint = " (one-hot labels? pass y.argmax(axis=1))" if y.ndim == 2 else ""
        raise DataError(
            f"{name}{src} must be 1-D with one class id per example, got shape {tuple(y.shape)}{hint}."
        )
    if y.shape[0] == 0:
        raise DataError(f"{part}{src} is empty ({name} has no labels); every split needs "
                        "at least one example.")
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if y.dtype == object or not np.issubdtype(y.dtype, np.number) or np.issubdtype(
        y.dtype, np.complexfloating
    ):
        raise DataError(
            f"{name}{src} must hold integer class ids 0..K-1, got dtype {y.dtype}; encode class "
            "names as integers first."
        )
    if np.issubdtype(y.dtype, np.floating):
        finite = np.isfinite(y)
        integral = finite & (np.floor(np.where(finite, y, 0)) == y)
        if not integral.all():
            bad = np.flatnonzero(~integral)
            raise DataError(
                f"{name}: {bad.size} label(s) that are not whole numbers, the first "
                f"{plain(y[bad[0]])} at {row_location(int(bad[0]), name, where, lines)}; class "
                "labels must be integers 0..K-1 (this loader does classification, not regression)."
            )
    # before the cast to int64: huge floats or uint64 would wrap around
    big = (y.astype(np.float64) if np.issubdtype(y.dtype, np.floating) else y) > MAX_CLASS_ID
    if big.any():
        bad = np.flatnonzero(big)
        raise DataError(
            f"{name}: {bad.size} label(s) larger than {MAX_CLASS_ID}, the first "
            f"{plain(y[bad[0]])} at {row_location(int(bad[0]), name, where, lines)}; class labels "
            "must be integers 0..K-1 with K the number of classes; renumber them, e.g. "
            "y = numpy.unique(y, return_inverse=True)[1]."
        )
    y = y.astype(np.int64)
    if (y < 0).any():
        bad = np.flatnonzero(y < 0)
        raise DataError(
            f"{name}: {bad.size} negative label(s), the first {int(y[bad[0]])} at "
            f"{row_location(int(bad[0]), name, where, lines)}; class labels must be integers 0..K-1."
        )
    if num_classes is not None and (y >= num_classes).any():
        bad = np.flatnonzero(y >= num_classes)
        raise DataError(
            f"{name}: {bad.size} label(s) >= num_classes={num_classes}, the first "
            f"{int(y[bad[0]])} at {row_location(int(bad[0]), name, where, lines)}; labels must lie "
            f"in 0..{num_classes - 1}."
        )
    return y


def check_class_count(num_classes: int, n_examples: int, where: str = "", labels: str = "the labels",
                      given: bool = False) -> None:
    """Refuse more classes than examples, before anything of that size (an output layer, a count
    per class) is allocated.

    With K classes numbered 0..K-1 every class can have an example only when K <= n_examples; a
    larger K means the labels are ids of another kind (e.g. codes 1000, 2000, ...) that would make
    the model predict mostly empty classes. `num_classes` is the largest label + 1, or the count a
    file states (`given`).

    Raises:
        DataError: num_classes > n_examples, with the fix (renumber the labels).
    """
    if num_classes > n_examples:
        src = f" in {where}" if where else ""
        what = (f"num_classes{src} is {num_classes}" if given else
                f"{labels}{src} go up to {num_classes - 1}, which would mean {num_classes} classes")
        raise DataError(
            f"{what} for {n_examples} examples; class labels must be numbered 0..K-1 with K the "
            "number of classes (at most one per example): renumber them, e.g. "
            "y = numpy.unique(y, return_inverse=True)[1]."
        )


def check_arrays(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    num_classes: int | None = None,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Validate a train/test split; return float32 features, int64 labels and the class count.

    `num_classes` defaults to max(label) + 1 over both splits.

    Raises:
        DataError: any of the checks of `check_features`/`check_labels`, x and y of different
            lengths, train and test feature shapes that differ, or more classes than examples
            (`check_class_count`).
    """
    src = f" in {where}" if where else ""
    x_train = check_features(x_train, "train", where)
    x_test = check_features(x_test, "test", where)
    y_train = check_labels(y_train, "train", num_classes, where)
    y_test = check_labels(y_test, "test", num_classes, where)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"x_{split} and y_{split}{src} have different lengths ({x.shape[0]} examples vs "
                f"{y.shape[0]} labels); each example needs exactly one label."
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"train and test features{src} have different shapes per example: "
            f"{tuple(x_train.shape[1:])} vs {tuple(x_test.shape[1:])}."
        )
    given = num_classes is not None
    if not given:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    check_class_count(int(num_classes), y_train.shape[0] + y_test.shape[0], where, given=given)
    return x_train, y_train, x_test, y_test, int(num_classes)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_options(
    n_train: Any, corruption_ratio: Any, drop_classes: Any, standardize: Any, seed: Any
) -> tuple[int | None, float, tuple[int, ...], bool | None, int]:
    """Validate the dataset options that do not depend on the data; return them normalised.

    Raises:
        DataError: n_train not a positive integer, corruption_ratio not a number in [0, 1],
            drop_classes not non-negative integers, standardize not True/False/None, seed not a
            non-negative integer.
    """
    if n_train is not None:
        if not _is_int(n_train) or n_train < 1:
            raise DataError(
                f"n_train must be a positive integer (or None for the full training set), got "
                f"{plain(n_train)}."
            )
        n_train = int(n_train)
    if isinstance(corruption_ratio, bool) or not isinstance(corruption_ratio, numbers.Real):
        raise DataError(f"corruption_ratio must be a number in [0, 1], got {plain(corruption_ratio)}.")
    corruption_ratio = float(corruption_ratio)
    if not 0.0 <= corruption_ratio <= 1.0:
        raise DataError(
            f"corruption_ratio must lie in [0, 1] (the fraction of training labels to corrupt), "
            f"got {plain(corruption_ratio)}; e.g. 0.1 corrupts 10% of the labels."
        )
    if drop_classes is None:
        drop_classes = ()
    if isinstance(drop_classes, (str, bytes)) or not isinstance(drop_classes, Iterable):
        drop_classes = (drop_classes,)
    dropped = []
    for c in drop_classes:
        if isinstance(c, str) and c.strip().lstrip("-").isdigit():
            c = int(c)
        if not _is_int(c) or c < 0:
            raise DataError(
                f"drop_classes must be class ids (integers >= 0), got {plain(c)} in {plain(list(drop_classes))}."
            )
        dropped.append(int(c))
    if standardize is not None and not isinstance(standardize, (bool, np.bool_)):
        raise DataError(f"standardize must be True, False or None (automatic), got {plain(standardize)}.")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {plain(seed)}.")
    standardize = None if standardize is None else bool(standardize)
    return n_train, corruption_ratio, tuple(sorted(set(dropped))), standardize, int(seed)


def check_data_options(
    y_train: np.ndarray,
    num_classes: int,
    n_train: int | None,
    corruption_ratio: float,
    drop_classes: tuple[int, ...],
    dataset: str,
) -> None:
    """Validate the options that depend on the loaded labels (before any transform runs).

    Raises:
        DataError: unknown classes in `drop_classes`, every class dropped, `n_train` larger than
            the available training examples or smaller than the number of classes present,
            label corruption with fewer than 2 classes.
    """
    unknown = [c for c in drop_classes if c >= num_classes]
    if unknown:
        raise DataError(
            f"drop_classes {unknown} are not classes of {dataset!r}, which has classes "
            f"0..{num_classes - 1}."
        )
    kept = num_classes - len(drop_classes)
    if kept == 0:
        raise DataError(
            f"drop_classes {list(drop_classes)} removes every class of {dataset!r}; keep at least one "
            "(at least two to train a classifier)."
        )
    keep = ~np.isin(y_train, np.asarray(drop_classes, dtype=np.int64))
    available = int(keep.sum())
    after = f" after dropping classes {list(drop_classes)}" if drop_classes else ""
    if available == 0:
        raise DataError(f"no training examples of {dataset!r} are left{after}.")
    if n_train is not None:
        if n_train > available:
            raise DataError(
                f"n_train={n_train} is larger than the {available} training examples of "
                f"{dataset!r}{after}; pass n_train <= {available} or None for all of them."
            )
        present = int(np.unique(y_train[keep]).size)
        if n_train < present:
            raise DataError(
                f"n_train={n_train} is smaller than the {present} classes in the training set of "
                f"{dataset!r}{after}; the stratified subset needs at least one example per class."
            )
    if corruption_ratio > 0 and kept < 2:
        raise DataError(
            f"label corruption needs at least 2 classes to move labels between, {dataset!r} has "
            f"{kept}{after}; set corruption_ratio=0."
        )
