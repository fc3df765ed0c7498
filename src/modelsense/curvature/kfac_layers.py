"""The layer machinery behind KFAC / EK-FAC (kfac.py): which selected parameters sit in which
layer, the layers' inputs and backpropagated output gradients (forward hooks), and the exact
blocks of the parameters that no Kronecker layer covers (the fallback).

Kronecker layers. A layer maps (bias-augmented) inputs a ∈ R^{d_in} to outputs s = W a ∈ R^{d_out}
at T positions per example; the gradient of W (d_out x d_in, bias as the last column) along an
output-space direction is Σ_t g_t a_tᵀ, g_t the backpropagated vector at s_t:

    nn.Linear     any leading dims: (n, d) -> T = 1; (n, T, d) or (n, *, d) -> T = Π(*) positions
    nn.Conv1d     a = an unfolded window (C_in·k), T = output positions (groups 1, zero padding)
    nn.Conv2d     a = an unfolded patch (C_in·kh·kw), T = output pixels (groups 1, zero padding)
    nn.Embedding  a = the one-hot token (d_in = vocabulary), W = weightᵀ, T = tokens; padding_idx
                  tokens have no gradient and are left out; kept as token ids, never one-hot

A module called k times per forward pass contributes the positions of all k calls (weight sharing
as extra positions; Eschenhagen et al. 2023). Inputs must be batch-first (first dim = the examples).

Fallback. A selected parameter that no Kronecker layer covers — LayerNorm/GroupNorm/BatchNorm
affine parameters, positional embeddings and class tokens held as bare `nn.Parameter`s,
nn.MultiheadAttention's in_proj and out_proj (its out_proj Linear is never called as a module), a
Linear/Conv that is never called, runs on non-batch-first inputs or shares its weight with another
module, grouped or circular-padded convolutions, embeddings with max_norm / scale_grad_by_freq —
gets one exact block per parameter tensor, block = Σ_{i,u} R_iuᵀ R_iu from its per-example
gradient rows R_iu along each backward direction u (the columns of L_i for the GGN, ∂l_i/∂f_i for
the EF). Affine parameters of nn.LayerNorm / RMSNorm / GroupNorm / BatchNorm (eval mode) act
elementwise after the normalisation, y = x̂ ⊙ w + b, so their rows come from the same hooked
backward passes as the Kronecker factors (R_w = Σ_t g_t ⊙ x̂_t, R_b = Σ_t g_t over the positions the
parameter is broadcast over); so do the rows of any module that defines
`per_example_rows(input, grad_output) -> {its parameter name: (n, p) rows}` (e.g. the positions of
models.vit); every other parameter's rows come from per-example Jacobians (vmap of jacrev over the
examples, restricted to those parameters: C per-example backward passes, the slow path). Kept

    dense     (p x p, exact) when the tensor has p <= max_dense_block entries (fallback "auto")
    diagonal  (its exact diagonal) otherwise, or for every tensor with fallback "diag"

and fallback "error" refuses such parameters instead (naming them and why). Blocks of different
layers / tensors never interact (block-diagonal K).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, vmap

from modelsense.core.functional import FunctionalModel, Params, chunks, map_inputs, n_rows, take_rows
from modelsense.curvature._common import data_chunks
from modelsense.errors import ConfigError

FALLBACKS = ("auto", "diag", "error")
KFAC_APPROXIMATIONS = ("expand", "reduce")
_ELEMENTS = 2**24  # entries of one temporary (per-example gradient grids, Jacobians) per sub-chunk


@dataclass
class KroneckerLayer:
    """One Linear / Conv1d / Conv2d / Embedding with the flat positions of its selected parameters.

    weight/bias: parameter names when selected (else None); d_in includes the bias column (for an
    Embedding: the vocabulary size); weight_slice/bias_slice: positions in the flat vector.
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    d_in: int
    d_out: int
    weight_slice: slice | None = None
    bias_slice: slice | None = None

    @property
    def kind(self) -> str:
        """linear | conv1d | conv2d | embedding."""
        if isinstance(self.module, nn.Embedding):
            return "embedding"
        if isinstance(self.module, nn.Conv1d):
            return "conv1d"
        if isinstance(self.module, nn.Conv2d):
            return "conv2d"
        return "linear"

    @property
    def diagonal_input(self) -> bool:
        """Whether the input factor A is diagonal (one-hot inputs: token counts)."""
        return self.kind == "embedding"

    @property
    def d_weight(self) -> int:
        return self.d_in - (1 if self.bias else 0)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n)

    def flat_indices(self) -> Tensor:
        """Flat positions of the (d_out, d_in) grid [W | b] in row-major order, shape (d_out·d_in,)
        (an Embedding's grid is weightᵀ: the weight is stored (vocabulary, dim))."""
        if self.kind == "embedding":
            return (
                torch.arange(self.weight_slice.start, self.weight_slice.stop)
                .reshape(self.d_in, self.d_out)
                .T.reshape(-1)
            )
        cols = []
        if self.weight:
            cols.append(torch.arange(self.weight_slice.start, self.weight_slice.stop).reshape(self.d_out, -1))
        if self.bias:
            cols.append(torch.arange(self.bias_slice.start, self.bias_slice.stop).reshape(self.d_out, 1))
        return torch.cat(cols, dim=1).reshape(-1)


