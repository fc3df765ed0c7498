"""Gradient inner products of nn.Linear networks without per-example gradients.

For a linear layer s = W a + b applied once per example to a vector input a_i ∈ R^{d_in}, the
per-example gradient of the loss is ∂l_i/∂W = δ_i a_iᵀ and ∂l_i/∂b = δ_i, with δ_i = ∂l_i/∂s_i.
Hence, exactly,

    g_iᵀ g_j = Σ_layers (δ_iᵀ δ_j) · (a_iᵀ a_j + 1)      (the 1 when the bias is trained)
    ||g_i||² = Σ_layers ||δ_i||² · (||a_i||² + 1)

so a block of the Gram matrix costs n·m·Σ(d_in + d_out) instead of n·m·P, and only the layer
inputs and output gradients (one forward and one backward pass of the summed loss) are needed.
Used by `grad-dot`, `grad-cos` and `tracin` when every trained parameter belongs to such a layer
(MLPs); other models take the generic per-example-gradient path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel, Params, chunks, n_rows, take_rows


@dataclass(frozen=True)
class LinearLayer:
    """An nn.Linear layer whose weight and/or bias are trained parameters."""

    module: nn.Linear
    weight: bool
    bias: bool


@dataclass
class LinearFactors:
    """Per layer: inputs A (n, d_in) and output gradients D (n, d_out) of n examples; `values`: the
    differentiated per-example objective (n,)."""

    inputs: list[Tensor]
    grads: list[Tensor]
    values: Tensor | None = None

    def rows(self, s: slice) -> LinearFactors:
        return LinearFactors([a[s] for a in self.inputs], [d[s] for d in self.grads],
                             None if self.values is None else self.values[s])


def linear_layers(model: FunctionalModel) -> list[LinearLayer] | None:
    """The nn.Linear layers holding every trained parameter, or None when some parameter is elsewhere."""
    covered, layers = set(), []
    for name, mod in model.module.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        prefix = f"{name}." if name else ""
        w, b = prefix + "weight" in model.params, mod.bias is not None and prefix + "bias" in model.params
        if w or b:
            layers.append(LinearLayer(mod, w, b))
            covered.update(n for n, keep in ((prefix + "weight", w), (prefix + "bias", b)) if keep)
    if not layers or covered != set(model.params):
        return None
    return layers


def linear_factors(model: FunctionalModel, layers: list[LinearLayer], params: Params, x: Tensor, y: Tensor,
                   chunk_size: int, objective: Callable[[Params, Tensor, Tensor], Tensor] | None = None
                   ) -> LinearFactors | None:
    """Layer inputs and per-example output gradients of (x, y) for the per-example `objective(params, x, y)`
    -> (n,) (default: the model's per-example loss); None if a layer sees a non-vector input (n, *, d_in)
    or runs other than once per forward pass (then the factorisation does not hold)."""
    objective = objective or model.per_example_loss
    inputs: list[list[Tensor]] = [[] for _ in layers]
    grads: list[list[Tensor]] = [[] for _ in layers]
    values: list[Tensor] = []
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    for s in chunks(n_rows(x), chunk_size):
        records: dict[int, list] = {k: [] for k in range(len(layers))}

        def make_hook(k, records=records):
            def hook(module, inp, out):
                records[k].append((inp[0].detach(), out))

            return hook

        handles = [layer.module.register_forward_hook(make_hook(k)) for k, layer in enumerate(layers)]
        try:
            with torch.enable_grad():
                per_example = objective(p, take_rows(x, s), y[s])
                loss = per_example.sum()
        finally:
            for h in handles:
                h.remove()
        if any(len(r) != 1 or r[0][0].dim() != 2 for r in records.values()):
            return None
        outs = torch.autograd.grad(loss, [records[k][0][1] for k in range(len(layers))], allow_unused=True)
        values.append(per_example.detach())
        for k in range(len(layers)):
            a, d = records[k][0][0], outs[k]
            inputs[k].append(a)
            grads[k].append(
                torch.zeros(a.shape[0], layers[k].module.out_features, dtype=a.dtype, device=a.device)
                if d is None
                else d.detach()
            )
    return LinearFactors([torch.cat(a) for a in inputs], [torch.cat(d) for d in grads], torch.cat(values))


def factored_gram(layers: list[LinearLayer], left: LinearFactors, right: LinearFactors) -> Tensor:
    """g_iᵀ g_j for the examples of `left` (rows) and `right` (columns), shape (n, m)."""
    out = None
    for layer, a, d, a2, d2 in zip(layers, left.inputs, left.grads, right.inputs, right.grads):
        dd = d @ d2.T
        term = dd * (a @ a2.T + 1.0) if layer.weight and layer.bias else (dd * (a @ a2.T) if layer.weight else dd)
        out = term if out is None else out + term
    return out


def factored_sq_norms(layers: list[LinearLayer], f: LinearFactors) -> Tensor:
    """||g_i||² for every example of `f`, shape (n,)."""
    out = 0
    for layer, a, d in zip(layers, f.inputs, f.grads):
        dn = d.pow(2).sum(1)
        an = a.pow(2).sum(1)
        out = out + (dn * (an + 1.0) if layer.weight and layer.bias else (dn * an if layer.weight else dn))
    return out
