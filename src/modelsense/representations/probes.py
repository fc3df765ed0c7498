"""Invariance probes: transform one layer of a trained network by a random group element and measure
how every similarity metric sees the change (Godfrey, Brown, Emerson and Kvinge 2022,
`model_symmetries/stitching/projections.py`, whose `LayerModifier` multiplies a layer's output by a random
orthogonal matrix or a random G_ReLU element).

At an activation module `layer` (an `nn.ReLU`, called once per forward pass) with input z (n, C, *S)
(the pre-activations: the output of the layer before it) the network is changed to

    z  ->  M z  ->  ReLU(M z) = h'  ->  M^{-1} h'  ->  the rest of the network,

M (C x C) acting on channels, the same at every position (a 1x1 convolution); the channel axis is the
layer's `channel_axes` (`modelsense.representations.features`: axis 1 of a convolution's (n, C, *S),
the last of a transformer's (n, T, width)), and the features compared are read with it moved to axis 1.
When the ReLU sits between two linear layers this is W_prev <- M W_prev, b_prev <- M b_prev (the original's
`LayerModifier`) and W_next <- W_next M^{-1} (the compensation in the next layer). The network computes
the same function iff ReLU(M z) = M ReLU(z), i.e. for M in G_ReLU = {P D: P a permutation, D a positive
diagonal}: the G_ReLU transform leaves the outputs unchanged (to float rounding), the other two do not.

Transforms (`random_transform`, seeded):
    orthogonal   Q from the QR decomposition of a Gaussian matrix with the signs of R's diagonal
                 moved into Q (Haar distributed)
    grelu        P D with P a uniform random permutation and D = diag(exp(sigma g) / exp(sigma^2 / 2)),
                 g standard normal (the original's `Grelu_sample`, sigma = 1); row j of M has its
                 single nonzero entry at column p_j
    invertible   a Gaussian matrix with N(0, 1/C) entries (invertible with probability 1)

Features compared (`SITES`), the original's against the transformed network's on the same inputs:
    pre    the ReLU's input: z against M z, exactly M applied to the channels
    post   the ReLU's output: ReLU(z) against ReLU(M z) (= ReLU(z) transformed by M for M in G_ReLU)

A metric invariant to a group gives 1 for that group's transform at `pre` (`INVARIANT`): the CKA and
orthogonal Procrustes family for `orthogonal` (Procrustes and the angular shape metric align channels
by a rotation), the G_ReLU-CKA and G_ReLU-Procrustes for `grelu` (and at `post` too); no metric here
is invariant to a general invertible map.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.errors import ConfigError, DataError
from modelsense.representations.features import channel_axes, extract_features
from modelsense.representations.metrics import SIMILARITIES, make_metric
from modelsense.representations.stitching import apply_channel_matrix

TRANSFORMS = ("orthogonal", "grelu", "invertible")
SITES = ("pre", "post")
#: the metrics (names of `SIMILARITIES`) that give 1 for a transform at site "pre", by their invariances
INVARIANT = {
    "orthogonal": ("cka", "unbiased-cka", "rbf-cka", "procrustes", "angular-shape"),
    "grelu": ("relu-procrustes", "relu-cka"),
    "invertible": (),
}


def random_transform(kind: str, channels: int, generator: torch.Generator, sigma: float = 1.0) -> Tensor:
    """A random (channels x channels) float64 matrix of `kind` (one of TRANSFORMS; see the module docstring)."""
    c = int(channels)
    if c < 1:
        raise ConfigError(f"a transform needs >= 1 channel, got {channels}")
    if kind == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))
        signs = torch.sign(torch.diagonal(r))
        return q * torch.where(signs == 0, torch.ones_like(signs), signs)[None, :]
    if kind == "grelu":
        if not sigma >= 0:
            raise ConfigError(f"sigma of the G_ReLU scales must be >= 0, got {sigma}")
        scales = torch.exp(sigma * torch.randn(c, generator=generator, dtype=torch.float64)) / np.exp(sigma**2 / 2)
        perm = torch.randperm(c, generator=generator)
        m = torch.zeros(c, c, dtype=torch.float64)
        m[torch.arange(c), perm] = scales
        return m
    if kind == "invertible":
        return torch.randn(c, c, generator=generator, dtype=torch.float64) / np.sqrt(c)
    raise ConfigError(f"unknown transform {kind!r}; expected one of {', '.join(TRANSFORMS)}")


class ChannelMap(nn.Module):
    """x -> M x on the channel axis `axis` (default 1) at every position; `matrix` None: the identity."""

    def __init__(self, matrix: Tensor | None = None, axis: int = 1) -> None:
        super().__init__()
        self.axis = int(axis)
        self.register_buffer("matrix", None if matrix is None else matrix.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.matrix is None:
            return x
        return apply_channel_matrix(x.movedim(self.axis, 1), self.matrix.to(x.dtype)).movedim(1, self.axis)


class Intertwined(nn.Module):
    """`compensate(act(transform(z)))` = M^{-1} act(M z): an activation module conjugated by M, on the
    channel axis `axis` (declared as this module's `channel_axis`, so its children's features keep it)."""

    def __init__(self, act: nn.Module, matrix: Tensor | None = None, axis: int = 1) -> None:
        super().__init__()
        self.channel_axis = int(axis)
        self.transform = ChannelMap(matrix, axis)
        self.act = act
        self.compensate = ChannelMap(None if matrix is None else torch.linalg.inv(matrix.to(torch.float64)), axis)

    def forward(self, z: Tensor) -> Tensor:
        return self.compensate(self.act(self.transform(z)))


def _check_layer(model: nn.Module, layer: str) -> None:
    if not layer or layer not in dict(model.named_modules()):
        raise ConfigError(f"no module named {layer!r}; ReLU modules: "
                          f"{[n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]}")


def intertwine(model: nn.Module, layer: str, matrix: Tensor | None, axis: int = 1) -> nn.Module:
    """A deep copy of `model` whose module `layer` is replaced by `Intertwined(module, matrix, axis)` (eval
    mode); `axis`: the channel axis of the layer's output (`channel_axes`)."""
    _check_layer(model, layer)
    out = copy.deepcopy(model).eval()
    parent_name, _, child = layer.rpartition(".")
    parent = out.get_submodule(parent_name) if parent_name else out
    setattr(parent, child, Intertwined(getattr(parent, child), matrix, axis))
    return out