@dataclass
class FallbackBlock:
    """One selected parameter tensor outside every Kronecker layer, with an exact block: dense
    (p x p) or diagonal. Seen as a (d_out = 1, d_in = p) grid so the Kronecker code serves it too."""

    name: str
    param_slice: slice
    dense: bool
    reason: str
    source: RowsLayer | None = None  # rows from hooks on this module; None: per-example Jacobians
    d_out: int = field(default=1, init=False)

    @property
    def d_in(self) -> int:
        return self.param_slice.stop - self.param_slice.start

    @property
    def diagonal_input(self) -> bool:
        return not self.dense

    @property
    def params(self) -> tuple[str, ...]:
        return (self.name,)

    def flat_indices(self) -> Tensor:
        return torch.arange(self.param_slice.start, self.param_slice.stop)


NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


@dataclass
class RowsLayer:
    """A module whose parameters' per-example gradient rows come from forward hooks: a normalisation
    module y = x̂ ⊙ w + b (weight/bias: the selected parameter names, else None; x̂ recorded in the
    forward pass, g the backpropagated output gradient), or a module with `per_example_rows`
    (`custom`: its selected parameters, full names by local name)."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    custom: dict[str, str] | None = None

    @property
    def params(self) -> tuple[str, ...]:
        if self.custom is not None:
            return tuple(self.custom.values())
        return tuple(n for n in (self.weight, self.bias) if n)

    def normalized(self, inp: Tensor) -> Tensor:
        """x̂: the input normalised without the affine parameters (batch norm: running statistics);
        the input itself for a module with `per_example_rows`."""
        mod = self.module
        if self.custom is not None:
            return inp
        if isinstance(mod, nn.LayerNorm):
            return F.layer_norm(inp, mod.normalized_shape, None, None, mod.eps)
        if isinstance(mod, nn.GroupNorm):
            return F.group_norm(inp, mod.num_groups, None, None, mod.eps)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            shape = (1, -1) + (1,) * (inp.ndim - 2)
            return (inp - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
        return F.rms_norm(inp, mod.normalized_shape, None, mod.eps)

    def rows(self, x_hat: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Per-example gradient rows {parameter name: (n, p)} of one call, from x̂ and g (input shape)."""
        n = g.shape[0]
        if self.custom is not None:
            rows = self.module.per_example_rows(x_hat, g)
            return {self.custom[k]: rows[k].reshape(n, -1) for k in self.custom}
        if isinstance(self.module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):  # parameters on dim 1
            channels = g.shape[1]

            def fold(t: Tensor) -> Tensor:
                return t.reshape(n, channels, -1).sum(-1)

        else:  # LayerNorm / RMSNorm: parameters over the trailing normalized_shape
            p = int(torch.tensor(self.module.normalized_shape).prod())

            def fold(t: Tensor) -> Tensor:
                return t.reshape(n, -1, p).sum(1)

        out = {}
        if self.weight:
            out[self.weight] = fold(g * x_hat)
        if self.bias:
            out[self.bias] = fold(g)
        return out


Block = KroneckerLayer | FallbackBlock


# --- which layers ----------------------------------------------------------------------------------
def _owners(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of the modules holding it (several for tied weights)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in module.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mname)
    return owners


