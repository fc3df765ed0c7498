"""KFAC and EK-FAC (GGN or empirical Fisher) for Linear (any leading dims), Conv1d, Conv2d and
Embedding layers, with exact dense or diagonal blocks for every other parameter (the fallback).

Layers and fallback: see kfac_layers.py. For a Kronecker layer with (bias-augmented) inputs
a ∈ R^{d_in} and outputs s ∈ R^{d_out} at T positions per example (T = 1 for Linear on (n, d)
inputs; sequence tokens; Conv output locations; Embedding tokens with a = onehot(token)), the
per-example gradient of its grid W (d_out x d_in, bias as the last column) along an output-space
direction is Γ_i = Σ_t g_it a_itᵀ, with g_it the backpropagated vector at s_it. Loss summed over N:

    expand (default; Grosse & Martens 2016, Eschenhagen et al. 2023 "K-FAC-expand"):
        A = 1/(N T) Σ_{i,t} a_it a_itᵀ,          G = Σ_{i,t,u} g_itu g_ituᵀ
    reduce (Eschenhagen et al. 2023 "K-FAC-reduce"; `kfac_approx="reduce"`):
        A = 1/N Σ_i ā_i ā_iᵀ, ā_i = 1/T Σ_t a_it,   G = Σ_{i,u} (Σ_t g_itu)(Σ_t g_itu)ᵀ

    block ≈ G ⊗ A (scaled by 1/N for reduction "mean")

with u over the backward directions: the C columns of L_i (L_i L_iᵀ = Λ_i, exact GGN, no Monte
Carlo) for the GGN, ∂l_i/∂f_i for the EF. `mc_samples=k` > 0 replaces the C exact GGN directions by k
Monte-Carlo ones, ∂l(f_i, ŷ)/∂f_i / √k at targets ŷ drawn from the model's predictive p(y | f_i)
(kronfluence's default, "Fisher" there): an unbiased estimate of the same matrix at k instead of C
backward passes per example in each of the two passes of the fit (seeded by `seed`).

Embeddings always use expand: their A is then diagonal (token counts / (N T)) and is stored as a
vector, never as a vocabulary x vocabulary matrix. The two variants coincide when T = 1. Expand is
the default because it is what kronfluence and curvlinops use for sequences, and it keeps the Conv2d
factors of Grosse & Martens (KFC) unchanged.

Per-example gradients at scale (`example_gradients`): from the same hooks, one forward and one
backward pass per chunk, Γ_i = Σ_t g_it a_itᵀ per layer, optionally straight in the eigenbasis
(Q_Gᵀ Γ_i Q_A at the block's parameter positions); `if-kfac` / `if-ekfac` score with them.

Parameters are flattened row-major (W.reshape(d_out, -1), the layout of nn.Linear/Conv weights; an
Embedding's grid is its weightᵀ), so (G ⊗ A) vec(V) = vec(G V A). Where KFAC is exact (tested):
  - every layer for one example (N = 1) with T = 1 (both variants);
  - expand, any N: a network that is linear and acts position by position up to per-position
    outputs (flattened, gaussian likelihood), e.g. Linear layers on (n, T, d) sequences, an
    Embedding followed by Linear layers; and the last layer (feeding the outputs) under the gaussian
    likelihood, e.g. a Conv1d/Conv2d before Flatten: then g_itu does not depend on i or t;
  - reduce, N = 1, any likelihood: Linear layers acting position by position, linear up to a mean
    over positions (the classification setting of a ViT with mean pooling, without nonlinearity):
    then g_tu does not depend on t.
Fallback blocks are exact (dense) or the exact diagonal.

EK-FAC (George et al. 2018): keep the eigenbasis Q_G ⊗ Q_A of KFAC and replace its eigenvalues by
S_jk = Σ_{i,u} ((Q_Gᵀ Γ_iu Q_A)_jk)², the diagonal of the exact block in that basis (the
Frobenius-optimal choice in that basis), computed from the exact per-example Γ_iu whatever the variant.
For a fallback block KFAC and EK-FAC are the same (its eigenbasis diagonalises the exact block).

Every block is stored as (Q_G, Q_A, S): K_block = (Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ with
S = λ_G λ_Aᵀ for KFAC; Q_A = None for a diagonal A (embeddings, diagonal fallback blocks); a
fallback block is a (d_out = 1, d_in = p) grid with Q_G = [[1]].
Hand-written (not curvlinops' KFACLinearOperator): we need the eigen-factors for the Kronecker
predictive covariance and `FunctionalModel` parameter dicts with a `trainable` filter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelsense.core.functional import FunctionalModel, Params, n_rows
from modelsense.curvature._common import DataOperator, as_matrix, check_choice, check_damping
from modelsense.curvature.kfac_layers import (
    FALLBACKS,
    KFAC_APPROXIMATIONS,
    Block,
    FallbackBlock,
    KroneckerLayer,
    example_grids,
    fallback_jacobians,
    fallback_offsets,
    fallback_square_sums,
    hooked_norms,
    jacobian_blocks,
    layer_backward_passes,
    layer_quadratic_form,
    plan_blocks,
    position_gram,
    rotate_inputs_first,
    squared_example_grids,
)
from modelsense.curvature.lanczos import EigenDecomposition
from modelsense.curvature.operators import Curvature
from modelsense.errors import ConfigError


def check_mc_samples(mc_samples: int, matrix: str) -> None:
    """ConfigError unless mc_samples is an integer >= 0, and 0 unless matrix is the GGN."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
        raise ConfigError(f"mc_samples must be an integer >= 0 (0: the exact GGN), received {mc_samples!r}")
    if mc_samples and matrix != "ggn":
        raise ConfigError(f"mc_samples draws Monte-Carlo targets for the GGN (Fisher); matrix {matrix!r} takes "
                          "mc_samples=0")


