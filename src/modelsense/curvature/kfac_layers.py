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
gets one exact block per parameter tensor, from its per-example Jacobians (vmap of jacrev over the
examples, restricted to these parameters): `R_u = Σ_c u_c J_c` for each backward direction u (the
columns of L_i for the GGN, ∂l_i/∂f_i for the EF) and block = Σ_{i,u} R_iuᵀ R_iu, kept

    dense     (p x p, exact) when the tensor has p <= max_dense_block entries (fallback "auto")
    diagonal  (its exact diagonal) otherwise, or for every tensor with fallback "diag"

and fallback "error" refuses such parameters instead (naming them and why). Blocks of different
layers / tensors never interact (block-diagonal K).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, vmap

from modelsense.core.functional import FunctionalModel, Params, chunks
from modelsense.curvature._common import data_chunks, loss_output_grad, output_hessian_sqrt
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
            return torch.arange(self.weight_slice.start, self.weight_slice.stop).reshape(self.d_in, self.d_out).T.reshape(-1)
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
        return f"a convolution with groups={mod.groups}, padding_mode={mod.padding_mode!r} (KFAC needs groups=1, zero padding)"
    if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse):
        return "an embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


def candidate_layers(model: FunctionalModel) -> tuple[list[KroneckerLayer], dict[str, str]]:
    """The Linear/Conv1d/Conv2d/Embedding modules holding selected parameters, and for the selected
    parameters of such modules that cannot be Kronecker layers: name -> reason."""
    offsets = model.spec.slices
    owners = _owners(model.module)
    named = dict(model.module.named_parameters())
    layers, reasons = [], {}
    for mname, mod in model.module.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            continue
        prefix = f"{mname}." if mname else ""
        w = prefix + "weight" if prefix + "weight" in offsets else None
        b = prefix + "bias" if getattr(mod, "bias", None) is not None and prefix + "bias" in offsets else None
        if w is None and b is None:
            continue
        why = _unsupported(mod)
        shared = [n for n in (w, b) if n and len(owners.get(id(named[n]), [])) > 1]
        if shared:
            why = f"its parameters {shared} are shared with another module ({owners[id(named[shared[0]])]})"
        if why:
            reasons.update({n: why for n in (w, b) if n})
            continue
        if isinstance(mod, nn.Embedding):
            d_in, d_out = mod.num_embeddings, mod.embedding_dim
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            d_in = (mod.in_channels * int(torch.tensor(mod.kernel_size).prod()) if w else 0) + (1 if b else 0)
            d_out = mod.out_channels
        else:
            d_in, d_out = (mod.in_features if w else 0) + (1 if b else 0), mod.out_features
        layers.append(KroneckerLayer(mname, mod, w, b, d_in, d_out, offsets.get(w), offsets.get(b)))
    return layers, reasons


def find_layers(model: FunctionalModel) -> list[KroneckerLayer]:
    """The Kronecker layers holding every selected parameter; ConfigError if some selected
    parameter belongs elsewhere (the strict form: no fallback blocks)."""
    layers, reasons = candidate_layers(model)
    covered = {n for layer in layers for n in layer.params}
    missing = [n for n in model.spec.names if n not in covered]
    if missing:
        raise ConfigError(
            f"KFAC/EK-FAC Kronecker layers are nn.Linear, nn.Conv1d, nn.Conv2d and nn.Embedding; not covered: {missing}. "
            "Use fallback='auto' or 'diag' (exact dense/diagonal blocks for them), exclude them with "
            "FunctionalModel(..., trainable=...), or use structure diag/full/lowrank"
        )
    return layers


def _call_problem(layer: KroneckerLayer, calls: list[tuple[Tensor, Tensor]], n: int) -> str | None:
    if not calls:
        return "its module is not called in the forward pass (its parameters are used some other way, or not at all)"
    for inp, out in calls:
        if not isinstance(inp, Tensor) or not isinstance(out, Tensor):
            return "its module is called with non-tensor inputs or outputs"
        if inp.ndim == 0 or inp.shape[0] != n or out.shape[0] != n:
            return f"its inputs are not batch-first (first dim {inp.shape[0] if inp.ndim else None} for a batch of {n})"
    return None


