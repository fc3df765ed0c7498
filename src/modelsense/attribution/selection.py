"""Which training examples to act on, from a score per example: Otsu's threshold (relabeling), the
pruning set (the lowest or highest scores, optionally class-balanced), and the relabeling maths
(`relabel_targets`, `relabeled`, `relabel_quality`, `best_budgets`).

    >>> t = otsu_threshold(self_scores)            # flag the examples with score > t
    >>> removed = pruning_set(self_scores, k=100, labels=y, n_classes=10, class_balance_ratio=0.5)
"""

from __future__ import annotations

import numpy as np

from modelsense.errors import ConfigError


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the scores' histogram (as skimage.filters.threshold_otsu, which the GEX code
    calls): with `bins` equal-width bins over [min, max] of centres c_b and counts n_b, the centre c_t
    that maximises the between-class variance

        w_0(t) w_1(t) (μ_0(t) − μ_1(t))²,   w_0 = Σ_{b<=t} n_b, w_1 = Σ_{b>t} n_b,
        μ_0 = Σ_{b<=t} n_b c_b / w_0,      μ_1 = Σ_{b>t} n_b c_b / w_1

    (on ties, as over the empty bins between two modes, the first up to rounding).
    The examples above the threshold (score > t) form the upper class.
    Non-finite scores are left out; all scores equal: that value.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ConfigError("Otsu's threshold needs finite scores; received none")
    if bins < 2:
        raise ConfigError(f"Otsu's threshold needs at least 2 bins, received {bins}")
    lo, hi = float(s.min()), float(s.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = np.cumsum(counts[::-1])[::-1]
    m0 = np.cumsum(counts * centres) / np.maximum(w0, 1)
    m1 = (np.cumsum((counts * centres)[::-1]) / np.maximum(w1[::-1], 1))[::-1]
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def pruning_set(scores: np.ndarray, k: int, labels: np.ndarray | None = None, n_classes: int | None = None,
                class_balance_ratio: float = 0.0, remove: str = "lowest") -> np.ndarray:
    """Indices of the k examples to remove (sorted), as the GEX code's `--num_filter` with
    `--class_balance_ratio` r:

      1. class-wise: from each class c, the ⌊r k / C⌋ examples of label c with the lowest scores
         (all of the class if it has fewer);
      2. globally: the k − (number removed in 1) lowest scores among the others.

    r = 0 (default) removes the k lowest scores globally, r = 1 about k/C per class. `remove="highest"`
    removes the highest scores instead. Ties are broken by index (a stable sort). Scores of −inf
    (`lowest`) or +inf (`highest`) are removed first: iterative pruning marks the examples removed
    in an earlier step so.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = len(s)
    if remove not in ("lowest", "highest"):
        raise ConfigError(f"remove must be lowest or highest, received {remove!r}")
    if not 0 <= k <= n:
        raise ConfigError(f"cannot remove {k} of {n} examples")
    if not 0.0 <= class_balance_ratio <= 1.0:
        raise ConfigError(f"--class-balance-ratio must lie in [0, 1], received {class_balance_ratio}")
    if np.isnan(s).any():
        raise ConfigError("pruning needs scores without NaN")
    key = s if remove == "lowest" else -s
    chosen = np.zeros(n, dtype=bool)
    if class_balance_ratio > 0:
        if labels is None or n_classes is None:
            raise ConfigError("class-balanced pruning needs the labels and the number of classes")
        labels = np.asarray(labels).ravel()
        per_class = int(class_balance_ratio * k / n_classes)
        for c in range(n_classes):
            members = np.flatnonzero(labels == c)
            chosen[members[np.argsort(key[members], kind="stable")[:per_class]]] = True
    rest = np.flatnonzero(~chosen)
    chosen[rest[np.argsort(key[rest], kind="stable")[: k - int(chosen.sum())]]] = True
    return np.flatnonzero(chosen)


__all__ = ["otsu_threshold", "pruning_set"]


def relabel_targets(probabilities: np.ndarray, labels: np.ndarray, target: str) -> np.ndarray:
    """The label each example would get, (N,): the most probable class of `probabilities` (N, C)
    (`prediction`, `out-of-fold`), or the most probable class other than its label (`other`)."""
    p = np.array(probabilities, dtype=np.float64)
    if target == "other":
        p[np.arange(len(p)), np.asarray(labels)] = -np.inf
    return p.argmax(1)


def relabeled(labels: np.ndarray, chosen: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`labels` with the examples `chosen` (indices) set to their `targets`."""
    out = np.array(labels, dtype=np.int64)
    out[chosen] = targets[chosen]
    return out


def relabel_quality(chosen: np.ndarray, labels: np.ndarray, corrupted: np.ndarray,
                    clean: np.ndarray) -> tuple[float, float]:
    """(precision, corrected) of relabeling the examples `chosen` (indices) to `labels` (N,): the
    fraction of the chosen examples that are corrupted (NaN when none is chosen), and the fraction of
    the `corrupted` examples (indices) whose label is now their `clean` label (N,)."""
    is_corrupted = np.zeros(len(labels), dtype=bool)
    is_corrupted[corrupted] = True
    precision = float(is_corrupted[chosen].mean()) if len(chosen) else float("nan")
    return precision, float((labels[corrupted] == clean[corrupted]).mean())


def best_budgets(accuracy: dict[str, list[float]], budgets: list[int], random_accuracy: list[float],
                 none_accuracy: float, otsu: dict[str, dict]) -> dict[str, dict]:
    """Per method: the budget (one of `budgets`, or Otsu's where `otsu[method]` has an `accuracy`) with
    the highest test accuracy, and its gains over no relabeling and over relabeling as many examples
    at random: method -> {budget, otsu, accuracy, gain_over_none, gain_over_random}."""
    out = {}
    for m, accs in accuracy.items():
        points = [(a, b, r, False) for a, b, r in zip(accs, budgets, random_accuracy)]
        o = otsu.get(m, {})
        if "accuracy" in o:
            points.append((o["accuracy"], o["budget"], o["random_accuracy"], True))
        a, b, r, is_otsu = max(points, key=lambda p: p[0])
        out[m] = {"budget": b, "otsu": is_otsu, "accuracy": a, "gain_over_none": a - none_accuracy,
                  "gain_over_random": a - r}
    return out
