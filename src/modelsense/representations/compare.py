"""Layer x layer similarity of two networks (Godfrey, Brown, Emerson and Kvinge 2022).

    compare_representations(model_a, model_b, x, "cka") -> {"matrix": (L_a, L_b), "layers", "layers_b"}

S[i, j] = similarity(layer i of A, layer j of B) on the inputs x, by default over every nn.ReLU
module. Every metric is reported as a *similarity* (larger = more alike, 1 = identical up to the
metric's invariances): CKA variants as they are, Procrustes and G_ReLU-Procrustes as 1 - distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.errors import ConfigError
from modelsense.representations.features import extract_features, relu_module_names
from modelsense.representations.metrics import SIMILARITIES, similarity_matrix

#: What a reader needs to know to read a metric's values next to linear CKA's (printed by `compare`, in the demo).
METRIC_NOTES = {
    "relu-cka": "relu-cka is CKA of the kernel K_ab = max over channels k of (centred, unit-norm) channel k of example "
    "a times that of example b: it is invariant only to permuting and positively rescaling channels (the "
    "ReLU symmetry group), not to rotating them as linear CKA is, so two networks whose representations "
    "agree up to a rotation (linear CKA near 1) but whose single neurons do not match one to one score "
    "much lower (on random ReLU features of 64 channels a randomly rotated copy scores about 0.33 while its "
    "linear CKA is 1; a permuted and positively rescaled copy scores exactly 1).",
    "relu-procrustes": "relu-procrustes aligns the two layers' unit-norm channels by the best permutation only "
    "(no rotation), so it is below procrustes (best rotation) unless single neurons match one to one.",
}


def check_metric(metric: str) -> str:
    """The metric name, lower case; ConfigError unless it is one of `SIMILARITIES`."""
    m = str(metric).lower()
    if m not in SIMILARITIES:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {', '.join(SIMILARITIES)}")
    return m


def layer_list(layers: str | Sequence[str] | None) -> list[str] | None:
    """None / "all" -> None (every ReLU); "a,b" or a sequence -> names."""
    if layers is None:
        return None
    names = [t.strip() for t in layers.split(",")] if isinstance(layers, str) else [str(t).strip() for t in layers]
    names = [n for n in names if n]
    return None if not names or names == ["all"] else names


def choose_layers(module: nn.Module, layers: str | Sequence[str] | None, which: str = "model") -> list[str]:
    """The layer names to use in `module`: every nn.ReLU module (None / "all"), or the given names,
    each checked to exist (ConfigError listing the available ReLU layers otherwise)."""
    relus = relu_module_names(module)
    names = layer_list(layers)
    modules = dict(module.named_modules())
    if names is None:
        if not relus:
            raise ConfigError(
                f"{which} ({type(module).__name__}) has no nn.ReLU module; name the layers to use with --layers "
                f"(module names: {', '.join(n for n in modules if n)})"
            )
        return relus
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise ConfigError(
            f"layer(s) {', '.join(repr(n) for n in missing)} not found in {which} ({type(module).__name__}); "
            f"available ReLU layers: {', '.join(relus) or 'none'} (any module name also works: "
            f"{', '.join(n for n in modules if n)})"
        )
    return names


def subsample_indices(n: int, n_examples: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded random subset of size min(n_examples, n) of range(n) (all if None)."""
    if n_examples is None or n_examples >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: int(n_examples)].sort().values


def compare_representations(
    model_a: nn.Module,
    model_b: nn.Module,
    x: Tensor,
    metric: str = "cka",
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """Layer x layer similarity of two networks on the inputs x (n, *input shape).

        S[i, j] = metric(features of layer i of A on x, features of layer j of B on x),

    features = the outputs of the named modules (default every nn.ReLU, in module order), shape
    (n, *layer output shape), with the channel axis (`channel_axes`: e.g. the last of a transformer's
    (n, T, width)) moved to axis 1, (n, C, *positions), as the channel-wise metrics read them; see
    `modelsense.representations.metrics.similarity_matrix` for each metric (every one a similarity:
    1 = identical up to its invariances). `options` go to the metric.

    Returns:
        {"matrix": (L_a, L_b) ndarray, "layers": names of A's layers, "layers_b": names of B's}.
    """
    metric = check_metric(metric)
    names_a = choose_layers(model_a, layers_a, "model-a")
    names_b = choose_layers(model_b, layers_b if layers_b is not None else layers_a, "model-b")
    fa = extract_features(model_a.to(device), x, names_a, batch_size=batch_size, out_device=device, channels_first=True)
    fb = extract_features(model_b.to(device), x, names_b, batch_size=batch_size, out_device=device, channels_first=True)
    matrix = similarity_matrix(fa, fb, metric, **options)
    return {"matrix": matrix, "layers": list(fa), "layers_b": list(fb)}


#: the metrics that are 1 - a distance (compare reports that distance too)
DISTANCE_METRICS = ("procrustes", "relu-procrustes")


def comparison_metrics(result: dict[str, Any], metric: str) -> dict[str, Any]:
    """`compare_representations`' result as plain values: metric, value ("similarity"), matrix (L_a x L_b
    lists), diagonal, layers, layers_b (only where B's layers differ from A's) and, for the metrics that
    are 1 - a distance (`DISTANCE_METRICS`), diagonal_distance = 1 - diagonal."""
    metric = check_metric(metric)
    diagonal = np.diagonal(result["matrix"])
    out: dict[str, Any] = {"metric": metric, "value": "similarity", "matrix": np.asarray(result["matrix"]).tolist(),
                           "diagonal": diagonal.tolist(), "layers": list(result["layers"])}
    if list(result["layers_b"]) != list(result["layers"]):
        out["layers_b"] = list(result["layers_b"])
    if metric in DISTANCE_METRICS:
        out["diagonal_distance"] = (1.0 - diagonal).tolist()
    return out


__all__ = [
    "DISTANCE_METRICS",
    "METRIC_NOTES",
    "check_metric",
    "comparison_metrics",
    "choose_layers",
    "compare_representations",
    "layer_list",
    "subsample_indices",
]
