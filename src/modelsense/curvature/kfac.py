"""KFAC and EK-FAC for nn.Linear and nn.Conv2d layers (GGN or empirical Fisher).

For a layer with (bias-augmented) inputs a ∈ R^{d_in} and outputs s ∈ R^{d_out} at T locations per
example (T = 1 for Linear on (n, d) inputs; T = output pixels for Conv2d, a = unfolded patch),
the per-example gradient of its weight matrix W (d_out x d_in, bias as the last column) along an
output-space direction is Σ_t g_t a_tᵀ, with g_t the backpropagated vector at s_t.

KFAC ("expand" flavour, Grosse & Martens 2016, Eschenhagen et al. 2023), loss summed over N:

    block ≈ G ⊗ A,   A = 1/(N T) Σ_{i,t} a_it a_itᵀ,   G = Σ_{i,t,c} g_itc g_itcᵀ

with g_itc backpropagated from L_i[:, c] (L_i L_iᵀ = Λ_i, exact GGN, C backward passes; no Monte
Carlo) for the GGN, or from ∂l_i/∂f_i for the empirical Fisher. Parameters are flattened row-major
(W.reshape(d_out, -1), the layout of nn.Linear/nn.Conv2d weights), so (G ⊗ A) vec(V) = vec(G V A).
KFAC is exact for: one example (N = 1) with T = 1 (every layer block); a linear layer feeding the
output under the gaussian likelihood (g_itc = e_c, any N).

EK-FAC (George et al. 2018): keep the eigenbasis Q_G ⊗ Q_A of KFAC and replace its eigenvalues by
S_jk = Σ_{i,c} ((Q_Gᵀ Γ_ic Q_A)_jk)², Γ_ic = Σ_t g_itc a_itᵀ the exact per-example gradient matrix,
i.e. the diagonal of the exact block in that basis (the Frobenius-optimal choice in that basis).

Both are stored as (Q_G, Q_A, S) per layer: K_block = (Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ with
S = λ_G λ_Aᵀ for KFAC. Blocks of different layers do not interact (block-diagonal K).
Hand-written (not curvlinops' KFACLinearOperator): we need the eigen-factors for the Kronecker
predictive covariance below and `FunctionalModel` parameter dicts with a `trainable` filter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel, Params
from modelsense.curvature._common import (
    DataOperator,
    as_matrix,
    check_damping,
    data_chunks,
    loss_output_grad,
    output_hessian_sqrt,
)
from modelsense.curvature.lanczos import EigenDecomposition
from modelsense.curvature.operators import Curvature
from modelsense.errors import ConfigError


@dataclass
class KroneckerLayer:
    """One nn.Linear / nn.Conv2d with the flat positions of its selected parameters.

    weight/bias: parameter names when selected (else None); d_in includes the bias column;
    weight_slice/bias_slice: positions in the flat parameter vector.
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
    def d_weight(self) -> int:
        return self.d_in - (1 if self.bias else 0)

    def flat_indices(self) -> Tensor:
        """Flat positions of the (d_out, d_in) matrix [W | b] in row-major order, shape (d_out·d_in,)."""
        cols = []
        if self.weight:
            cols.append(torch.arange(self.weight_slice.start, self.weight_slice.stop).reshape(self.d_out, -1))
        if self.bias:
            cols.append(torch.arange(self.bias_slice.start, self.bias_slice.stop).reshape(self.d_out, 1))
        return torch.cat(cols, dim=1).reshape(-1)


def find_layers(model: FunctionalModel) -> list[KroneckerLayer]:
    """The Linear/Conv2d layers holding the model's selected parameters; ConfigError if any
    selected parameter belongs elsewhere (select them away with `trainable=`)."""
    offsets = model.spec.slices
    layers, covered = [], set()
    for mname, mod in model.module.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        prefix = f"{mname}." if mname else ""
        w = prefix + "weight" if prefix + "weight" in offsets else None
        b = prefix + "bias" if mod.bias is not None and prefix + "bias" in offsets else None
        if w is None and b is None:
            continue
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.padding_mode != "zeros":
                raise ConfigError(
                    f"KFAC supports Conv2d with groups=1 and zero padding; layer {mname!r} has "
                    f"groups={mod.groups}, padding_mode={mod.padding_mode!r}"
                )
            d_w = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            d_out = mod.out_channels
        else:
            d_w, d_out = mod.in_features, mod.out_features
        d_in = (d_w if w else 0) + (1 if b else 0)
        layers.append(KroneckerLayer(mname, mod, w, b, d_in, d_out, offsets.get(w), offsets.get(b)))
        covered.update(n for n in (w, b) if n)
    missing = [n for n in model.spec.names if n not in covered]
    if missing:
        raise ConfigError(
            f"KFAC/EK-FAC cover nn.Linear and nn.Conv2d parameters only; not covered: {missing}. "
            "Exclude them with FunctionalModel(..., trainable=...) or use structure diag/full/lowrank"
        )
    return layers