class KroneckerCurvature(DataOperator, Curvature):
    """KFAC (eigen_corrected=False) or EK-FAC (True) approximation of the GGN or empirical Fisher
    of the summed loss (reduction="mean": divided by N); see the module docstring.

    Settings: kfac_approx expand | reduce; fallback auto | diag | error and max_dense_block (the
    blocks of parameters outside Kronecker layers, see kfac_layers.py).

    Attributes: `layers` (Kronecker layers), `fallbacks` (fallback blocks), `blocks` = layers +
    fallbacks; per block, in `blocks` order: `factors` [(A, G)] (A a vector when diagonal; a
    fallback block has A = its exact block or diagonal, G = [[1]]), `eigenbases` [(Q_A, λ_A, Q_G, λ_G)]
    (Q_A None when A is diagonal), `eigenvalue_grids` [S (d_out, d_in)]. `fitted_state()` /
    `from_fitted_state(...)` save and restore them without refitting.
    """

    fallbacks: list[FallbackBlock] = []  # noqa: RUF012 - read only; set per instance by the fit
    kfac_approx, fallback, max_dense_block, mc_samples, seed = "expand", "auto", 1024, 0, 0

    def __init__(
        self,
        model: FunctionalModel,
        x: Tensor,
        y: Tensor | None = None,
        matrix: str = "ggn",
        params: Params | None = None,
        reduction: str = "sum",
        chunk_size: int = 256,
        eigen_corrected: bool = False,
        kfac_approx: str = "expand",
        fallback: str = "auto",
        max_dense_block: int = 1024,
        mc_samples: int = 0,
        seed: int = 0,
    ) -> None:
        if matrix not in ("ggn", "ef"):
            raise ConfigError(f"KFAC/EK-FAC approximate matrix 'ggn' or 'ef', received {matrix!r}")
        check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        check_choice("fallback", fallback, FALLBACKS)
        check_mc_samples(mc_samples, matrix)
        self._bind_data(model, x, y, matrix, ("ggn", "ef"), params, reduction, chunk_size)
        self.structure = "ekfac" if eigen_corrected else "kfac"
        self.kfac_approx, self.fallback, self.max_dense_block = kfac_approx, fallback, int(max_dense_block)
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self.layers, self.fallbacks = plan_blocks(model, self.params, self.x, fallback, self.max_dense_block)
        self.factors = self._fit_factors()
        self.eigenbases = []
        self.eigenvalue_grids = []
        for A, G in self.factors:
            if A.ndim == 1:
                Q_a, lam_a = None, A.clamp_min(0)
            else:
                lam_a, Q_a = torch.linalg.eigh(A)
                lam_a = lam_a.clamp_min(0)  # PSD factors; drop round-off
            lam_g, Q_g = torch.linalg.eigh(G)
            lam_g = lam_g.clamp_min(0)
            self.eigenbases.append((Q_a, lam_a, Q_g, lam_g))
            self.eigenvalue_grids.append(torch.outer(lam_g, lam_a))
        if eigen_corrected and self.layers:
            self.eigenvalue_grids[: len(self.layers)] = self._fit_eigenvalues()

    @property
    def blocks(self) -> list[Block]:
        return [*self.layers, *self.fallbacks]

    @property
    def _indices(self) -> list[Tensor]:
        if getattr(self, "_index_cache", None) is None:
            self._index_cache = [b.flat_indices().to(self.device) for b in self.blocks]
        return self._index_cache

    # --- saved state --------------------------------------------------------------------------
    def fitted_state(self) -> dict:
        """What the fit produced, as nested dicts / lists of tensors, numbers, strings and None: the
        settings, the blocks [kind, name, d_out, d_in] and, per block, [A, G], [Q_A, λ_A, Q_G, λ_G], S."""
        return {"structure": self.structure, "matrix": self.matrix, "reduction": self.reduction,
                "kfac_approx": self.kfac_approx, "fallback": self.fallback, "max_dense_block": self.max_dense_block,
                "mc_samples": self.mc_samples, "seed": self.seed, "blocks": self._block_summary(),
                "factors": [list(f) for f in self.factors],
                "eigenbases": [list(e) for e in self.eigenbases], "eigenvalue_grids": list(self.eigenvalue_grids)}

    def _block_summary(self) -> list[list]:
        return [[row["kind"], row["name"], *row["shape"]] for row in self.describe()]

    @classmethod
    def from_fitted_state(cls, state: dict, model: FunctionalModel, x: Tensor, y: Tensor, params: Params | None = None,
                          chunk_size: int = 256) -> KroneckerCurvature:
        """The operator `fitted_state()` described, bound to `model`, its parameters and the data without
        refitting; the block plan is made again (one probe forward pass) and must be the saved one."""
        K = cls.__new__(cls)
        K._bind_data(model, x, y, state["matrix"], ("ggn", "ef"), params, state["reduction"], chunk_size)
        K.structure, K.kfac_approx = state["structure"], state["kfac_approx"]
        K.fallback, K.max_dense_block = state["fallback"], int(state["max_dense_block"])
        K.mc_samples, K.seed = int(state.get("mc_samples", 0)), int(state.get("seed", 0))
        K.layers, K.fallbacks = plan_blocks(model, K.params, x, K.fallback, K.max_dense_block)
        found = K._block_summary()
        if found != [list(b) for b in state["blocks"]]:
            raise ConfigError(f"the saved {K.structure} blocks are {state['blocks']}, the model's are {found}")
        K.factors = [tuple(f) for f in state["factors"]]
        K.eigenbases = [tuple(e) for e in state["eigenbases"]]
        K.eigenvalue_grids = list(state["eigenvalue_grids"])
        return K

    # --- passes over the data -----------------------------------------------------------------
    def _backward_passes(self, norms=()):
        return layer_backward_passes(self.model, self.layers, self.matrix, self.params, self.x, self.y,
                                     self.chunk_size, list(norms), self.mc_samples, self.seed)

    def _zeros(self, *shape):
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def _fit_factors(self):
        reduce = self.kfac_approx == "reduce"
        A = [self._zeros(l.d_in) if l.diagonal_input else self._zeros(l.d_in, l.d_in) for l in self.layers]
        G = [self._zeros(l.d_out, l.d_out) for l in self.layers]
        count = [0] * len(self.layers)
        fb = [self._zeros(b.d_in, b.d_in) if b.dense else self._zeros(b.d_in) for b in self.fallbacks]

        def add(k, R):
            fb[k] += R.T @ R if self.fallbacks[k].dense else R.pow(2).sum(0)

        for step in self._backward_passes(hooked_norms(self.fallbacks)):
            for l, (layer, a) in enumerate(zip(self.layers, step.inputs)):
                if layer.diagonal_input:  # token counts (padding left out)
                    A[l] += torch.bincount(a[a >= 0], minlength=layer.d_in).to(self.dtype)
                    count[l] += a.numel()
                elif reduce:
                    a_mean = a.mean(1)
                    A[l] += a_mean.T @ a_mean
                    count[l] += a.shape[0]
                else:
                    A[l] += position_gram(a)
                    count[l] += a.shape[0] * a.shape[1]
            rows = []
            for grads, r in step.per_direction:
                rows.append(r)
                for l, (layer, g) in enumerate(zip(self.layers, grads)):
                    if reduce and not layer.diagonal_input:
                        g_sum = g.sum(1)
                        G[l] += g_sum.T @ g_sum
                    else:
                        G[l] += position_gram(g)
            fallback_square_sums(self.fallbacks, step, rows, self.model, self.params, add)
        one = torch.ones(1, 1, dtype=self.dtype, device=self.device)
        return [(a / n, g * self.scale) for a, g, n in zip(A, G, count)] + [(f * self.scale, one) for f in fb]

    def _rotated_inputs(self, inputs: list[Tensor], directions: int) -> list[tuple[Tensor, Tensor | None]]:
        """Per layer (a, Q_A still to apply after the sum over positions, or None): a @ Q_A now where that
        is the cheaper order for `directions` backward directions (`rotate_inputs_first`)."""
        out = []
        for layer, a, (Q_a, _, _, _) in zip(self.layers, inputs, self.eigenbases):
            if Q_a is not None and rotate_inputs_first(layer, a.shape[1], directions):
                out.append((a @ Q_a, None))
            else:
                out.append((a, Q_a))
        return out

    def _fit_eigenvalues(self):
        S = [self._zeros(l.d_out, l.d_in) for l in self.layers]
        for step in self._backward_passes():
            rotated = self._rotated_inputs(step.inputs, len(step.directions))
            for grads, _ in step.per_direction:
                for l, (layer, g, (a, Q_a)) in enumerate(zip(self.layers, grads, rotated)):
                    S[l] += squared_example_grids(layer, g, a, self.eigenbases[l][2], Q_a)
        return [s * self.scale for s in S]

    # --- per-example gradients through the layer hooks ------------------------------------------
    def example_gradients(self, x, y: Tensor, eigenbasis: bool = True, chunk_size: int | None = None) -> Tensor:
        """Per-example loss gradients g_i = ∂l_i/∂θ at the operator's parameters, flat (n, P) in the
        order of `spec`; with `eigenbasis` in the coordinates of the eigenbasis instead, block by block:
        Q_Gᵀ Γ_i Q_A at the positions of the block's parameters (Γ_i its (d_out, d_in) gradient grid;
        Q_Aᵀ r_i for a fallback block), so that g_iᵀ K⁻¹ g_j = Σ (g̃_i ⊙ g̃_j) / vec(S) (`flat_eigenvalues`).

        One forward and one backward pass per chunk (hooks on the layers: Γ_i = Σ_t g_it a_itᵀ from the
        layer inputs a and the backpropagated ∂l_i/∂s_it, `example_grids`; hooked normalisation rows;
        per-example Jacobians for the other fallback parameters), instead of a vmapped gradient.
        Equal to `FunctionalModel.per_example_grads(flat=True)` up to rounding (tested)."""
        n = n_rows(x)
        out = torch.empty(n, self.n_params, dtype=self.dtype, device=self.device)  # every column is in one block
        chunk = self.chunk_size if chunk_size is None else int(chunk_size)
        norms = hooked_norms(self.fallbacks)
        jac = jacobian_blocks(self.fallbacks)
        start = 0
        for step in layer_backward_passes(self.model, self.layers, "ef", self.params, x, y, chunk, norms):
            m = n_rows(step.xb)
            rows = slice(start, start + m)
            start += m
            grads, hooked = next(step.per_direction)
            inputs = self._rotated_inputs(step.inputs, 1) if eigenbasis else [(a, None) for a in step.inputs]
            for l, (layer, g, (a, Q_a)) in enumerate(zip(self.layers, grads, inputs)):
                Q_g = self.eigenbases[l][2] if eigenbasis else None
                self._place(out, rows, l, example_grids(layer, g, a, Q_g, Q_a).reshape(m, -1))
            offset = len(self.layers)
            fallback_rows = {b.name: hooked[b.name].reshape(m, -1) for b in self.fallbacks if b.source is not None}
            if jac:
                u = step.directions[0]
                parts = {b.name: [] for b in jac}
                for s, J in fallback_jacobians(self.model, self.params, [b.name for b in jac], step.xb):
                    R = torch.einsum("nc,ncp->np", u[s], J)
                    for b, cols in zip(jac, fallback_offsets(jac)):
                        parts[b.name].append(R[:, cols])
                fallback_rows.update({k: torch.cat(v) for k, v in parts.items()})
            for k, b in enumerate(self.fallbacks):
                R = fallback_rows[b.name]
                Q_a = self.eigenbases[offset + k][0]
                self._place(out, rows, offset + k, R @ Q_a if eigenbasis and Q_a is not None else R)
        return out

    def flat_eigenvalues(self) -> Tensor:
        """vec(S) of every block at the positions of its parameters, flat (P,): K = Q diag(this) Qᵀ in the
        coordinates of `example_gradients(eigenbasis=True)` / `to_eigenbasis`."""
        out = self._zeros(1, self.n_params)
        for k, S in enumerate(self.eigenvalue_grids):
            self._place(out, slice(0, 1), k, S.reshape(1, -1))
        return out[0]

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        """Rows of V (n, P) in the coordinates of the eigenbasis (see `example_gradients`), (n, P)."""
        out = torch.zeros_like(V)
        for k, (Q_a, _, Q_g, _) in enumerate(self.eigenbases):
            M = Q_g.T @ self._grid(V.T, k)
            self._place(out, slice(0, len(V)), k, (M if Q_a is None else M @ Q_a).reshape(len(V), -1))
        return out

    def _place(self, out: Tensor, rows: slice, k: int, values: Tensor) -> None:
        """out[rows, positions of block k] = values (m, d_out·d_in), a slice where the positions are contiguous."""
        if getattr(self, "_column_cache", None) is None:
            self._column_cache = []
            for idx in self._indices:
                contiguous = len(idx) > 0 and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx),
                                                                        device=idx.device)).all())
                self._column_cache.append(slice(int(idx[0]), int(idx[0]) + len(idx)) if contiguous else idx)
        out[rows, self._column_cache[k]] = values

    # --- flat <-> per-block grids -------------------------------------------------------------
    def _grid(self, V: Tensor, k: int) -> Tensor:
        """(P, m) -> (m, d_out, d_in) for block k."""
        b = self.blocks[k]
        return V[self._indices[k]].T.reshape(V.shape[1], b.d_out, b.d_in)

    def _scatter(self, out: Tensor, k: int, M: Tensor) -> None:
        out[self._indices[k]] = M.reshape(M.shape[0], -1).T

    def _apply(self, v: Tensor, transform) -> Tensor:
        """Q_G (transform(S) ⊙ (Q_Gᵀ M Q_A)) Q_Aᵀ per block."""
        V, was_vector = as_matrix(v, self.n_params)
        out = torch.zeros_like(V)
        for k, ((Q_a, _, Q_g, _), S) in enumerate(zip(self.eigenbases, self.eigenvalue_grids)):
            M = Q_g.T @ self._grid(V, k)
            if Q_a is None:
                M = Q_g @ (M * transform(S))
            else:
                M = Q_g @ ((M @ Q_a) * transform(S)) @ Q_a.T
            self._scatter(out, k, M)
        return out[:, 0] if was_vector else out

    def _shift(self, damping):
        check_damping(damping, strictly_positive=False, what=f"{self.structure} inverse")
        damping = float(damping)
        if damping == 0 and any(bool((S <= 0).any()) for S in self.eigenvalue_grids):
            raise ConfigError(f"{self.structure} is singular; inverse needs damping > 0, received 0")
        return damping

    def _block_diagonals(self, transform) -> Tensor:
        out = self._zeros(self.n_params, 1)
        for k, ((Q_a, _, Q_g, _), S) in enumerate(zip(self.eigenbases, self.eigenvalue_grids)):
            grid = Q_g.pow(2) @ transform(S)
            self._scatter(out, k, (grid if Q_a is None else grid @ Q_a.pow(2).T).unsqueeze(0))
        return out[:, 0]

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
        return self._block_diagonals(lambda S: S)

    def inverse_diag(self, damping, block: int = 256):
        d = self._shift(damping)
        return self._block_diagonals(lambda S: 1.0 / (S + d))

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
        owner = torch.cat([torch.full((S.numel(),), b) for b, S in enumerate(self.eigenvalue_grids)]).to(flat.device)
        local = torch.cat([torch.arange(S.numel()) for S in self.eigenvalue_grids]).to(flat.device)
        values, idx = torch.sort(flat, descending=True)
        values, idx = values[:k], idx[:k]
        vectors = self._zeros(self.n_params, k)
        for b, block in enumerate(self.blocks):
            cols = torch.nonzero(owner[idx] == b).reshape(-1)
            if cols.numel() == 0:
                continue
            j, kk = local[idx[cols]] // block.d_in, local[idx[cols]] % block.d_in
            Q_a, _, Q_g, _ = self.eigenbases[b]
            left = Q_g[:, j].T.unsqueeze(2)  # (m, d_out, 1)
            if Q_a is None:
                right = torch.nn.functional.one_hot(kk, block.d_in).to(self.dtype).unsqueeze(1)
            else:
                right = Q_a[:, kk].T.unsqueeze(1)  # (m, 1, d_in)
            part = self._zeros(self.n_params, cols.numel())
            self._scatter(part, b, left * right)
            vectors[:, cols] = part
        return EigenDecomposition(values, vectors)

    def jacobian_quadratic_form(self, model, params, x, damping, chunk_size: int = 256):
        """J_i (K + δI)^{-1} J_iᵀ (n, C, C) from the block structure, without per-example Jacobians
        for the Kronecker layers (see `kfac_layers.layer_quadratic_form`, W = 1/(S + δ))."""
        if model is not self.model:
            raise ConfigError("jacobian_quadratic_form of a KFAC operator needs the model it was built on")
        d = self._shift(damping)
        bases = [(Q_a, Q_g) for Q_a, _, Q_g, _ in self.eigenbases]
        weights = [1.0 / (S + d) for S in self.eigenvalue_grids]
        return layer_quadratic_form(model, self.blocks, params, x, bases, weights, chunk_size)

    def describe(self) -> list[dict]:
        """One row per block: name, kind (linear | conv1d | conv2d | embedding | dense | diag),
        parameters, size (d_out, d_in) and, for fallback blocks, why the parameter is not in a layer
        and where its per-example rows come from (the hooks of a normalisation module, or Jacobians)."""
        rows = []
        for b in self.blocks:
            if isinstance(b, KroneckerLayer):
                rows.append({"name": b.name, "kind": b.kind, "params": list(b.params), "shape": (b.d_out, b.d_in)})
            else:
                assert isinstance(b, FallbackBlock)
                rows.append(
                    {
                        "name": b.name,
                        "kind": "dense" if b.dense else "diag",
                        "params": [b.name],
                        "shape": (1, b.d_in),
                        "reason": b.reason,
                        "rows": f"hooks on {b.source.name!r}" if b.source is not None else "per-example Jacobians",
                    }
                )
        return rows