@dataclass
class ProbeResult:
    """Results of `invariance_probe`, lists over repeats.

    similarity: (layer, transform, site) -> metric name -> [similarity of the original's and the
        transformed network's features, per repeat].
    output_change: (layer, transform) -> [max |f'(x) - f(x)| over the examples and outputs].
    accuracy: (layer, transform) -> [accuracy of the transformed network] (with labels); clean_accuracy.
    channels: layer -> C.
    """

    layers: list[str]
    transforms: list[str]
    metrics: list[str]
    repeats: int
    similarity: dict[tuple[str, str, str], dict[str, list[float]]] = field(default_factory=dict)
    output_change: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    accuracy: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    clean_accuracy: float | None = None
    channels: dict[str, int] = field(default_factory=dict)


def _outputs(model: nn.Module, x: Tensor, batch_size: int, device: str) -> Tensor:
    from modelsense.core.functional import chunks

    with torch.no_grad():
        return torch.cat([model(x[s].to(device)).detach().cpu() for s in chunks(len(x), batch_size)])


def invariance_probe(model: nn.Module, layers: Sequence[str], x: Tensor, y: Tensor | None = None, *,
                     transforms: Sequence[str] = TRANSFORMS, metrics: Sequence[str] = SIMILARITIES, repeats: int = 1,
                     seed: int = 0, sigma: float = 1.0, batch_size: int = 256, device: str = "cpu") -> ProbeResult:
    """For each layer, transform and repeat r: draw M (`random_transform`, generator seeded by
    seed + r, one stream per layer and transform), build the intertwined network (`intertwine`) and
    record every metric (`make_metric(name).fit_score`) between the original's and the transformed
    network's features at each site of `SITES` on the inputs x, the largest change of the outputs
    and (given labels y) the transformed network's accuracy. See the module docstring."""
    transforms, metrics = list(transforms), list(metrics)
    for t in transforms:
        if t not in TRANSFORMS:
            raise ConfigError(f"unknown transform {t!r}; expected one of {', '.join(TRANSFORMS)}")
    for m in metrics:
        make_metric(m)  # a ConfigError for an unknown name
    if int(repeats) < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(x, Tensor) or x.ndim < 2 or len(x) < 4:
        raise DataError(f"x: expected a tensor of at least 4 examples (n, ...), got {tuple(getattr(x, 'shape', ()))}")
    model = model.to(device).eval()
    base_out = _outputs(model, x, batch_size, device)
    res = ProbeResult(list(layers), transforms, metrics, int(repeats))
    if y is not None:
        res.clean_accuracy = float((base_out.argmax(-1) == y.cpu()).float().mean())
    for li, layer in enumerate(layers):
        _check_layer(model, layer)
        axes = channel_axes(model, x, [layer], device=device)
        if set(axes) != {layer}:
            raise ConfigError(f"module {layer!r} is called more than once per forward pass; probe a module used once")
        axis = axes[layer]
        identity = intertwine(model, layer, None, axis)
        names = [f"{layer}.transform", f"{layer}.act"]
        base = extract_features(identity, x, names, batch_size=batch_size, device=device, channels_first=True)
        if base[names[0]].shape != base[names[1]].shape:
            raise ConfigError(
                f"module {layer!r} maps {tuple(base[names[0]].shape[1:])} to {tuple(base[names[1]].shape[1:])}; "
                "probe an activation module (an nn.ReLU: its output has its input's shape)"
            )
        channels = base[names[0]].shape[1]
        res.channels[layer] = int(channels)
        for kind in transforms:
            key = (layer, kind)
            res.output_change[key], res.accuracy[key] = [], []
            for site in SITES:
                res.similarity[(layer, kind, site)] = {m: [] for m in metrics}
            for r in range(int(repeats)):
                gen = torch.Generator().manual_seed(
                    int(seed) + r + 1_000_003 * (li * len(TRANSFORMS) + TRANSFORMS.index(kind))
                )
                matrix = random_transform(kind, channels, gen, sigma)
                changed = intertwine(model, layer, matrix, axis)
                feats = extract_features(changed, x, names, batch_size=batch_size, device=device, channels_first=True)
                out = _outputs(changed, x, batch_size, device)
                res.output_change[key].append(float((out - base_out).abs().max()))
                if y is not None:
                    res.accuracy[key].append(float((out.argmax(-1) == y.cpu()).float().mean()))
                for site, name in zip(SITES, names):
                    for m in metrics:
                        res.similarity[(layer, kind, site)][m].append(make_metric(m).fit_score(base[name], feats[name]))
    return res