def _unsupported(mod: nn.Module) -> str | None:
    """Why a Linear/Conv/Embedding cannot be a Kronecker layer (None if it can)."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (mod.groups != 1 or mod.padding_mode != "zeros"):
        return (f"a convolution with groups={mod.groups}, padding_mode={mod.padding_mode!r} "
                "(KFAC needs groups=1, zero padding)")
    if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse):
        return "an embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


def _selected(model: FunctionalModel, mname: str, mod: nn.Module) -> tuple[str | None, str | None]:
    prefix = f"{mname}." if mname else ""
    offsets = model.spec.slices
    w = prefix + "weight" if getattr(mod, "weight", None) is not None and prefix + "weight" in offsets else None
    b = prefix + "bias" if getattr(mod, "bias", None) is not None and prefix + "bias" in offsets else None
    return w, b


def candidate_layers(model: FunctionalModel) -> tuple[list[KroneckerLayer], list[RowsLayer], dict[str, str]]:
    """The Linear/Conv1d/Conv2d/Embedding modules holding selected parameters (Kronecker layers),
    the normalisation modules and modules with `per_example_rows` holding selected parameters (hooked
    fallback rows), and for the selected parameters of modules that can be neither: name -> reason."""
    offsets = model.spec.slices
    owners = _owners(model.module)
    named = dict(model.module.named_parameters())
    layers, norms, reasons = [], [], {}
    for mname, mod in model.module.named_modules():
        prefix = f"{mname}." if mname else ""
        if callable(getattr(mod, "per_example_rows", None)):
            own = {k: prefix + k for k, p in mod.named_parameters(recurse=False) if prefix + k in offsets}
            if own:
                norms.append(RowsLayer(mname, mod, None, None, own))
            continue
        kronecker = isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding))
        if not kronecker and not isinstance(mod, NORM_MODULES):
            continue
        w, b = _selected(model, mname, mod)
        if w is None and b is None:
            continue
        why = _unsupported(mod) if kronecker else None
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or mod.running_mean is None):
            why = "a batch norm in training mode or without running statistics"
        shared = [n for n in (w, b) if n and len(owners.get(id(named[n]), [])) > 1]
        if shared:
            why = f"its parameters {shared} are shared with another module ({owners[id(named[shared[0]])]})"
        if why:
            reasons.update({n: why for n in (w, b) if n})
            continue
        if not kronecker:
            norms.append(RowsLayer(mname, mod, w, b))
            continue
        if isinstance(mod, nn.Embedding):
            d_in, d_out = mod.num_embeddings, mod.embedding_dim
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            d_in = (mod.in_channels * int(torch.tensor(mod.kernel_size).prod()) if w else 0) + (1 if b else 0)
            d_out = mod.out_channels
        else:
            d_in, d_out = (mod.in_features if w else 0) + (1 if b else 0), mod.out_features
        layers.append(KroneckerLayer(mname, mod, w, b, d_in, d_out, offsets.get(w), offsets.get(b)))
    return layers, norms, reasons


def find_layers(model: FunctionalModel) -> list[KroneckerLayer]:
    """The Kronecker layers holding every selected parameter; ConfigError if some selected
    parameter belongs elsewhere (the strict form: no fallback blocks)."""
    layers, _, _ = candidate_layers(model)
    covered = {n for layer in layers for n in layer.params}
    missing = [n for n in model.spec.names if n not in covered]
    if missing:
        raise ConfigError(
            "KFAC/EK-FAC Kronecker layers are nn.Linear, nn.Conv1d, nn.Conv2d and nn.Embedding; not covered: "
            f"{missing}. "
            "Use fallback='auto' or 'diag' (exact dense/diagonal blocks for them), exclude them with "
            "FunctionalModel(..., trainable=...), or use structure diag/full/lowrank"
        )
    return layers


Hooked = KroneckerLayer | RowsLayer


def _call_problem(layer: Hooked, calls: list[tuple], n: int) -> str | None:
    if not calls:
        return "its module is not called in the forward pass (its parameters are used some other way, or not at all)"
    for inp, out, _ in calls:
        if not isinstance(inp, Tensor) or not isinstance(out, Tensor):
            return "its module is called with non-tensor inputs or outputs"
        if inp.ndim == 0 or inp.shape[0] != n or out.shape[0] != n:
            return f"its inputs are not batch-first (first dim {inp.shape[0] if inp.ndim else None} for a batch of {n})"
        if isinstance(layer, RowsLayer) and layer.custom is None and out.shape != inp.shape:
            return "its output shape differs from its input shape"
    return None


NOT_IN_A_LAYER = "not in an nn.Linear/Conv1d/Conv2d/Embedding"


def plan_blocks(
    model: FunctionalModel, params: Params, x: Tensor, fallback: str = "auto", max_dense_block: int = 1024
) -> tuple[list[KroneckerLayer], list[FallbackBlock]]:
    """The Kronecker layers and the fallback blocks covering every selected parameter.

    One probe forward pass (the first two examples of x, forward hooks) keeps the candidate layers
    (and normalisation modules) that are called with batch-first tensors; every other selected
    parameter tensor gets a `FallbackBlock` (dense if it has <= max_dense_block entries and fallback
    is "auto", else diagonal; its rows from hooks on its normalisation module, else from per-example
    Jacobians), or raises ConfigError (fallback "error"), naming the parameters and why.
    """
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback {fallback!r}; expected one of {FALLBACKS}")
    candidates, norm_candidates, reasons = candidate_layers(model)
    hooked: list[Hooked] = [*candidates, *norm_candidates]
    layers, norms = [], {}
    if hooked:
        xb, _ = next(data_chunks(take_rows(x, slice(0, 2)), None, 2, params))
        with _recording(hooked) as records, torch.no_grad():
            model(params, xb)
        for layer in hooked:
            why = _call_problem(layer, records.calls[layer.name], n_rows(xb))
            if why:
                reasons.update({n: why for n in layer.params})
            elif isinstance(layer, KroneckerLayer):
                layers.append(layer)
            else:
                norms.update({n: layer for n in layer.params})
    covered = {n for layer in layers for n in layer.params}
    uncovered = [n for n in model.spec.names if n not in covered]
    if uncovered and fallback == "error":
        detail = "; ".join(f"{n}: {reasons.get(n, NOT_IN_A_LAYER)}" for n in uncovered)
        raise ConfigError(
            f"KFAC/EK-FAC Kronecker layers do not cover {uncovered} ({detail}); use fallback='auto' or 'diag' "
            "(exact dense/diagonal blocks for them), exclude them with FunctionalModel(..., trainable=...), or use "
            "structure diag/full/lowrank"
        )
    slices = model.spec.slices
    blocks = []
    for n in uncovered:
        numel = slices[n].stop - slices[n].start
        dense = fallback == "auto" and numel <= max_dense_block
        blocks.append(FallbackBlock(n, slices[n], dense, reasons.get(n, NOT_IN_A_LAYER), norms.get(n)))
    return layers, blocks


def hooked_norms(fallbacks: list[FallbackBlock]) -> list[RowsLayer]:
    """The normalisation modules whose hooks give fallback rows, each once, in order."""
    out: dict[str, RowsLayer] = {}
    for b in fallbacks:
        if b.source is not None:
            out.setdefault(b.source.name, b.source)
    return list(out.values())


class _record_calls:
    """Forward hooks that record (input, output, x̂ for normalisation modules) of every call of each module."""

    def __init__(self, layers: list[Hooked]) -> None:
        self.calls: dict[str, list[tuple]] = {layer.name: [] for layer in layers}

    def hook(self, layer: Hooked):
        def record(module, inputs, output):
            inp = inputs[0] if inputs else None
            x_hat = None
            if isinstance(layer, RowsLayer) and isinstance(inp, Tensor):
                with torch.no_grad():
                    x_hat = layer.normalized(inp.detach())
            self.calls[layer.name].append((inp, output, x_hat))

        return record


@contextmanager
def _recording(layers: list[Hooked]) -> Iterator[_record_calls]:
    """Forward hooks on the modules of `layers` that record their calls (`_record_calls`) while the block
    runs; removed when it ends, also on an error."""
    records = _record_calls(layers)
    handles = [layer.module.register_forward_hook(records.hook(layer)) for layer in layers]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


# --- layer inputs and outputs ----------------------------------------------------------------------
def _conv_padding(mod: nn.Module, inp: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(input padded for 'same', the remaining symmetric padding) of a Conv1d/Conv2d."""
    padding = mod.padding
    if isinstance(padding, str):
        if padding == "valid":
            return inp, (0,) * len(mod.kernel_size)
        # 'same' (stride 1): pad dilation·(k−1) in total per axis, the extra one on the right
        pads = []
        for d, k in reversed(list(zip(mod.dilation, mod.kernel_size))):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(inp, pads), (0,) * len(mod.kernel_size)
    return inp, tuple(padding)