def _layer_inputs(layer: KroneckerLayer, inp: Tensor) -> Tensor:
    """Bias-augmented layer inputs, shape (n, T, d_in)."""
    n = inp.shape[0]
    mod = layer.module
    if isinstance(mod, nn.Conv2d):
        padding = mod.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # 'same' (stride 1): pad dilation·(k−1) in total, the extra one on the right
                total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
                inp = F.pad(inp, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
                padding = (0, 0)
        a = F.unfold(inp, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
        a = a.transpose(1, 2)
    else:
        a = inp.reshape(n, -1, mod.in_features)
    parts = [a] if layer.weight else []
    if layer.bias:
        parts.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
    return torch.cat(parts, dim=-1)


def _layer_outputs(layer: KroneckerLayer, out: Tensor) -> Tensor:
    """Layer outputs (or gradients w.r.t. them) as (n, T, d_out)."""
    if isinstance(layer.module, nn.Conv2d):
        return out.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0], -1, layer.d_out)


def layer_forward(model: FunctionalModel, layers: list[KroneckerLayer], params: Params, xb: Tensor):
    """Logits (n, C), layer inputs [(n, T, d_in)] and raw layer outputs (kept in the autograd graph)."""
    records: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(layer):
        def hook(module, inputs, output):
            if layer.name in records:
                raise ConfigError(f"layer {layer.name!r} is called more than once per forward pass; KFAC needs each layer used once")
            records[layer.name] = (inputs[0].detach(), output)

        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            logits = model(p, xb)
    finally:
        for h in handles:
            h.remove()
    unused = [layer.name for layer in layers if layer.name not in records]
    if unused:
        raise ConfigError(f"layers {unused} were not called in the forward pass; exclude their parameters with trainable=")
    inputs = [_layer_inputs(layer, records[layer.name][0]) for layer in layers]
    outputs = [records[layer.name][1] for layer in layers]
    return logits, inputs, outputs


def backward_directions(model: FunctionalModel, matrix: str, logits: Tensor, yb: Tensor) -> list[Tensor]:
    """Output-space cotangents (n, C) whose backpropagation gives K's factors: the C columns of
    L_i (L_i L_iᵀ = Λ_i) for the GGN, or ∂l_i/∂f_i for the empirical Fisher."""
    logits = logits.detach()
    if matrix == "ef":
        return [loss_output_grad(logits, yb, model.likelihood)]
    L = output_hessian_sqrt(logits, model.likelihood)
    return [L[:, :, c].contiguous() for c in range(L.shape[-1])]


def output_grads(layers, logits: Tensor, outputs: list[Tensor], cotangent: Tensor, retain: bool = True) -> list[Tensor]:
    """Backpropagate `cotangent` (n, C) from the logits to each layer output: [(n, T, d_out)]."""
    grads = torch.autograd.grad(logits, outputs, grad_outputs=cotangent, retain_graph=retain, allow_unused=True)
    return [
        _layer_outputs(layer, g) if g is not None else torch.zeros_like(_layer_outputs(layer, o))
        for layer, g, o in zip(layers, grads, outputs)
    ]


def layer_backward_passes(
    model: FunctionalModel, layers: list[KroneckerLayer], matrix: str, params: Params, x: Tensor, y: Tensor, chunk_size: int
) -> Iterator[tuple[list[Tensor], Iterator[list[Tensor]]]]:
    """The pass over the data behind every Kronecker factor: for each chunk of (x, y), its layer
    inputs [(n, T, d_in)] and an iterator that gives, for each backward direction u of
    `backward_directions` in turn, the layer output gradients [(n, T, d_out)] backpropagated from u.
    Consume the directions before advancing to the next chunk (the graph is freed after the last)."""
    for xb, yb in data_chunks(x, y, chunk_size, params):
        logits, inputs, outputs = layer_forward(model, layers, params, xb)
        directions = backward_directions(model, matrix, logits, yb)
        last = len(directions) - 1
        yield inputs, (output_grads(layers, logits, outputs, u, retain=c < last) for c, u in enumerate(directions))