def plan_blocks(
    model: FunctionalModel, params: Params, x: Tensor, fallback: str = "auto", max_dense_block: int = 1024
) -> tuple[list[KroneckerLayer], list[FallbackBlock]]:
    """The Kronecker layers and the fallback blocks covering every selected parameter.

    One probe forward pass (the first two examples of x, forward hooks) keeps the candidate layers
    that are called with batch-first tensors; every other selected parameter tensor gets a
    `FallbackBlock` (dense if it has <= max_dense_block entries and fallback is "auto", else
    diagonal), or raises ConfigError (fallback "error"), naming the parameters and why.
    """
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback {fallback!r}; expected one of {FALLBACKS}")
    candidates, reasons = candidate_layers(model)
    if candidates:
        xb, _ = next(data_chunks(x[:2], None, 2, params))
        records = _record_calls(candidates)
        handles = [layer.module.register_forward_hook(records.hook(layer.name)) for layer in candidates]
        try:
            with torch.no_grad():
                model(params, xb)
        finally:
            for h in handles:
                h.remove()
        layers = []
        for layer in candidates:
            why = _call_problem(layer, records.calls[layer.name], len(xb))
            if why:
                reasons.update({n: why for n in layer.params})
            else:
                layers.append(layer)
    else:
        layers = []
    covered = {n for layer in layers for n in layer.params}
    uncovered = [n for n in model.spec.names if n not in covered]
    if uncovered and fallback == "error":
        detail = "; ".join(f"{n}: {reasons.get(n, 'not in an nn.Linear/Conv1d/Conv2d/Embedding')}" for n in uncovered)
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
        blocks.append(FallbackBlock(n, slices[n], dense, reasons.get(n, "not in an nn.Linear/Conv1d/Conv2d/Embedding")))
    return layers, blocks


class _record_calls:
    """Forward hooks that record (input, output) of every call of each layer."""

    def __init__(self, layers: list[KroneckerLayer]) -> None:
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {layer.name: [] for layer in layers}

    def hook(self, name: str):
        def record(module, inputs, output):
            self.calls[name].append((inputs[0] if inputs else None, output))

        return record


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
        a = F.unfold(inp, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride).transpose(1, 2)
    else:
        a = inp.reshape(n, -1, mod.in_features)
    parts = [a] if layer.weight else []
    if layer.bias:
        parts.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
    return torch.cat(parts, dim=-1)


def layer_outputs(layer: KroneckerLayer, out: Tensor) -> Tensor:
    """Layer outputs (or gradients w.r.t. them) as (n, T, d_out)."""
    if layer.kind in ("conv1d", "conv2d"):
        return out.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0], -1, layer.d_out)


def layer_forward(model: FunctionalModel, layers: list[KroneckerLayer], params: Params, xb: Tensor):
    """Logits (n, C), layer inputs [(n, T, d_in) or token ids (n, T)] (the positions of all calls of
    a layer concatenated) and the raw outputs of every call [[Tensor]] (kept in the autograd graph)."""
    records = _record_calls(layers)
    handles = [layer.module.register_forward_hook(records.hook(layer.name)) for layer in layers]
    try:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            logits = model(p, xb)
    finally:
        for h in handles:
            h.remove()
    inputs, outputs = [], []
    for layer in layers:
        calls = records.calls[layer.name]
        why = _call_problem(layer, calls, len(xb))
        if why:
            raise ConfigError(f"layer {layer.name!r}: {why}; exclude its parameters with trainable=")
        inputs.append(torch.cat([layer_inputs(layer, inp.detach()) for inp, _ in calls], dim=1))
        outputs.append([out for _, out in calls])
    return logits, inputs, outputs


def backward_directions(model: FunctionalModel, matrix: str, logits: Tensor, yb: Tensor) -> list[Tensor]:
    """Output-space cotangents (n, C) whose backpropagation gives K's factors: the C columns of
    L_i (L_i L_iᵀ = Λ_i) for the GGN, or ∂l_i/∂f_i for the empirical Fisher."""
    logits = logits.detach()
    if matrix == "ef":
        return [loss_output_grad(logits, yb, model.likelihood)]
    L = output_hessian_sqrt(logits, model.likelihood)
    return [L[:, :, c].contiguous() for c in range(L.shape[-1])]