def unfold2d(x: Tensor, kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
             stride: tuple[int, int]) -> Tensor:
    """`F.unfold` (n, C·kh·kw, H_out·W_out) by kh·kw strided copies of the padded input (one per kernel
    offset), 1.5-2x faster than `F.unfold` on CPU for 3x3 kernels."""
    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = x.new_empty(n, c, kh, kw, h_out, w_out)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (h_out - 1) + 1, sh)
            out[:, :, i, j] = x[:, :, rows, j * dw: j * dw + sw * (w_out - 1) + 1: sw]
    return out.view(n, c * kh * kw, h_out * w_out)


def layer_inputs(layer: KroneckerLayer, inp: Tensor) -> Tensor:
    """Bias-augmented layer inputs (n, T, d_in); for an Embedding the token ids (n, T), with −1 at
    padding_idx tokens (they carry no gradient)."""
    n = inp.shape[0]
    mod = layer.module
    if layer.kind == "embedding":
        ids = inp.reshape(n, -1).long()
        if mod.padding_idx is not None:
            ids = torch.where(ids == mod.padding_idx, torch.full_like(ids, -1), ids)
        return ids
    if layer.kind == "conv1d":
        inp, padding = _conv_padding(mod, inp)
        a = F.unfold(inp.unsqueeze(2), (1, mod.kernel_size[0]), dilation=(1, mod.dilation[0]),
                     padding=(0, padding[0]), stride=(1, mod.stride[0])).transpose(1, 2)
    elif layer.kind == "conv2d":
        inp, padding = _conv_padding(mod, inp)
        a = unfold2d(inp, mod.kernel_size, mod.dilation, padding, mod.stride).transpose(1, 2)
    else:
        a = inp.reshape(n, -1, mod.in_features)
    if not layer.bias:  # no copy: a conv's (n, T, d_in) stays a view of the unfolded (n, d_in, T)
        return a
    ones = torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)
    return torch.cat([a, ones], dim=-1) if layer.weight else ones