def layer_grid(layer: KroneckerLayer, flat: Tensor) -> Tensor:
    """The (d_out, d_in) grid [W | b] of one layer from a flat (P,) vector."""
    return flat[layer.flat_indices()].reshape(layer.d_out, layer.d_in)


def layer_diagonal(model: FunctionalModel, matrix: str, params: Params, x: Tensor, y: Tensor, chunk_size: int) -> Tensor:
    """Exact diag of the GGN or EF (summed loss), flat (P,), from layer inputs and backpropagated
    output gradients: the per-example gradient of [W | b] along a direction u is Σ_t g_t a_tᵀ, so
    diag = Σ_{i,u} (Σ_t g_itu ⊙ a_it)² (for T = 1: Σ_{i,u} g_iu² a_iu²ᵀ, no per-example gradients)."""
    layers = find_layers(model)
    first = next(iter(params.values()))
    grids = [torch.zeros(layer.d_out, layer.d_in, dtype=first.dtype, device=first.device) for layer in layers]
    for inputs, per_direction in layer_backward_passes(model, layers, matrix, params, x, y, chunk_size):
        for grads in per_direction:
            for l, (g, a) in enumerate(zip(grads, inputs)):
                if a.shape[1] == 1:
                    grids[l] += g[:, 0].pow(2).T @ a[:, 0].pow(2)
                else:
                    grids[l] += torch.einsum("nto,ntd->nod", g, a).pow(2).sum(0)
    out = torch.zeros(model.n_params, dtype=first.dtype, device=first.device)
    for layer, grid in zip(layers, grids):
        out[layer.flat_indices()] = grid.reshape(-1)
    return out


def layer_quadratic_form(
    model: FunctionalModel,
    layers: list[KroneckerLayer],
    params: Params,
    x: Tensor,
    bases: list[tuple[Tensor | None, Tensor | None]],
    weights: list[Tensor],
    chunk_size: int = 256,
) -> Tensor:
    """Σ_layers J_i Σ_l J_iᵀ, shape (n, C, C), for a block-diagonal Σ whose layer block is
    (Q_G ⊗ Q_A) diag(vec W) (Q_G ⊗ Q_A)ᵀ (Q = None means the identity: a diagonal Σ).

    The Jacobian of f_i w.r.t. a layer is J_i = Σ_t B_it ⊗ a_itᵀ (B_it = ∂f_i/∂s_it, C x d_out,
    from C backward passes of the batch). With B̃ = B Q_G and ã = a Q_A:
    T = 1: V_i = B̃_i diag(w_i) B̃_iᵀ with w_ij = Σ_k ã_ik² W_jk;
    T > 1: V_i,cd = Σ_jk M_cjk M_djk W_jk with M = Σ_t B̃_t ⊗ ã_t.
    """
    out = []
    for xb, _ in data_chunks(x, None, chunk_size, params):
        logits, inputs, outputs = layer_forward(model, layers, params, xb)
        n, C = logits.shape
        eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
        per_class = [output_grads(layers, logits, outputs, eye[c].expand(n, C), retain=c < C - 1) for c in range(C)]
        V = torch.zeros(n, C, C, dtype=logits.dtype, device=logits.device)
        for l, (a, (Q_a, Q_g), W) in enumerate(zip(inputs, bases, weights)):
            B = torch.stack([per_class[c][l] for c in range(C)], dim=1)  # (n, C, T, d_out)
            if Q_g is not None:
                B = B @ Q_g
            if Q_a is not None:
                a = a @ Q_a
            if a.shape[1] == 1:
                w = a[:, 0].pow(2) @ W.T  # (n, d_out)
                Bt = B[:, :, 0]
                V += torch.einsum("ncj,nj,ndj->ncd", Bt, w, Bt)
            else:
                M = torch.einsum("nctj,ntk->ncjk", B, a)
                V += torch.einsum("ncjk,jk,ndjk->ncd", M, W, M)
        out.append(V.detach())
    return torch.cat(out)


