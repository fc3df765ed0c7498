"""Options applied to a loaded split: drop classes, subset, corrupt labels, standardise.

Numbers in, numbers out (numpy arrays); `loaders.load_dataset` applies them in this order:

1. `drop_classes` -- remove examples of some classes from both splits, relabel the kept classes
   by rank (`kept_classes[new_label] == old_label`).
2. `stratified_subset` -- a seeded subset of the training set with per-class proportions kept.
3. `corrupt_labels_symmetric` -- a seeded fraction of training labels moved to another class.
4. `standardize_features` -- per-feature mean/std of the training set applied to both splits.
"""

from __future__ import annotations

import numpy as np

from modelsense.data import scratch
from modelsense.data.scratch import release, row_chunks


def class_keep_masks(
    y_train: np.ndarray, y_test: np.ndarray, drop: tuple[int, ...], num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which examples survive dropping classes `drop`, and the old -> new label table.

    Returns:
        keep_train (n_train,) bool, keep_test (n_test,) bool, kept_classes (K',) int64 sorted old
        ids, lookup (num_classes,) int64 with lookup[old] = rank of old among kept_classes (-1 for
        dropped). When the kept classes are 0..K'-1 the lookup is the identity on them.
    """
    dropped = np.zeros(num_classes, dtype=bool)
    dropped[np.asarray(drop, dtype=np.int64)] = True
    kept_classes = np.flatnonzero(~dropped).astype(np.int64)
    lookup = np.full(num_classes, -1, dtype=np.int64)
    lookup[kept_classes] = np.arange(kept_classes.size, dtype=np.int64)
    return ~dropped[y_train], ~dropped[y_test], kept_classes, lookup


def stratified_allocation(class_counts: np.ndarray, n: int) -> np.ndarray:
    """How many examples of each class a stratified sample of size `n` takes.

    Every class with at least one example gets one; the remaining n - K_present are shared in
    proportion to (count_c - 1) by the largest-remainder rule (ties to the lower class id). The
    result never exceeds `class_counts` and sums to `n`.

    Args:
        class_counts: (K,) examples per class (zeros allowed).
        n: sample size, K_present <= n <= class_counts.sum().
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    present = counts > 0
    base = present.astype(np.int64)
    spare = counts - base
    rest = n - int(base.sum())
    total_spare = int(spare.sum())
    if rest <= 0 or total_spare == 0:
        return base
    exact = spare * rest / total_spare
    alloc = np.floor(exact).astype(np.int64)
    left = rest - int(alloc.sum())
    if left > 0:
        order = np.lexsort((np.arange(counts.size), -(exact - alloc)))
        alloc[order[:left]] += 1
    return base + alloc


def stratified_subset(y: np.ndarray, n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded stratified sample of `n` examples from labels `y` (n_total,).

    Class c contributes `stratified_allocation(bincount(y), n)[c]` examples drawn uniformly
    without replacement from its examples.
    """
    counts = np.bincount(y, minlength=num_classes)
    take = stratified_allocation(counts, n)
    # a random key per example, then the `take[c]` smallest keys inside each class
    keys = rng.random(y.shape[0])
    order = np.lexsort((keys, y))  # grouped by class, random inside each class
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank_in_class = np.arange(y.shape[0]) - np.repeat(starts, counts)
    chosen = order[rank_in_class < np.repeat(take, counts)]
    return np.sort(chosen)


def corrupt_labels_symmetric(
    y: np.ndarray, ratio: float, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise that always changes the label.

    Picks m = round(ratio * n) training indices uniformly without replacement (Python `round`,
    half to even) and gives each a label drawn uniformly from the other num_classes - 1 classes:
    y_new = (y + u) mod K with u ~ Uniform{1, ..., K-1}.

    Returns:
        (y_new (n,) int64, corrupted (m,) sorted int64 indices); y_new[i] != y[i] exactly for i in
        `corrupted`.
    """
    n = y.shape[0]
    m = int(round(ratio * n))
    chosen = np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
    shift = rng.integers(1, num_classes, size=m)
    y_new = y.copy()
    y_new[chosen] = (y[chosen] + shift) % num_classes
    return y_new, chosen


def standardize_features(
    x_train: np.ndarray, x_test: np.ndarray, chunk_size: int | None = None,
    in_place: tuple[bool, bool] = (False, False)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature standardisation with training statistics.

    mean = x_train.mean(0), std = x_train.std(0) (population, ddof=0), both accumulated in
    float64 over row chunks of `chunk_size` (None: 4096 rows, fewer for rows of more than 2048
    features so that a float64 chunk stays near `scratch.CHUNK_BYTES`; two passes, so memory
    stays at one float32 copy);
    std is replaced by 1 where it is 0. Returns ((x_train - mean)/std, (x_test - mean)/std,
    mean, std) as float32, mean/std of shape input_shape (every pixel of an image is its own
    feature). `in_place[0]` / `in_place[1]`: x_train / x_test (float32) is overwritten with its
    result in row chunks instead of copied (for a private memory-mapped array: no copy of its size
    in memory); the numbers are the same.
    """
    n = x_train.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(4096, scratch.CHUNK_BYTES // (8 * max(1, int(np.prod(x_train.shape[1:]))))))
    total = np.zeros(x_train.shape[1:], dtype=np.float64)
    for start in range(0, n, chunk_size):
        total += x_train[start:start + chunk_size].sum(axis=0, dtype=np.float64)
        release(x_train)
    mean = total / n
    squares = np.zeros_like(mean)
    for start in range(0, n, chunk_size):
        squares += np.square(x_train[start:start + chunk_size] - mean).sum(axis=0)
        release(x_train)
    std = np.sqrt(squares / n)
    std[std == 0] = 1.0
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)

    def apply(x: np.ndarray, own: bool) -> np.ndarray:
        if not own:
            out = x - mean32
            out /= std32
            return out
        for s in row_chunks(x):
            x[s] -= mean32
            x[s] /= std32
            release(x)
        return x

    return apply(x_train, in_place[0]), apply(x_test, in_place[1]), mean32, std32