def _join(parts: list[Tensor]) -> Tensor:
    """The positions of several calls of a layer, concatenated (dim 1); one call's as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def position_gram(a: Tensor) -> Tensor:
    """Σ_{i,t} a_it a_itᵀ of layer inputs or output gradients a (n, T, d), shape (d, d). A conv's are
    views of an (n, d, T) tensor (unfolded inputs, output gradients): summed as per-example products
    U_i U_iᵀ there (no copy) when T >= d, else as one (n·T, d) product."""
    n, T, d = a.shape
    if T >= d and a.stride(1) == 1:
        U = a.transpose(1, 2)  # (n, d_in, T), contiguous rows
        out = torch.zeros(d, d, dtype=a.dtype, device=a.device)
        for s in chunks(n, max(1, _ELEMENTS // (d * d))):
            out += torch.bmm(U[s], a[s]).sum(0)
        return out
    flat = a.reshape(-1, d)
    return flat.T @ flat


def layer_outputs(layer: KroneckerLayer, out: Tensor) -> Tensor:
    """Layer outputs (or gradients w.r.t. them) as (n, T, d_out)."""
    if layer.kind in ("conv1d", "conv2d"):
        return out.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0], -1, layer.d_out)


@dataclass
class HookedForward:
    """A forward pass with hooks: logits (n, C) in the autograd graph, the Kronecker layer inputs
    [(n, T, d_in) or token ids (n, T)] (the positions of all calls of a layer concatenated), the raw
    outputs of every call of every hooked module (layers, then norms) and the norms' x̂ per call."""

    logits: Tensor
    inputs: list[Tensor]
    outputs: list[list[Tensor]]
    x_hats: list[list[Tensor]]


def layer_forward(model: FunctionalModel, layers: list[KroneckerLayer], params: Params, xb: Tensor,
                  norms: list[RowsLayer] = ()) -> HookedForward:
    """Forward pass of `xb` with hooks on `layers` and `norms` (see `HookedForward`)."""
    hooked: list[Hooked] = [*layers, *norms]
    if not hooked:
        with torch.no_grad():
            return HookedForward(model(params, xb), [], [], [])
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with _recording(hooked) as records, torch.enable_grad():
        logits = model(p, xb)
    for layer in hooked:
        why = _call_problem(layer, records.calls[layer.name], n_rows(xb))
        if why:
            raise ConfigError(f"module {layer.name!r}: {why}; exclude its parameters with trainable=")
    inputs = [_join([layer_inputs(layer, inp.detach()) for inp, _, _ in records.calls[layer.name]]) for layer in layers]
    outputs = [[out for _, out, _ in records.calls[layer.name]] for layer in hooked]
    x_hats = [[x_hat for _, _, x_hat in records.calls[norm.name]] for norm in norms]
    return HookedForward(logits, inputs, outputs, x_hats)