class KroneckerCurvature(DataOperator, Curvature):
    """KFAC (eigen_corrected=False) or EK-FAC (True) approximation of the GGN or empirical Fisher
    of the summed loss (reduction="mean": divided by N); see the module docstring.

    Attributes (per layer, in `layers` order): `factors` [(A, G)], `eigenbases` [(Q_A, λ_A, Q_G, λ_G)],
    `eigenvalue_grids` [S (d_out, d_in)].
    """

    def __init__(
        self,
        model: FunctionalModel,
        x: Tensor,
        y: Tensor,
        matrix: str = "ggn",
        params: Params | None = None,
        reduction: str = "sum",
        chunk_size: int = 256,
        eigen_corrected: bool = False,
    ) -> None:
        if matrix not in ("ggn", "ef"):
            raise ConfigError(f"KFAC/EK-FAC approximate matrix 'ggn' or 'ef', received {matrix!r}")
        self._bind_data(model, x, y, matrix, ("ggn", "ef"), params, reduction, chunk_size)
        self.structure = "ekfac" if eigen_corrected else "kfac"
        self.layers = find_layers(model)
        self.factors = self._fit_factors()
        self.eigenbases = []
        self.eigenvalue_grids = []
        for A, G in self.factors:
            lam_a, Q_a = torch.linalg.eigh(A)
            lam_g, Q_g = torch.linalg.eigh(G)
            lam_a, lam_g = lam_a.clamp_min(0), lam_g.clamp_min(0)  # PSD factors; drop round-off
            self.eigenbases.append((Q_a, lam_a, Q_g, lam_g))
            self.eigenvalue_grids.append(torch.outer(lam_g, lam_a))
        if eigen_corrected:
            self.eigenvalue_grids = self._fit_eigenvalues()

    # --- passes over the data -----------------------------------------------------------------
    def _backward_passes(self):
        return layer_backward_passes(self.model, self.layers, self.matrix, self.params, self.x, self.y, self.chunk_size)

    def _fit_factors(self):
        A = [torch.zeros(layer.d_in, layer.d_in, dtype=self.dtype, device=self.device) for layer in self.layers]
        G = [torch.zeros(layer.d_out, layer.d_out, dtype=self.dtype, device=self.device) for layer in self.layers]
        count = [0] * len(self.layers)
        for inputs, per_direction in self._backward_passes():
            for l, a in enumerate(inputs):
                A[l] += torch.einsum("ntd,nte->de", a, a)
                count[l] += a.shape[0] * a.shape[1]
            for grads in per_direction:
                for l, g in enumerate(grads):
                    G[l] += torch.einsum("nto,ntp->op", g, g)
        return [(a / n, g * self.scale) for a, g, n in zip(A, G, count)]

    def _fit_eigenvalues(self):
        S = [torch.zeros(layer.d_out, layer.d_in, dtype=self.dtype, device=self.device) for layer in self.layers]
        for inputs, per_direction in self._backward_passes():
            rotated_inputs = [a @ Q_a for a, (Q_a, _, _, _) in zip(inputs, self.eigenbases)]
            for grads in per_direction:
                for l, (g, a_rot) in enumerate(zip(grads, rotated_inputs)):
                    g_rot = g @ self.eigenbases[l][2]
                    if g_rot.shape[1] == 1:
                        S[l] += torch.einsum("nj,nk->jk", g_rot[:, 0].pow(2), a_rot[:, 0].pow(2))
                    else:
                        S[l] += torch.einsum("ntj,ntk->njk", g_rot, a_rot).pow(2).sum(0)
        return [s * self.scale for s in S]

    # --- flat <-> per-layer matrices ----------------------------------------------------------
    def _layer_block(self, V: Tensor, layer: KroneckerLayer) -> Tensor:
        """(P, m) -> (m, d_out, d_in) for one layer."""
        m = V.shape[1]
        parts = []
        if layer.weight:
            parts.append(V[layer.weight_slice].T.reshape(m, layer.d_out, -1))
        if layer.bias:
            parts.append(V[layer.bias_slice].T.reshape(m, layer.d_out, 1))
        return torch.cat(parts, dim=-1)

    def _scatter(self, out: Tensor, layer: KroneckerLayer, M: Tensor) -> None:
        m = M.shape[0]
        if layer.weight:
            out[layer.weight_slice] = M[:, :, : layer.d_weight].reshape(m, -1).T
        if layer.bias:
            out[layer.bias_slice] = M[:, :, -1].T

    def _apply(self, v: Tensor, transform) -> Tensor:
        """Q_G (transform(S) ⊙ (Q_Gᵀ M Q_A)) Q_Aᵀ per layer."""
        V, was_vector = as_matrix(v, self.n_params)
        out = torch.zeros_like(V)
        for layer, (Q_a, _, Q_g, _), S in zip(self.layers, self.eigenbases, self.eigenvalue_grids):
            M = self._layer_block(V, layer)
            M = Q_g @ ((Q_g.T @ M @ Q_a) * transform(S)) @ Q_a.T
            self._scatter(out, layer, M)
        return out[:, 0] if was_vector else out

    def _shift(self, damping):
        check_damping(damping, strictly_positive=False, what=f"{self.structure} inverse")
        damping = float(damping)
        if damping == 0 and any(bool((S <= 0).any()) for S in self.eigenvalue_grids):
            raise ConfigError(f"{self.structure} is singular; inverse needs damping > 0, received 0")
        return damping

    # --- Curvature interface ------------------------------------------------------------------
    def mv(self, v):
        return self._apply(v, lambda S: S)

    def inverse_mv(self, v, damping):
        d = self._shift(damping)
        return self._apply(v, lambda S: 1.0 / (S + d))

    def inverse_sqrt_mv(self, v, damping):
        d = self._shift(damping)
        return self._apply(v, lambda S: (S + d).rsqrt())

    def diag(self):
        out = torch.zeros(self.n_params, 1, dtype=self.dtype, device=self.device)
        for layer, (Q_a, _, Q_g, _), S in zip(self.layers, self.eigenbases, self.eigenvalue_grids):
            self._scatter(out, layer, (Q_g.pow(2) @ S @ Q_a.pow(2).T).unsqueeze(0))
        return out[:, 0]

    def inverse_diag(self, damping, block: int = 256):
        d = self._shift(damping)
        out = torch.zeros(self.n_params, 1, dtype=self.dtype, device=self.device)
        for layer, (Q_a, _, Q_g, _), S in zip(self.layers, self.eigenbases, self.eigenvalue_grids):
            self._scatter(out, layer, (Q_g.pow(2) @ (1.0 / (S + d)) @ Q_a.pow(2).T).unsqueeze(0))
        return out[:, 0]

    def trace(self):
        return float(sum(S.sum() for S in self.eigenvalue_grids))

    def eigenvalues(self):
        return torch.sort(torch.cat([S.reshape(-1) for S in self.eigenvalue_grids]), descending=True).values

    def log_det(self, damping):
        d = self._shift(damping)
        return float(sum(torch.log(S.double() + d).sum() for S in self.eigenvalue_grids))

    def eigen(self, k):
        k = self._check_k(k)
        flat = torch.cat([S.reshape(-1) for S in self.eigenvalue_grids])
        owner = torch.cat([torch.full((S.numel(),), l) for l, S in enumerate(self.eigenvalue_grids)])
        local = torch.cat([torch.arange(S.numel()) for S in self.eigenvalue_grids])
        values, idx = torch.sort(flat, descending=True)
        values, idx = values[:k], idx[:k]
        vectors = torch.zeros(self.n_params, k, dtype=self.dtype, device=self.device)
        for l, layer in enumerate(self.layers):
            cols = torch.nonzero(owner[idx] == l).reshape(-1)
            if cols.numel() == 0:
                continue
            j, kk = local[idx[cols]] // layer.d_in, local[idx[cols]] % layer.d_in
            Q_a, _, Q_g, _ = self.eigenbases[l]
            M = Q_g[:, j].T.unsqueeze(2) * Q_a[:, kk].T.unsqueeze(1)  # (m, d_out, d_in)
            block = torch.zeros(self.n_params, cols.numel(), dtype=self.dtype, device=self.device)
            self._scatter(block, layer, M)
            vectors[:, cols] = block
        return EigenDecomposition(values, vectors)

    def jacobian_quadratic_form(self, model, params, x, damping, chunk_size: int = 256):
        """J_i (K + δI)^{-1} J_iᵀ (n, C, C) from the Kronecker structure, without per-example
        Jacobians (see `layer_quadratic_form`, with the eigenbases and W = 1/(S + δ))."""
        if model is not self.model:
            raise ConfigError("jacobian_quadratic_form of a KFAC operator needs the model it was built on")
        d = self._shift(damping)
        bases = [(Q_a, Q_g) for Q_a, _, Q_g, _ in self.eigenbases]
        weights = [1.0 / (S + d) for S in self.eigenvalue_grids]
        return layer_quadratic_form(model, self.layers, params, x, bases, weights, chunk_size)
