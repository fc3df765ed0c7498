"""`trak`: TRAK (Park et al. 2023) with a sparse random projection in pure PyTorch and an ensemble of the
fitted model and independently trained models from the retraining engine (`modelsense.training.train_ensemble`).

For each model θ_m (m = 1..M) and example z = (x, y) with margin f(z) = f_y(x) − logsumexp_{c≠y} f_c(x)
(the TRAK model output for classification; l = −log σ(f), so ∇l = −(1 − p_y)∇f exactly):

    φ_i = S_m ∇_θ f(z_i; θ_m) ∈ R^d      (projected margin gradient, own seed per model)
    ψ_z = S_m ∇_θ l(z; θ_m) = −(1 − p_y(z)) φ_z      (projected loss gradient)
    K_m = Φ_mᵀ Φ_m + λ_m I                (the projected Gauss-Newton kernel over the N training examples)
    score(i, j) = (1/M) Σ_m ψ_iᵀ K_m⁻¹ ψ_j

which is TRAK's estimate Q_i φ_iᵀ K⁻¹ φ_j (Q_i = 1 − p_i) expressed as a change of the test *loss*
(TRAK's test output is the margin; the two differ by the factor (1 − p_j) per test column) and
averaged over models (TRAK averages before sparsifying; no soft-thresholding here).
λ_m = damping · tr(Φ_mᵀΦ_m)/d (damping_mode relative) or damping (absolute).

The projection S_m (`SparseSketch`) is a sparse Johnson-Lindenstrauss transform: each column holds
`nnz` entries ±1/√nnz. Like TRAK's dense Gaussian (or Rademacher) projection it keeps inner products
unbiased (E[SᵀS] = I) with at most the Gaussian's variance, but projecting a gradient costs nnz·P
instead of d·P multiply-adds: with d = 512 the dense projection of the ten models' per-example
gradients was 80% of the method's time on digits. For networks of nn.Linear layers the per-example
margin gradients come from one batched forward and backward pass (`attribution.factored`) as the outer
products δ_i a_iᵀ, written straight in the (P, n) layout the sparse product reads.
The projected training gradients are computed once in `fit` (for K) and kept for the scores: in
memory when they fit in a quarter of the memory budget, else in a temporary memory-mapped file under
`scratch_dir` (`ComputeOptions.spill`, `scratch_buffer`); recomputed at scoring only without spill,
without disk room, or after `load` (a saved state keeps K⁻¹, not ψ).

Defaults by measurement (digits, MLP 64-128-128-10, LDS over 100 half-data retrainings; dense Gaussian
projection): one model d = 1024: damping 1e-5 → 0.10, 1e-3 → 0.16, 0.1 → 0.38; ten models:
(d 1024, 0.1) → 0.50, (512, 0.1) → 0.52, (512, 0.3) → 0.544, (512, 1.0) → 0.533, (256, 0.3) → 0.524;
twenty models (512, 0.3) → 0.562. The ridge matters more than d; TRAK's own tiny ridge is too small here.
With the sparse projection at the defaults (ten models, d 512, damping 0.3): LDS 0.5355 against 0.5353
with the dense Gaussian one, in 2.4 CPU seconds instead of 16.4 (1 thread), 2.8x the time of `if-ekfac`
in the same run instead of 19x (`bench/influence.py --threads 1 --repeats 3`, medians). With the fitted
model as one of the ten (nine trained) and contiguous columns for the sparse product: 1.47 s, 2.55x
`if-ekfac`, LDS 0.536 (same benchmark); the nine trainings are about two thirds of that time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from modelsense.attribution.base import (
    ComputeOptions,
    FeatureAttributor,
    check_choice,
    check_int,
    check_positive,
    flat_per_example_grads,
    param_dtype,
    read_rows,
    register,
    scratch_buffer,
    write_rows,
)
from modelsense.attribution.gradient import _check_projection
from modelsense.attribution.members import reinitialised_copy, train_members  # noqa: F401
from modelsense.core.functional import FunctionalModel, Params, chunks, map_inputs, take_rows
from modelsense.errors import ConfigError


class SparseSketch:
    """x ↦ x Sᵀ for a sparse random S ∈ R^{d×P} (the block sparse JL transform of Kane & Nelson 2014): the d
    rows are split into `nnz` blocks and column p holds one entry ±1/√nnz in each block, at a row and with
    a sign drawn uniformly from `seed`. Every block is a count sketch, so E[SᵀS] = I and
    Var[(Sx)ᵀ(Sy)] = (||x||²||y||² + (xᵀy)² − 2 Σ_p x_p² y_p²) / d, at most a Gaussian N(0, 1/d) sketch's.
    S is kept as one sparse CSR matrix per parameter of `slices` (name -> columns of the flat vector).
    """

    def __init__(self, slices: dict[str, slice], dim: int, seed: int = 0, nnz: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if not 1 <= nnz <= dim:
            raise ConfigError(f"a sparse sketch needs 1 <= nnz <= d = {dim}, received nnz={nnz}")
        self.slices, self.dim, self.seed, self.nnz = dict(slices), int(dim), int(seed), int(nnz)
        self.n_params = max((s.stop for s in self.slices.values()), default=0)
        self.dtype, self.device = dtype, torch.device(device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
        edges = [self.dim * b // self.nnz for b in range(self.nnz + 1)]
        rows = torch.stack([torch.randint(lo, hi, (self.n_params,), generator=gen) for lo, hi in zip(edges, edges[1:])],
                           1)
        signs = (torch.randint(0, 2, (self.n_params, self.nnz), generator=gen) * 2 - 1) / math.sqrt(self.nnz)
        self.mats = {}
        for name, cols in self.slices.items():
            n = cols.stop - cols.start
            index = torch.stack([rows[cols].reshape(-1), torch.arange(n).repeat_interleave(self.nnz)])
            coo = torch.sparse_coo_tensor(index, signs[cols].reshape(-1).to(torch.float64), (self.dim, n),
                                          check_invariants=True)
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                self.mats[name] = coo.coalesce().to(self.device, self.dtype).to_sparse_csr()

    def project_columns(self, columns: dict[str, Tensor]) -> Tensor:
        """Σ_name S_name X_name for X_name (numel, n) the gradients of parameter `name` as columns: (d, n)."""
        out = None
        for name, x in columns.items():
            term = self.mats[name].to(x.dtype) @ x
            out = term if out is None else out + term
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """(n, P) -> (n, d)."""
        if x.shape[-1] != self.n_params:
            raise ConfigError(f"projector expects vectors of length {self.n_params}, received {x.shape[-1]}")
        xt = x.T.contiguous()
        return self.project_columns({name: xt[cols] for name, cols in self.slices.items()}).T

    def matrix(self) -> Tensor:
        """S as a dense (d, P) tensor (tests and small problems)."""
        out = torch.zeros(self.dim, self.n_params, dtype=self.dtype, device=self.device)
        for name, cols in self.slices.items():
            out[:, cols] = self.mats[name].to_dense()
        return out

    def head(self, cols: int = 8) -> Tensor:
        """The first `cols` columns of S, (d, cols): a saved state keeps them to check that the S drawn
        again from the seed at load is the same."""
        return self.matrix()[:, : min(int(cols), self.n_params)].clone()


def _margins(model: FunctionalModel, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Margins f_y − logsumexp_{c≠y} f_c of a batch, (n,)."""
    logits = model(params, x)
    is_label = torch.nn.functional.one_hot(y, logits.shape[-1]).bool()
    others = logits.masked_fill(is_label, float("-inf"))
    return (logits * is_label).sum(-1) - torch.logsumexp(others, dim=-1)