@dataclass
class ProbeTable:
    """`probe_table` of a `ProbeResult`: arrays (similarity (L, T, S, M, R), output_change and accuracy
    (L, T, R), layers, transforms, sites, metrics), the metrics of `modelsense probe`, and the table of
    means row by row ("<layer> <transform> <site>") with the cells that must give 1 (`invariant`)."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    rows: list[str]
    mean: np.ndarray
    invariant: np.ndarray


def probe_table(res: ProbeResult) -> ProbeTable:
    """The probe's numbers as tables over (layer, transform, site, metric): mean and standard deviation
    (ddof 1; 0 for one repeat) over the repeats, which cells a metric must give 1 in (`INVARIANT` at
    `pre`; at `post` too for G_ReLU), the largest |1 - s| over those cells (`max_deviation_invariant`),
    the smallest similarity elsewhere, the largest output change and the mean accuracy per layer and
    transform."""
    layers, transforms, names = res.layers, res.transforms, res.metrics
    sim = np.asarray([[[[res.similarity[(layer, t, site)][m] for m in names] for site in SITES] for t in transforms]
                      for layer in layers])  # (L, T, S, M, R)
    change = np.asarray([[res.output_change[(layer, t)] for t in transforms] for layer in layers])  # (L, T, R)
    accuracy = np.asarray([[res.accuracy[(layer, t)] for t in transforms] for layer in layers])
    mean, std = sim.mean(-1), (sim.std(-1, ddof=1) if res.repeats > 1 else np.zeros(sim.shape[:-1]))
    invariant = np.zeros(sim.shape[:-1], dtype=bool)  # (L, T, S, M): the metric must give 1
    for ti, t in enumerate(transforms):
        for mi, m in enumerate(names):
            invariant[:, ti, SITES.index("pre"), mi] = m in INVARIANT[t]
            invariant[:, ti, SITES.index("post"), mi] = t == "grelu" and m in INVARIANT[t]

    def nested(values: np.ndarray) -> dict[str, Any]:
        return {layer: {t: {site: {m: float(values[li, ti, si, mi]) for mi, m in enumerate(names)}
                            for si, site in enumerate(SITES)} for ti, t in enumerate(transforms)}
                for li, layer in enumerate(layers)}

    def per_layer(values: np.ndarray) -> dict[str, Any]:
        return {layer: {t: float(values[li, ti]) for ti, t in enumerate(transforms)} for li, layer in enumerate(layers)}

    deviation = np.abs(1.0 - sim[invariant])
    metrics = {
        "layers": layers, "transforms": transforms, "sites": list(SITES), "metrics": names,
        "repeats": res.repeats, "channels": res.channels,
        "table": nested(mean), "table_std": nested(std),
        "invariant": {t: list(INVARIANT[t]) for t in transforms},
        "max_deviation_invariant": float(deviation.max()) if deviation.size else None,
        "min_similarity_not_invariant": float(sim[~invariant].min()) if (~invariant).any() else None,
        "output_change": per_layer(change.max(-1)),
        "clean_accuracy": res.clean_accuracy,
        "accuracy": per_layer(accuracy.mean(-1)),
    }
    arrays = {"similarity": sim, "output_change": change, "accuracy": accuracy, "layers": np.asarray(layers),
              "transforms": np.asarray(transforms), "sites": np.asarray(SITES), "metrics": np.asarray(names)}
    rows = [f"{layer} {t} {site}" for layer in layers for t in transforms for site in SITES]
    return ProbeTable(arrays, metrics, rows, mean.reshape(len(rows), -1), invariant.reshape(len(rows), -1))


def probe_table_text(m: dict[str, Any]) -> str:
    """The table the original prints, from the metrics of `probe_table`: per layer, one row per transform
    and site, one column per metric; then how much each transform changed the network's outputs and its
    accuracy."""
    names = m["metrics"]
    widths = [max(len(n), 6) + 1 for n in names]
    lines = []
    for layer in m["layers"]:
        lines.append(f"{layer:18s}" + "".join(f"{n:>{w}s}" for n, w in zip(names, widths)))
        for t in m["transforms"]:
            for site in m["sites"]:
                row = m["table"][layer][t][site]
                lines.append(f"  {t:11s} {site:4s}" + "".join(f"{row[n]:{w}.4f}" for n, w in zip(names, widths)))
        lines.append("  outputs: " + "; ".join(f"{t} max|Δ| {m['output_change'][layer][t]:.1e} accuracy "
                                               f"{m['accuracy'][layer][t]:.4f}" for t in m["transforms"]))
    lines.append(f"clean accuracy {m['clean_accuracy']:.4f}; must give 1 at pre: "
                 + "; ".join(f"{t}: {', '.join(v) or 'none'}" for t, v in m["invariant"].items())
                 + f"; largest |1 - s| among them {m['max_deviation_invariant']:.1e}")
    return "\n".join(lines)


__all__ = ["INVARIANT", "SITES", "TRANSFORMS", "ChannelMap", "Intertwined", "ProbeResult", "ProbeTable", "intertwine",
           "invariance_probe", "probe_table", "probe_table_text", "random_transform"]