def backward_directions(model: FunctionalModel, matrix: str, logits: Tensor, yb: Tensor, mc_samples: int = 0,
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """Output-space cotangents (n, C) whose backpropagation gives K's factors: for the GGN the C columns
    of L_i (L_i L_iᵀ = Λ_i; exact), or with `mc_samples` = k > 0 the k Monte-Carlo directions
    ∂l(f_i, ŷ_is)/∂f_i / √k at targets ŷ_is drawn from the model's predictive p(y | f_i)
    (`objective.sample`; E[Σ_s u_s u_sᵀ] = Λ_i, the Fisher of the likelihood, = the GGN's Λ_i for the
    likelihoods here); for the empirical Fisher ∂l_i/∂f_i at the true targets."""
    logits = logits.detach()
    if matrix == "ef":
        return [model.objective.output_grad(logits, yb)]
    if mc_samples:
        scale = mc_samples**-0.5
        return [model.objective.output_grad(logits, model.objective.sample(logits, generator)) * scale
                for _ in range(mc_samples)]
    L = model.objective.output_hessian_sqrt(logits)
    return [L[:, :, c].contiguous() for c in range(L.shape[-1])]


def output_grads(layers: list[KroneckerLayer], norms: list[RowsLayer], fwd: HookedForward, cotangent: Tensor,
                 retain: bool = True) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Backpropagate `cotangent` (n, C) from the logits: each Kronecker layer's output gradients
    [(n, T, d_out)], and the per-example gradient rows {parameter: (n, p)} of the norms' parameters."""
    if not fwd.outputs:
        return [], {}
    flat = [o for outs in fwd.outputs for o in outs]
    grads = iter(torch.autograd.grad(fwd.logits, flat, grad_outputs=cotangent, retain_graph=retain, allow_unused=True))
    result = []
    for layer, outs in zip(layers, fwd.outputs):
        parts = []
        for o in outs:
            g = next(grads)
            parts.append(layer_outputs(layer, g if g is not None else torch.zeros_like(o)))
        result.append(_join(parts))
    rows: dict[str, Tensor] = {}
    for norm, outs, x_hats in zip(norms, fwd.outputs[len(layers):], fwd.x_hats):
        for o, x_hat in zip(outs, x_hats):
            g = next(grads)
            for name, r in norm.rows(x_hat, g if g is not None else torch.zeros_like(o)).items():
                rows[name] = rows[name] + r if name in rows else r
    return result, rows


@dataclass
class ChunkPass:
    """One chunk of the data pass: its inputs xb, logits, the layer inputs, the backward directions
    (n, C) and an iterator giving, per direction in turn, (the layer output gradients [(n, T, d_out)],
    the hooked fallback rows {parameter: (n, p)})."""

    xb: Tensor
    logits: Tensor
    inputs: list[Tensor]
    directions: list[Tensor]
    per_direction: Iterator[tuple[list[Tensor], dict[str, Tensor]]]


def layer_backward_passes(
    model: FunctionalModel, layers: list[KroneckerLayer], matrix: str, params: Params, x: Tensor, y: Tensor,
    chunk_size: int, norms: list[RowsLayer] = (), mc_samples: int = 0, seed: int = 0,
) -> Iterator[ChunkPass]:
    """The pass over the data behind every Kronecker factor, one `ChunkPass` per chunk of (x, y)
    (`backward_directions`; Monte-Carlo targets drawn from a generator seeded with `seed` at the start
    of the pass, so two passes draw the same targets). Consume the directions before advancing to the
    next chunk (the graph is freed after the last)."""
    generator = None
    if mc_samples and matrix == "ggn":
        first = next(iter(params.values()))
        generator = torch.Generator(device=first.device).manual_seed(int(seed))
    for xb, yb in data_chunks(x, y, chunk_size, params):
        fwd = layer_forward(model, layers, params, xb, norms)
        directions = backward_directions(model, matrix, fwd.logits, yb, mc_samples, generator)
        last = len(directions) - 1
        per_direction = (output_grads(layers, norms, fwd, u, retain=c < last) for c, u in enumerate(directions))
        yield ChunkPass(xb, fwd.logits.detach(), fwd.inputs, directions, per_direction)


# --- per-example gradient grids -----------------------------------------------------------------------
def token_sums(ids: Tensor, values: Tensor, vocabulary: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sum `values` (n, T, *rest) over the positions of equal token within each example.

    Returns (example (U,), token (U,), sums (U, *rest)) over the U distinct (example, token) pairs;
    ids −1 (padding) are left out. Σ_t g_t onehot(x_t)ᵀ of one example is sparse: its column k is
    the sum of g_t over the positions t holding token k.
    """
    mask = ids >= 0
    n, T = ids.shape
    example = torch.arange(n, device=ids.device).unsqueeze(1).expand(n, T)[mask]
    key = example * vocabulary + ids[mask]
    unique, inverse = torch.unique(key, return_inverse=True)
    sums = torch.zeros(len(unique), *values.shape[2:], dtype=values.dtype, device=values.device)
    sums.index_add_(0, inverse, values[mask])
    return unique // vocabulary, unique % vocabulary, sums


def example_grids(layer: KroneckerLayer, g: Tensor, a: Tensor, Q_g: Tensor | None = None,
                  Q_a: Tensor | None = None) -> Tensor:
    """Per-example gradient grids Γ_i = Σ_t g_it a_itᵀ, shape (n, d_out, d_in), turned into the
    eigenbasis Q_Gᵀ Γ_i Q_A by the factors given (None: that side as it is; pass Q_a = None when `a` is
    already rotated). g: (n, T, d_out); a: (n, T, d_in) or, for an embedding, token ids (n, T).

    One batched matrix product over the positions, the cost of the layer's weight gradient
    (T·d_out·d_in per example). Q_G is applied before the sum over positions when T < d_in
    (T·d_out² against d_out²·d_in per example), after it otherwise; Q_A after it (a caller that
    reuses `a` for several directions rotates it first when T·d_in² is the cheaper, see
    `rotate_inputs_first`)."""
    n, T, d_out = g.shape
    if Q_g is not None and (layer.diagonal_input or T < layer.d_in):
        g, Q_g = g @ Q_g, None
    if layer.diagonal_input:
        example, token, sums = token_sums(a, g, layer.d_in)
        grid = torch.zeros(n, layer.d_in, d_out, dtype=g.dtype, device=g.device)
        grid[example, token] = sums
        grid = grid.transpose(1, 2)
    else:
        grid = torch.bmm(g.transpose(1, 2), a)
    if Q_g is not None:
        grid = Q_g.T @ grid
    if Q_a is not None:
        grid = grid @ Q_a
    return grid


def rotate_inputs_first(layer: KroneckerLayer, positions: int, directions: int) -> bool:
    """Whether a @ Q_A (once per example: T·d_in²) is cheaper than Γ Q_A (per backward direction:
    d_out·d_in²) for a layer with T = `positions` and `directions` backward directions."""
    return not layer.diagonal_input and (positions == 1 or positions < directions * layer.d_out)


def squared_example_grids(layer: KroneckerLayer, g: Tensor, a: Tensor, Q_g: Tensor | None = None,
                          Q_a: Tensor | None = None) -> Tensor:
    """Σ_i Γ̃_i ⊙ Γ̃_i with Γ̃_i = Q_Gᵀ (Σ_t g_it a_itᵀ) Q_A the per-example gradient grid (in the
    eigenbasis when Q_g / Q_a are given, see `example_grids`), shape (d_out, d_in); g: (n, T, d_out);
    a: (n, T, d_in) (possibly rotated) or, for an embedding, token ids (n, T). Sub-chunked so no
    temporary exceeds about 2^24 entries."""
    if layer.diagonal_input:
        if Q_g is not None:
            g = g @ Q_g
        vocabulary = layer.d_in
        _, token, sums = token_sums(a, g, vocabulary)
        out = torch.zeros(g.shape[-1], vocabulary, dtype=g.dtype, device=g.device)
        return out.index_add_(1, token, sums.pow(2).T)
    n, T, d_out = g.shape
    d_in = a.shape[-1]
    if T == 1:
        g, a = (g if Q_g is None else g @ Q_g), (a if Q_a is None else a @ Q_a)
        return g[:, 0].pow(2).T @ a[:, 0].pow(2)
    out = torch.zeros(d_out, d_in, dtype=g.dtype, device=g.device)
    for s in chunks(n, max(1, _ELEMENTS // (d_out * d_in))):
        out += example_grids(layer, g[s], a[s], Q_g, Q_a).pow(2).sum(0)
    return out


# --- fallback blocks: per-example Jacobians of the uncovered parameters ------------------------------------
def fallback_jacobians(
    model: FunctionalModel, params: Params, names: list[str], xb: Tensor
) -> Iterator[tuple[slice, Tensor]]:
    """Per-example Jacobians of the outputs w.r.t. the parameters `names` only, flat (m, C, p) in the
    order of `names`, for sub-chunks (slices of xb) of at most about 2^24 entries."""
    rest = {k: v for k, v in params.items() if k not in names}
    sub = {k: params[k] for k in names}

    def single(s: Params, xi: Tensor) -> Tensor:
        return model({**rest, **s}, map_inputs(lambda t: t.unsqueeze(0), xi))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))
    with torch.no_grad():
        C = model(params, take_rows(xb, slice(0, 1))).reshape(1, -1).shape[1]
    p = sum(v.numel() for v in sub.values())
    for s in chunks(n_rows(xb), max(1, _ELEMENTS // (C * p))):
        J = jac(sub, take_rows(xb, s))
        yield s, torch.cat([J[k].reshape(s.stop - s.start, C, -1) for k in names], dim=-1)


def fallback_offsets(blocks: list[FallbackBlock]) -> list[slice]:
    """Columns of each fallback block in the concatenated (…, Σp) fallback Jacobian."""
    out, start = [], 0
    for b in blocks:
        out.append(slice(start, start + b.d_in))
        start += b.d_in
    return out


def jacobian_blocks(fallbacks: list[FallbackBlock]) -> list[FallbackBlock]:
    """The fallback blocks whose rows come from per-example Jacobians (no hooked source)."""
    return [b for b in fallbacks if b.source is None]


# --- exact diagonal and Jacobian quadratic forms through the layer structure ---------------------------
def fallback_square_sums(fallbacks: list[FallbackBlock], step: ChunkPass, rows: list[dict[str, Tensor]],
                         model: FunctionalModel, params: Params, accumulate) -> None:
    """Hand every fallback block's per-example rows R (m, p) of one chunk to `accumulate(k, R)` (k: the
    block's index in `fallbacks`), per backward direction: hooked rows from `rows` (one dict per
    direction), the others from per-example Jacobians of sub-chunks."""
    for k, b in enumerate(fallbacks):
        if b.source is not None:
            for r in rows:
                accumulate(k, r[b.name].reshape(len(step.xb), -1))
    jac = jacobian_blocks(fallbacks)
    if not jac:
        return
    index = {id(b): k for k, b in enumerate(fallbacks)}
    for s, J in fallback_jacobians(model, params, [b.name for b in jac], step.xb):
        for u in step.directions:
            R = torch.einsum("nc,ncp->np", u[s], J)
            for b, cols in zip(jac, fallback_offsets(jac)):
                accumulate(index[id(b)], R[:, cols])


def layer_diagonal(
    model: FunctionalModel, matrix: str, params: Params, x: Tensor, y: Tensor, chunk_size: int
) -> Tensor:
    """Exact diag of the GGN or EF (summed loss), flat (P,): for Kronecker layers from layer inputs and
    backpropagated output gradients, diag = Σ_{i,u} (Σ_t g_itu ⊙ a_it)² (for T = 1: Σ_{i,u} g_iu² a_iu²ᵀ,
    no per-example gradients); for every other parameter from its per-example rows (fallback)."""
    layers, fallbacks = plan_blocks(model, params, x, "diag")
    first = next(iter(params.values()))
    grids = [torch.zeros(layer.d_out, layer.d_in, dtype=first.dtype, device=first.device) for layer in layers]
    fb = [torch.zeros(b.d_in, dtype=first.dtype, device=first.device) for b in fallbacks]

    def add(k, R):
        fb[k] += R.pow(2).sum(0)

    norms = hooked_norms(fallbacks)
    for step in layer_backward_passes(model, layers, matrix, params, x, y, chunk_size, norms):
        rows = []
        for grads, r in step.per_direction:
            rows.append(r)
            for l, (layer, g, a) in enumerate(zip(layers, grads, step.inputs)):
                grids[l] += squared_example_grids(layer, g, a)
        fallback_square_sums(fallbacks, step, rows, model, params, add)
    out = torch.zeros(model.n_params, dtype=first.dtype, device=first.device)
    for layer, grid in zip(layers, grids):
        out[layer.flat_indices()] = grid.reshape(-1)
    for b, d in zip(fallbacks, fb):
        out[b.flat_indices()] = d
    return out


def block_grid(block: Block, flat: Tensor) -> Tensor:
    """The (d_out, d_in) grid of one block from a flat (P,) vector."""
    return flat[block.flat_indices()].reshape(block.d_out, block.d_in)


def layer_quadratic_form(
    model: FunctionalModel,
    blocks: list[Block],
    params: Params,
    x: Tensor,
    bases: list[tuple[Tensor | None, Tensor | None]],
    weights: list[Tensor],
    chunk_size: int = 256,
) -> Tensor:
    """Σ_blocks J_i Σ_b J_iᵀ, shape (n, C, C), for a block-diagonal Σ whose block is
    (Q_G ⊗ Q_A) diag(vec W) (Q_G ⊗ Q_A)ᵀ (Q = None means the identity), `bases` [(Q_A, Q_G)].

    Kronecker layer: J_i = Σ_t B_it ⊗ a_itᵀ (B_it = ∂f_i/∂s_it, C x d_out, from C backward passes of
    the batch). With B̃ = B Q_G and ã = a Q_A: T = 1: V_i = B̃_i diag(w_i) B̃_iᵀ with w_ij = Σ_k ã_ik² W_jk;
    T > 1: V_i,cd = Σ_jk M_cjk M_djk W_jk with M = Σ_t B̃_t ⊗ ã_t (embeddings: M sums B̃_t over the
    positions of each token). Fallback block: J_i restricted to its parameter (rows of the C backward
    passes for norm parameters, per-example Jacobians for the others).
    """
    layers = [b for b in blocks if isinstance(b, KroneckerLayer)]
    fallbacks = [b for b in blocks if isinstance(b, FallbackBlock)]
    norms = hooked_norms(fallbacks)
    where = {id(b): k for k, b in enumerate(blocks)}

    def add_fallback(V, b, J):  # J: (m, C, p) restricted Jacobians of block b
        Q_a, _ = bases[where[id(b)]]
        Jb = J if Q_a is None else J @ Q_a
        V += torch.einsum("ncp,p,ndp->ncd", Jb, weights[where[id(b)]][0], Jb)

    out = []
    for xb, _ in data_chunks(x, None, chunk_size, params):
        fwd = layer_forward(model, layers, params, xb, norms)
        n, C = fwd.logits.shape
        V = torch.zeros(n, C, C, dtype=fwd.logits.dtype, device=fwd.logits.device)
        if fwd.outputs:
            eye = torch.eye(C, dtype=V.dtype, device=V.device)
            per_class = [output_grads(layers, norms, fwd, eye[c].expand(n, C), retain=c < C - 1) for c in range(C)]
            for l, (layer, a) in enumerate(zip(layers, fwd.inputs)):
                Q_a, Q_g = bases[where[id(layer)]]
                W = weights[where[id(layer)]]
                B = torch.stack([per_class[c][0][l] for c in range(C)], dim=1)  # (n, C, T, d_out)
                if Q_g is not None:
                    B = B @ Q_g
                if layer.diagonal_input:
                    example, token, M = token_sums(a, B.permute(0, 2, 1, 3), layer.d_in)  # M: (U, C, d_out)
                    V.index_add_(0, example, torch.einsum("ucj,uj,udj->ucd", M, W[:, token].T, M))
                    continue
                if Q_a is not None:
                    a = a @ Q_a
                if a.shape[1] == 1:
                    w = a[:, 0].pow(2) @ W.T  # (n, d_out)
                    Bt = B[:, :, 0]
                    V += torch.einsum("ncj,nj,ndj->ncd", Bt, w, Bt)
                else:
                    for s in chunks(n, max(1, _ELEMENTS // (C * layer.d_out * layer.d_in))):
                        M = torch.einsum("nctj,ntk->ncjk", B[s], a[s])
                        V[s] += torch.einsum("ncjk,jk,ndjk->ncd", M, W, M)
            for b in fallbacks:
                if b.source is not None:
                    add_fallback(V, b, torch.stack([per_class[c][1][b.name].reshape(n, -1) for c in range(C)], dim=1))
        jac = jacobian_blocks(fallbacks)
        if jac:
            for s, J in fallback_jacobians(model, params, [b.name for b in jac], xb):
                for b, cols in zip(jac, fallback_offsets(jac)):
                    add_fallback(V[s], b, J[:, :, cols])
        out.append(V.detach())
    return torch.cat(out)