def output_grads(layers, logits: Tensor, outputs: list[list[Tensor]], cotangent: Tensor, retain: bool = True) -> list[Tensor]:
    """Backpropagate `cotangent` (n, C) from the logits to each layer output: [(n, T, d_out)]."""
    flat = [o for outs in outputs for o in outs]
    grads = torch.autograd.grad(logits, flat, grad_outputs=cotangent, retain_graph=retain, allow_unused=True)
    result, k = [], 0
    for layer, outs in zip(layers, outputs):
        parts = []
        for o in outs:
            g = grads[k]
            k += 1
            parts.append(layer_outputs(layer, g if g is not None else torch.zeros_like(o)))
        result.append(torch.cat(parts, dim=1))
    return result


@dataclass
class ChunkPass:
    """One chunk of the data pass: its inputs xb, logits, the layer inputs, the backward directions
    (n, C) and an iterator giving, per direction in turn, the layer output gradients [(n, T, d_out)]."""

    xb: Tensor
    logits: Tensor
    inputs: list[Tensor]
    directions: list[Tensor]
    per_direction: Iterator[list[Tensor]]


def layer_backward_passes(
    model: FunctionalModel, layers: list[KroneckerLayer], matrix: str, params: Params, x: Tensor, y: Tensor, chunk_size: int
) -> Iterator[ChunkPass]:
    """The pass over the data behind every Kronecker factor, one `ChunkPass` per chunk of (x, y).
    Consume the directions before advancing to the next chunk (the graph is freed after the last)."""
    for xb, yb in data_chunks(x, y, chunk_size, params):
        if layers:
            logits, inputs, outputs = layer_forward(model, layers, params, xb)
        else:
            with torch.no_grad():
                logits, inputs, outputs = model(params, xb), [], []
        directions = backward_directions(model, matrix, logits, yb)
        last = len(directions) - 1
        per_direction = (
            (output_grads(layers, logits, outputs, u, retain=c < last) if layers else [] for c, u in enumerate(directions))
        )
        yield ChunkPass(xb, logits.detach(), inputs, directions, per_direction)


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