def margin_grads(
    model: FunctionalModel, params: Params, x: Tensor, y: Tensor, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Flat per-example gradients of the margin f_y − logsumexp_{c≠y} f_c, (n, P), and p_y, (n,)."""

    def margin(p: Params, xi: Tensor, yi: Tensor):
        logits = model(p, map_inputs(lambda t: t.unsqueeze(0), xi))[0]
        is_label = torch.arange(logits.shape[-1], device=logits.device) == yi
        others = logits.masked_fill(is_label, float("-inf"))
        m = (logits * is_label).sum() - torch.logsumexp(others, dim=-1)
        return m, torch.sigmoid(m).detach()

    return flat_per_example_grads(model, margin, params, x, y, chunk_size, has_aux=True)


def _ridge_inverse(K: Tensor, lam: float) -> Tensor:
    """(K + λI)⁻¹ for a symmetric PSD K (float64): Cholesky when λ > 0, else a pseudo-inverse
    through numpy's eigh (torch's float64 eigh is very slow on some CPU builds)."""
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    if lam > 0:
        L, info = torch.linalg.cholesky_ex(K + lam * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
    import numpy as np

    evals, Q = np.linalg.eigh(K.cpu().numpy())
    floor = max(lam, 1e-12 * max(float(evals.max()), 1e-300))
    inv = (Q / (np.clip(evals, 0, None) + floor)) @ Q.T
    return torch.from_numpy(inv).to(K.device)


#: nonzeros per column of TRAK's sparse projection (`SparseSketch`)
SKETCH_NNZ = 1


@register("trak")
class Trak(FeatureAttributor):
    """Settings:
        n_models M: models in the ensemble (those trained from scratch are trained at once by the engine).
        proj_dim d: projection dimension.
        damping, damping_mode: ridge λ of the kernel (relative: multiple of tr(ΦᵀΦ)/d).
        train_config: `TrainConfig` of the ensemble (default: TrainConfig()); use the trained model's.
        model_fn: seed -> fresh module (default: the fitted module re-initialised with `reset_parameters`).
        subset_ratio: each model trains on a random subset of this fraction (1: all examples).
        include_fitted: the fitted model is one of the M members and M − 1 are trained (the default, as
            the `if-*` ensembles; it was trained by the same recipe); False: M models are trained.
    """

    def streams(self) -> bool:
        """Reads the training data in batches by position, unless models are trained from scratch on it
        (any member but the fitted model: the engine takes tensors)."""
        return self.include_fitted and self.n_models == 1

    needs = frozenset({"recipe"})
    state_attributes = ("members_", "kernel_inverses_", "damping_")

    def __init__(self, n_models: int = 10, proj_dim: int = 512, damping: float = 0.3, damping_mode: str = "relative",
                 train_config=None, model_fn: Callable[[int], nn.Module] | None = None, subset_ratio: float = 1.0,
                 include_fitted: bool = True, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.n_models = check_int("n_models", n_models)
        self.proj_dim = check_int("proj_dim", proj_dim)
        self.damping = check_positive("damping", damping, allow_zero=True)
        self.damping_mode = check_choice("damping_mode", damping_mode, ("absolute", "relative"))
        self.train_config, self.model_fn = train_config, model_fn
        self.subset_ratio = check_positive("subset_ratio", subset_ratio)
        if self.subset_ratio > 1:
            raise ConfigError(f"subset_ratio must lie in (0, 1], received {subset_ratio}")
        self.include_fitted = bool(include_fitted)

    def _fit(self) -> None:
        if self.model_.likelihood != "categorical" or self.loss != "cross_entropy":
            raise ConfigError(
                "trak uses the classification margin; it needs a categorical model with loss='cross_entropy'"
            )
        members = [self.params_] if self.include_fitted else []
        n_new = self.n_models - len(members)
        if n_new > 0:
            members += self._train_members(n_new)
        self.members_ = members
        self._setup_projections()
        dtype, device = param_dtype(self.params_), next(iter(self.params_.values())).device
        n, d = self.n_train, self.proj_dim
        share = self.compute.memory_budget // (4 * len(members))
        self.kernel_inverses_, self.damping_ = [], []
        self.train_projections_ = []  # ψ of the training examples per model (None: recomputed at scoring)
        for m in range(len(members)):
            K = torch.zeros(d, d, dtype=torch.float64, device=device)
            psi = scratch_buffer((n, d), dtype, share, self.compute.scratch_dir, prefix=f"projections_{self.name}",
                                 device=device, disk=self.compute.spill is not False)
            for rows in chunks(n, self.compute.block_size):
                phi, p = self._projections(m, self.x_train_[rows], self.y_train_[rows])
                K += (phi.T @ phi).double()  # each block's Gram in the features' precision, summed in float64
                if psi is not None:
                    write_rows(psi, rows, [-(1 - p).unsqueeze(1) * phi])
            lam = self.damping * float(torch.trace(K)) / d if self.damping_mode == "relative" else self.damping
            self.kernel_inverses_.append(_ridge_inverse(K, lam).to(dtype))
            self.damping_.append(lam)
            self.train_projections_.append(psi)

    def _setup_projections(self) -> None:
        """One sketch per model; the Linear layers of the factored gradient path (None: per-example gradients)."""
        from modelsense.attribution.factored import linear_factors, linear_layers

        p = self.params_
        self.projectors_ = [SparseSketch(self.model_.spec.slices, self.proj_dim, self.seed + 31 * m, SKETCH_NNZ,
                                         param_dtype(p), next(iter(p.values())).device)
                            for m in range(len(self.members_))]
        layers = linear_layers(self.model_)
        if layers is not None and linear_factors(self.model_, layers, p, self.x_train_[:1], self.y_train_[:1], 1,
                                                 objective=self._margin_fn) is None:
            layers = None
        names = {id(mod): name for name, mod in self.model_.module.named_modules()}
        self.layers_ = None if layers is None else [(layer, f"{names[id(layer.module)]}.".lstrip("."))
                                                    for layer in layers]

    def _margin_fn(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return _margins(self.model_, params, x, y)

    def _projections(self, m: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(φ (n, d), p_y (n,)) of model m on (x, y), in chunks of `chunk_size_` examples."""
        from modelsense.attribution.factored import linear_factors

        params, sketch = self.members_[m], self.projectors_[m]
        phis, probs = [], []
        for s in chunks(len(y), self.chunk_size_):
            xs, ys = take_rows(x, s), y[s]
            f = None
            if self.layers_ is not None:
                f = linear_factors(self.model_, [layer for layer, _ in self.layers_], params, xs, ys,
                                   self.chunk_size_, objective=self._margin_fn)
            if f is None:  # per-example gradients
                g, p = margin_grads(self.model_, params, xs, ys, self.chunk_size_)
                phis.append(sketch(g))
                probs.append(p)
                continue
            # ∂f_i/∂W = δ_i a_iᵀ and ∂f_i/∂b = δ_i as columns (numel, c), c examples at a time: the outer
            # products of a few MB stay in cache for the sparse product (10x faster than one pass of all rows)
            c = max(8, (4 << 20) // (self.model_.n_params * f.grads[0].element_size()))
            for r in chunks(len(ys), c):
                cols = {}
                for (layer, prefix), a, delta in zip(self.layers_, f.inputs, f.grads):
                    # contiguous factors give contiguous columns: the sparse product reads them 3.5x faster
                    dt = delta[r].T.contiguous()
                    if layer.weight:
                        cols[prefix + "weight"] = (dt.unsqueeze(1) * a[r].T.contiguous().unsqueeze(0)).reshape(
                            -1, dt.shape[1])
                    if layer.bias:
                        cols[prefix + "bias"] = dt
                phis.append(sketch.project_columns(cols).T)
            probs.append(torch.sigmoid(f.values))
        return torch.cat(phis), torch.cat(probs)

    def _get_state(self):
        state = {**super()._get_state(), "projection_heads": [p.head() for p in self.projectors_]}
        return state

    def _set_state(self, state) -> None:
        heads = state.pop("projection_heads")
        super()._set_state(state)
        self._setup_projections()
        self.train_projections_ = [None] * len(self.members_)
        for proj, head in zip(self.projectors_, heads):
            _check_projection(proj, head, self.name)

    def _train_members(self, n_new: int) -> list[Params]:
        return train_members(self.model_, self.params_, self.x_train_, self.y_train_, n_new, self.train_config,
                             self.model_fn, self.subset_ratio, self.seed, self.compute.progress)

    def _loss_projections(self, m: int, x: Tensor, y: Tensor) -> Tensor:
        phi, p = self._projections(m, x, y)
        return -(1 - p).unsqueeze(1) * phi

    def _holds_train_features(self) -> bool:
        return all(psi is not None for psi in self.train_projections_)

    def _train_component(self, rows: slice, c: int) -> Tensor:
        psi = self.train_projections_[c]
        if psi is not None:
            return read_rows(psi, rows, self.kernel_inverses_[c].device)
        return self._loss_projections(c, self.x_train_[rows], self.y_train_[rows])

    def _test_component(self, x: Tensor, y: Tensor, c: int) -> Tensor:
        return self._loss_projections(c, x, y) @ (self.kernel_inverses_[c] / len(self.members_))

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._train_component(rows, m) for m in range(len(self.members_))]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """K_m⁻¹ ψ_j / M (the ensemble mean's 1/M on the test side)."""
        M = len(self.members_)
        return [self._loss_projections(m, x, y) @ (Kinv / M) for m, Kinv in enumerate(self.kernel_inverses_)]
