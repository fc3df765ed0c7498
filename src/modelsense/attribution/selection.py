"""Which training examples to act on, from a score per example: Otsu's threshold (relabeling), the
pruning set (the lowest or highest scores, optionally class-balanced) and the keep-masks of pruning
(`pruning_masks`, iterative or not; `random_removal_masks`), and the relabeling maths
(`relabel_targets`, `relabeled`, `relabel_quality`, `best_budgets`, and `RelabelPlan`: the relabeled
training sets of an experiment and its results).

    >>> t = otsu_threshold(self_scores)            # flag the examples with score > t
    >>> removed = pruning_set(self_scores, k=100, labels=y, n_classes=10, class_balance_ratio=0.5)
    >>> keep = pruning_masks(self_scores, ks=[100, 200], labels=y, n_classes=10)   # (2, N) bool
    >>> plan = RelabelPlan.build({"gex": s}, y, targets, budgets=[50, 100], rng=np.random.default_rng(0))
    >>> results = plan.results(test_accuracy_of_each_job, corrupted, clean)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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


def pruning_masks(scores: np.ndarray, ks: list[int], labels: np.ndarray | None = None, n_classes: int | None = None,
                  class_balance_ratio: float = 0.0, remove: str = "lowest",
                  rescore: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Keep-masks (len(ks), N) bool: row r keeps all but the `pruning_set` of ks[r] examples.

    With `rescore` (iterative pruning, the GEX code's `--iterative_pruning`; ks increasing): after each
    k but the last, the scores of the kept examples are `rescore(keep)` ((kept,) scores, e.g. by the
    model retrained without the removed ones) and the removed get −inf (`lowest`) or +inf (`highest`),
    so the next, larger set removes them again and the rest by the new scores.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    masks = np.ones((len(ks), len(s)), dtype=bool)
    for step, k in enumerate(ks):
        masks[step, pruning_set(s, k, labels, n_classes, class_balance_ratio, remove)] = False
        if rescore is not None and step + 1 < len(ks):
            s = np.full(len(s), -np.inf if remove == "lowest" else np.inf)
            s[masks[step]] = rescore(masks[step].copy())
    return masks


def random_removal_masks(n: int, ks: list[int], repeats: int, rng: np.random.Generator) -> np.ndarray:
    """Keep-masks (repeats · len(ks), N) bool of removing k examples drawn at random, for each repeat
    and each k in turn (`rng.choice(n, k, replace=False)`)."""
    masks = np.ones((repeats * len(ks), n), dtype=bool)
    for row, k in enumerate(list(ks) * repeats):
        masks[row, rng.choice(n, size=k, replace=False)] = False
    return masks


def relabel_targets(probabilities: np.ndarray, labels: np.ndarray, target: str) -> np.ndarray:
    """The label each example would get, (N,): the most probable class of `probabilities` (N, C)
    (`prediction`, `out-of-fold`), or the most probable class other than its label (`other`).

    Where the probabilities come from (`modelsense relabel --target`):
      out-of-fold  the `cl` method's k models of the training recipe, each trained without the fold it
                   predicts (`oof_probabilities_`), so no model saw the example it relabels; a flagged
                   example whose out-of-fold prediction is its own label keeps it.
      other        the trained model's (no training; the label always changes).
      prediction   the trained model's. A model that memorised its training labels predicts them: on
                   digits with 10% noise (MLP, 200 epochs, train accuracy 0.999) it changes 1 of 130
                   corrupted labels, where `other` restores 89% and `out-of-fold` 92% of them. Ensembles
                   of models that trained on the example (gex's fine-tuned members, trak's) memorise it
                   the same way, hence out-of-fold.
    """
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


@dataclass
class RelabelPlan:
    """The relabeled training sets of a relabeling experiment (one retraining job each) and the metrics
    of their test accuracies (`results`).

    Jobs, in order: per method (ranking by its scores, highest first) each budget b (its b highest
    examples relabeled to their targets), then Otsu's (the examples above `otsu_threshold`, when
    `otsu` and any); then `n_random` repeats of each budget (and each Otsu budget) drawn at random;
    no relabeling; and, given corrupted labels, the clean labels (every corruption undone: the ceiling).

    Attributes: keys (kind, method, budget) with kind method / otsu / random / none / clean; chosen
    (the relabeled indices); labels ((N,) int64 training labels); methods; budgets; random_budgets; otsu
    (method -> {threshold, budget}).
    """

    methods: list[str]
    budgets: list[int]
    keys: list[tuple[str, str, int]] = field(default_factory=list)
    chosen: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    random_budgets: list[int] = field(default_factory=list)
    otsu: dict[str, dict] = field(default_factory=dict)

    def _add(self, kind: str, method: str, budget: int, chosen: np.ndarray, labels: np.ndarray) -> None:
        self.keys.append((kind, method, budget))
        self.chosen.append(np.asarray(chosen, dtype=np.int64))
        self.labels.append(labels)

    @classmethod
    def build(cls, scores: dict[str, np.ndarray], labels: np.ndarray, targets: np.ndarray, budgets: list[int], *,
              rng: np.random.Generator, otsu: bool = True, n_random: int = 3, corrupted: np.ndarray | None = None,
              clean: np.ndarray | None = None) -> RelabelPlan:
        """The jobs (class docstring) from each method's `scores` (N,), the training `labels` and `targets` (N,)."""
        y = np.asarray(labels, dtype=np.int64)
        plan = cls(list(scores), list(budgets))
        for m, s in scores.items():
            s = np.asarray(s, dtype=np.float64)
            order = np.argsort(-s, kind="stable")
            for b in budgets:
                plan._add("method", m, b, order[:b], relabeled(y, order[:b], targets))
            if otsu:
                t = otsu_threshold(s)
                flagged = np.flatnonzero(s > t)
                plan.otsu[m] = {"threshold": t, "budget": len(flagged)}
                if len(flagged):
                    plan._add("otsu", m, len(flagged), flagged, relabeled(y, flagged, targets))
        plan.random_budgets = sorted({*budgets, *(o["budget"] for o in plan.otsu.values() if o["budget"])})
        for _ in range(n_random):
            for b in plan.random_budgets:
                chosen = rng.choice(len(y), size=b, replace=False)
                plan._add("random", "random", b, chosen, relabeled(y, chosen, targets))
        plan._add("none", "none", 0, np.zeros(0, dtype=np.int64), y)
        if corrupted is not None and len(corrupted) and clean is not None:
            plan._add("clean", "clean", len(corrupted), corrupted, np.asarray(clean, dtype=np.int64))
        return plan

    def results(self, accuracy: np.ndarray, corrupted: np.ndarray | None = None,
                clean: np.ndarray | None = None) -> dict:
        """Metrics from the test `accuracy` of each job (in order): `none_accuracy`, `clean_accuracy`
        (given corrupted labels), `random_accuracy` (+ `_std`, over repeats) per budget, `accuracy`
        {method: [per budget]}, `otsu` {method: threshold, budget, accuracy, random_accuracy}, with
        corrupted labels `precision` / `corrected` {method: [per budget]} (`relabel_quality`; Otsu's in
        `otsu`), and `best` (`best_budgets`)."""
        def acc(*key) -> list[float]:
            return [float(a) for k, a in zip(self.keys, accuracy) if k == key]

        out: dict = {"accuracy": {}, "otsu": {m: dict(o) for m, o in self.otsu.items()}, "none_accuracy":
                     acc("none", "none", 0)[0]}
        noisy = corrupted is not None and len(corrupted) > 0 and clean is not None
        if noisy:
            out["clean_accuracy"] = acc("clean", "clean", len(corrupted))[0]
        rand = {b: np.array(acc("random", "random", b)) for b in self.random_budgets}
        out["random_accuracy"] = [float(rand[b].mean()) for b in self.budgets]
        out["random_accuracy_std"] = [float(rand[b].std()) for b in self.budgets]
        for m in self.methods:
            out["accuracy"][m] = [acc("method", m, b)[0] for b in self.budgets]
            if out["otsu"].get(m, {}).get("budget"):
                b = out["otsu"][m]["budget"]
                out["otsu"][m].update(accuracy=acc("otsu", m, b)[0], random_accuracy=float(rand[b].mean()))
        if noisy:
            out["precision"], out["corrected"] = {}, {}
            for (kind, m, _), chosen, labels in zip(self.keys, self.chosen, self.labels):
                if kind in ("method", "otsu"):
                    precision, corrected = relabel_quality(chosen, labels, corrupted, clean)
                    if kind == "otsu":
                        out["otsu"][m].update(precision=precision, corrected=corrected)
                    else:
                        out["precision"].setdefault(m, []).append(precision)
                        out["corrected"].setdefault(m, []).append(corrected)
        out["best"] = best_budgets(out["accuracy"], self.budgets, out["random_accuracy"], out["none_accuracy"],
                                   out["otsu"])
        return out


__all__ = ["RelabelPlan", "best_budgets", "otsu_threshold", "pruning_masks", "pruning_set", "random_removal_masks",
           "relabel_quality", "relabel_targets", "relabeled"]