def squared_example_grids(layer: KroneckerLayer, g: Tensor, a: Tensor) -> Tensor:
    """Σ_i Γ_i ⊙ Γ_i with Γ_i = Σ_t g_it a_itᵀ the per-example gradient grid, shape (d_out, d_in);
    g: (n, T, d_out) (possibly rotated); a: (n, T, d_in) (possibly rotated) or, for an embedding,
    token ids (n, T). Sub-chunked so no temporary exceeds about 2^24 entries."""
    if layer.diagonal_input:
        vocabulary = layer.d_in
        _, token, sums = token_sums(a, g, vocabulary)
        out = torch.zeros(g.shape[-1], vocabulary, dtype=g.dtype, device=g.device)
        return out.index_add_(1, token, sums.pow(2).T)
    n, T, d_out = g.shape
    d_in = a.shape[-1]
    if T == 1:
        return g[:, 0].pow(2).T @ a[:, 0].pow(2)
    out = torch.zeros(d_out, d_in, dtype=g.dtype, device=g.device)
    for s in chunks(n, max(1, _ELEMENTS // (d_out * d_in))):
        out += torch.einsum("ntj,ntk->njk", g[s], a[s]).pow(2).sum(0)
    return out


# --- fallback blocks: per-example Jacobians of the uncovered parameters ------------------------------------
def fallback_jacobians(model: FunctionalModel, params: Params, names: list[str], xb: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """Per-example Jacobians of the outputs w.r.t. the parameters `names` only, flat (m, C, p) in the
    order of `names`, for sub-chunks (slices of xb) of at most about 2^24 entries."""
    rest = {k: v for k, v in params.items() if k not in names}
    sub = {k: params[k] for k in names}

    def single(s: Params, xi: Tensor) -> Tensor:
        return model({**rest, **s}, xi.unsqueeze(0))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))
    with torch.no_grad():
        C = model(params, xb[:1]).reshape(1, -1).shape[1]
    p = sum(v.numel() for v in sub.values())
    for s in chunks(len(xb), max(1, _ELEMENTS // (C * p))):
        J = jac(sub, xb[s])
        yield s, torch.cat([J[k].reshape(s.stop - s.start, C, -1) for k in names], dim=-1)


def fallback_offsets(blocks: list[FallbackBlock]) -> list[slice]:
    """Columns of each fallback block in the concatenated (…, Σp) fallback Jacobian."""
    out, start = [], 0
    for b in blocks:
        out.append(slice(start, start + b.d_in))
        start += b.d_in
    return out


# --- exact diagonal and Jacobian quadratic forms through the layer structure ---------------------------
def layer_diagonal(model: FunctionalModel, matrix: str, params: Params, x: Tensor, y: Tensor, chunk_size: int) -> Tensor:
    """Exact diag of the GGN or EF (summed loss), flat (P,): for Kronecker layers from layer inputs and
    backpropagated output gradients, diag = Σ_{i,u} (Σ_t g_itu ⊙ a_it)² (for T = 1: Σ_{i,u} g_iu² a_iu²ᵀ,
    no per-example gradients); for every other parameter from its per-example Jacobians (fallback)."""
    layers, fallbacks = plan_blocks(model, params, x, "diag")
    first = next(iter(params.values()))
    grids = [torch.zeros(layer.d_out, layer.d_in, dtype=first.dtype, device=first.device) for layer in layers]
    fb_diag = torch.zeros(sum(b.d_in for b in fallbacks), dtype=first.dtype, device=first.device)
    names = [b.name for b in fallbacks]
    for step in layer_backward_passes(model, layers, matrix, params, x, y, chunk_size):
        for grads in step.per_direction:
            for l, (layer, g, a) in enumerate(zip(layers, grads, step.inputs)):
                grids[l] += squared_example_grids(layer, g, a)
        if fallbacks:
            for s, J in fallback_jacobians(model, params, names, step.xb):
                for u in step.directions:
                    fb_diag += torch.einsum("nc,ncp->np", u[s], J).pow(2).sum(0)
    out = torch.zeros(model.n_params, dtype=first.dtype, device=first.device)
    for layer, grid in zip(layers, grids):
        out[layer.flat_indices()] = grid.reshape(-1)
    for b, cols in zip(fallbacks, fallback_offsets(fallbacks)):
        out[b.flat_indices()] = fb_diag[cols]
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
    positions of each token). Fallback block: J_i restricted to its parameter (per-example Jacobians).
    """
    layers = [b for b in blocks if isinstance(b, KroneckerLayer)]
    fallbacks = [b for b in blocks if isinstance(b, FallbackBlock)]
    where = {id(b): k for k, b in enumerate(blocks)}
    out = []
    for xb, _ in data_chunks(x, None, chunk_size, params):
        if layers:
            logits, inputs, outputs = layer_forward(model, layers, params, xb)
        else:
            with torch.no_grad():
                logits, inputs, outputs = model(params, xb), [], []
        n, C = logits.shape
        V = torch.zeros(n, C, C, dtype=logits.dtype, device=logits.device)
        if layers:
            eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
            per_class = [output_grads(layers, logits, outputs, eye[c].expand(n, C), retain=c < C - 1) for c in range(C)]
            for l, (layer, a) in enumerate(zip(layers, inputs)):
                Q_a, Q_g = bases[where[id(layer)]]
                W = weights[where[id(layer)]]
                B = torch.stack([per_class[c][l] for c in range(C)], dim=1)  # (n, C, T, d_out)
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
        if fallbacks:
            for s, J in fallback_jacobians(model, params, [b.name for b in fallbacks], xb):
                for b, cols in zip(fallbacks, fallback_offsets(fallbacks)):
                    Q_a, _ = bases[where[id(b)]]
                    Jb = J[:, :, cols] if Q_a is None else J[:, :, cols] @ Q_a
                    V[s] += torch.einsum("ncp,p,ndp->ncd", Jb, weights[where[id(b)]][0], Jb)
        out.append(V.detach())
    return torch.cat(out)
