"""Stitching over layers and kinds (Godfrey, Brown, Emerson and Kvinge 2022).

    stitching_sweep(model_a, model_b, layers, [StitchConfig(kind=k) for k in kinds], x_train, y_train,
                    x_test, y_test) -> StitchSweep

For every chosen layer and stitching kind: train only the stitching layer on the training set
(`stitch_models`: both networks frozen, in eval mode), then measure the stitched test accuracy and
the stitching penalty = mean clean test accuracy of A and B - stitched test accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from modelsense.errors import ConfigError
from modelsense.progress import progress_bar
from modelsense.representations.stitching import (
    STITCH_KINDS,
    BirkhoffStitch,
    LassoStitch,
    StitchConfig,
    evaluate_accuracy,
    stitch_models,
    stitching_penalty,
)


def stitch_kinds(kinds: str | Sequence[str], what: str = "--kind") -> tuple[str, ...]:
    """"linear,permutation" or a sequence -> the distinct kind names, each one of STITCH_KINDS."""
    items = [k.strip().lower() for k in kinds.split(",")] if isinstance(kinds, str) else [str(k).lower() for k in kinds]
    items = list(dict.fromkeys(k for k in items if k))
    if not items:
        raise ConfigError(f"{what} needs at least one stitching kind ({', '.join(STITCH_KINDS)})")
    for k in items:
        StitchConfig(kind=k)  # raises ConfigError for an unknown kind
    return tuple(items)


@dataclass
class StitchSweep:
    """Results of `stitching_sweep`: per kind, lists over `layers`.

    Attributes:
        clean_accuracy: (accuracy of A, accuracy of B) on the evaluation set.
        stitched_accuracy, penalty, final_loss, seconds: kind -> list over layers; penalty =
            mean(clean_accuracy) - stitched accuracy; final_loss = last epoch's mean training loss
            (cross-entropy + the layer's penalty term).
        extra: kind -> list over layers of per-layer extras (lasso: sparsity = fraction |W| <= 1e-3;
            birkhoff/permutation: the Hungarian permutation and the mean row entropy of W).
        states: (kind, layer) -> state dict of the trained stitching layer.
    """

    layers: list[str]
    kinds: list[str]
    clean_accuracy: tuple[float, float]
    stitched_accuracy: dict[str, list[float]] = field(default_factory=dict)
    penalty: dict[str, list[float]] = field(default_factory=dict)
    final_loss: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    states: dict[tuple[str, str], dict[str, Tensor]] = field(default_factory=dict)


def stitching_sweep(
    model_a: nn.Module,
    model_b: nn.Module,
    layers: Sequence[str],
    configs: Sequence[StitchConfig],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    progress: bool = True,
) -> StitchSweep:
    """Stitch A into B at every layer in `layers` with every config (one per kind), train the
    stitching layer on (x_train, y_train) (`stitch_models`: networks frozen, eval mode) and measure
    the stitched accuracy on (x_test, y_test) and the stitching penalty
        penalty = (acc(A) + acc(B)) / 2 - acc(stitched).
    """
    kinds = [c.kind for c in configs]
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"one config per stitching kind, got kinds {kinds}")
    model_a.eval()
    model_b.eval()
    device = configs[0].device if configs else "cpu"
    acc_a = evaluate_accuracy(model_a.to(device), x_test, y_test)
    acc_b = evaluate_accuracy(model_b.to(device), x_test, y_test)
    sweep = StitchSweep(list(layers), kinds, (acc_a, acc_b))
    with progress_bar(len(configs) * len(layers), "stitching", enabled=progress) as bar:
        for cfg in configs:
            for key in ("stitched_accuracy", "penalty", "final_loss", "seconds", "extra"):
                getattr(sweep, key)[cfg.kind] = []
            for layer in layers:
                start = time.perf_counter()
                stitched, hist = stitch_models(model_a, model_b, layer, x_train, y_train, cfg)
                acc = evaluate_accuracy(stitched, x_test, y_test)
                sweep.stitched_accuracy[cfg.kind].append(acc)
                sweep.penalty[cfg.kind].append(stitching_penalty(acc_a, acc_b, acc))
                sweep.final_loss[cfg.kind].append(hist.loss[-1] if hist.loss else float("nan"))
                sweep.seconds[cfg.kind].append(time.perf_counter() - start)
                layer_mod = stitched.stitch
                extra: dict[str, Any] = {}
                if isinstance(layer_mod, LassoStitch):
                    extra["sparsity"] = layer_mod.sparsity()
                if isinstance(layer_mod, BirkhoffStitch):
                    extra["permutation"] = layer_mod.permutation().tolist()
                    extra["perm_entropy_rows"] = _row_entropy(layer_mod.perm.detach())
                sweep.extra[cfg.kind].append(extra)
                sweep.states[(cfg.kind, layer)] = {
                    k: v.detach().cpu().clone() for k, v in layer_mod.state_dict().items()
                }
                bar.advance(1, description=f"stitching {cfg.kind} at {layer}")
    return sweep


def stitching_sweeps(pairs: Sequence[tuple[nn.Module, nn.Module]], layers: Sequence[str],
                     configs: Sequence[StitchConfig], x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                     progress: bool = True,
                     on_pair: Callable[[int, StitchSweep], None] | None = None) -> list[StitchSweep]:
    """`stitching_sweep` of every pair (A, B) of `pairs` at the same `layers` (each checked to exist in B);
    `on_pair(r, sweep)` is called after pair r (e.g. to log it). `combine_sweeps` summarizes them."""
    from modelsense.representations.compare import choose_layers

    sweeps = []
    for r, (a, b) in enumerate(pairs):
        choose_layers(b, layers, "model-b")
        sweeps.append(stitching_sweep(a, b, layers, configs, x_train, y_train, x_test, y_test, progress=progress))
        if on_pair is not None:
            on_pair(r, sweeps[-1])
    return sweeps


def stitching_states(sweeps: Sequence[StitchSweep]) -> dict[str, dict[str, Tensor]]:
    """The trained stitching layers of the sweeps, keyed "<kind>/<layer>" for one sweep and
    "pair<r>/<kind>/<layer>" for several."""
    prefix = (lambda r: "") if len(sweeps) == 1 else (lambda r: f"pair{r}/")
    return {f"{prefix(r)}{k}/{layer}": st for r, sw in enumerate(sweeps) for (k, layer), st in sw.states.items()}


def over_pairs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, standard deviation (ddof 1), standard error of the mean sd / sqrt(R)) over the first axis
    of `values` (R, ...): R repeats, e.g. random model pairs, R >= 2."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        raise ConfigError(f"a standard deviation over repeats needs at least 2, received {len(values)}")
    sd = values.std(0, ddof=1)
    return values.mean(0), sd, sd / np.sqrt(len(values))


def combine_sweeps(sweeps: Sequence[StitchSweep]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The sweeps of R model pairs (same layers and kinds) as arrays and metrics.

    Arrays: clean_accuracy (R, 2), stitched_accuracy and penalty (R, kinds, layers). Metrics: layers,
    kinds; per kind a list over the layers of stitched_accuracy and penalty (means over the pairs);
    clean_accuracy [A, B] (means), mean_clean_accuracy, mean_penalty per kind; final_loss, extra,
    layer_seconds (the sweep's, lists over the pairs when R > 1). With R > 1 also repeats,
    clean_accuracy_by_pair, penalty_std, stitched_accuracy_std, mean_penalty_std (sd over the pairs,
    ddof 1), penalty_se and mean_penalty_se (standard errors of the means, sd / sqrt(R)), penalty_by_pair.
    """
    kinds = sweeps[0].kinds
    accuracy = np.asarray([[sw.stitched_accuracy[k] for k in kinds] for sw in sweeps])  # (R, K, L)
    penalty = np.asarray([[sw.penalty[k] for k in kinds] for sw in sweeps])
    clean = np.asarray([sw.clean_accuracy for sw in sweeps])  # (R, 2)

    def per_kind(values: np.ndarray) -> dict[str, Any]:
        return {k: values[i].tolist() for i, k in enumerate(kinds)}

    metrics: dict[str, Any] = {
        "layers": sweeps[0].layers, "kinds": kinds, "stitched_accuracy": per_kind(accuracy.mean(0)),
        "penalty": per_kind(penalty.mean(0)), "clean_accuracy": clean.mean(0).tolist(),
        "mean_clean_accuracy": float(clean.mean()),
        "mean_penalty": {k: float(penalty[:, i].mean()) for i, k in enumerate(kinds)},
    }
    if len(sweeps) > 1:
        per_pair = penalty.mean(-1)  # (R, K): each pair's mean penalty over the layers
        metrics.update(
            repeats=len(sweeps), clean_accuracy_by_pair=clean.tolist(), penalty_std=per_kind(over_pairs(penalty)[1]),
            penalty_se=per_kind(over_pairs(penalty)[2]), stitched_accuracy_std=per_kind(over_pairs(accuracy)[1]),
            mean_penalty_std={k: float(over_pairs(per_pair)[1][i]) for i, k in enumerate(kinds)},
            mean_penalty_se={k: float(over_pairs(per_pair)[2][i]) for i, k in enumerate(kinds)},
            penalty_by_pair={k: penalty[:, i].tolist() for i, k in enumerate(kinds)},
            final_loss=[sw.final_loss for sw in sweeps], extra=[sw.extra for sw in sweeps],
            layer_seconds=[sw.seconds for sw in sweeps])
    else:
        metrics.update(final_loss=sweeps[0].final_loss, extra=sweeps[0].extra, layer_seconds=sweeps[0].seconds)
    return {"clean_accuracy": clean, "stitched_accuracy": accuracy, "penalty": penalty}, metrics


def stitching_text(m: dict[str, Any]) -> str:
    """The penalties of `combine_sweeps`' metrics as printed lines (with the spread over several pairs)."""
    if "repeats" not in m:
        lines = [f"clean accuracy A {m['clean_accuracy'][0]:.4f}  B {m['clean_accuracy'][1]:.4f}"]
        lines += [f"{k:12s} penalty " + " ".join(f"{layer}={p:+.4f}" for layer, p in zip(m["layers"], m["penalty"][k]))
                  for k in m["kinds"]]
        return "\n".join(lines)
    lines = [(f"{m['repeats']} random pairs {m['pairs']}: clean accuracy A {m['clean_accuracy'][0]:.4f}  B "
              f"{m['clean_accuracy'][1]:.4f} (means)")]
    lines += [f"{k:12s} penalty " + " ".join(f"{layer}={p:+.4f}±{sd:.4f} (se {se:.4f})" for layer, p, sd, se in
                                             zip(m["layers"], m["penalty"][k], m["penalty_std"][k], m["penalty_se"][k]))
              for k in m["kinds"]]
    lines.append("± the standard deviation over the pairs; se: the standard error of the mean penalty (sd / √R)")
    return "\n".join(lines)


def _row_entropy(w: Tensor) -> float:
    """Mean entropy (nats) of the rows of a nonnegative matrix (0 for a permutation)."""
    p = w.clamp_min(0) / w.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())


__all__ = ["StitchSweep", "combine_sweeps", "over_pairs", "stitch_kinds", "stitching_states", "stitching_sweep",
           "stitching_sweeps", "stitching_text"]
