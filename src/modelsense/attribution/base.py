"""The `Attributor` interface shared by every influence estimator, and the block engine.

Convention (one for every method of this package)
-------------------------------------------------
A model θ* is trained on N examples by minimising the *summed* objective

    L(θ) = Σ_i l_i(θ) + (δ/2)·||θ||²        (the mean objective of `modelsense.training` times N)

with l_i the per-example loss (softmax cross-entropy by default). The score of training example
i on test example j is

    score(i, j) ≈ l_j(θ*_{-i}) − l_j(θ*)     (change of test loss j when example i is removed)

so **a positive score means that i helps j** (removing i would raise j's loss) and a negative score
that i hurts j. Influence functions make this exact to first order: θ*_{-i} − θ* ≈ H⁻¹ g_i with
H = ∇²L (sum reduction, the damping playing the role of δ), hence score(i, j) = g_jᵀ H⁻¹ g_i.
Every other method estimates the same quantity under its own approximation of H⁻¹ (identity for
`grad-dot`, a sketch for `randproj`, learning-rate weighted checkpoints for `tracin`, an ensemble
covariance for `gex` / `la-kfac`, the projected Gauss-Newton kernel for `trak`) and keeps this sign
and the sum reduction (no method divides by N or by a projection dimension where another sums).
Scales agree exactly inside the influence-function family (`if-*`, `arnoldi` at full rank); across
families only signs and rankings are comparable.

Per module (`scores(..., by_module=True)`, `self_scores(by_module=True)`): when g_i and the
preconditioner M (block-diagonal over modules: identity, K-FAC / EK-FAC blocks) live in parameter
space, score(i, j) = Σ_m g_i[m]ᵀ M[m, m] g_j[m] exactly, m over the modules owning parameters
(`ParamSpec.modules`); methods whose M, projection or ensemble couples modules refuse it.

`self_scores()[i] = score(i, i)`: the self-influence of training example i (how much its own loss
would rise if it were left out). Large self-influence marks atypical or mislabeled examples.
Methods with only a self-influence (`loss`, `el2n`, `mpe`) raise on `scores`.

Computation
-----------
Most methods are inner products of a train-side and a test-side embedding,
score(i, j) = Σ_c ⟨a_c(z_i), b_c(z_j)⟩ (c over components: checkpoints, ensemble members, ...).
`FeatureAttributor` computes the (N, M) matrix block by block: blocks of test rows outer, blocks of
training rows inner, train embeddings cached when they fit in a quarter of `memory_budget`. When
the matrix itself exceeds `memory_budget` bytes it is written into a memory-mapped `.npy` file
(`out=` path, or a temporary file under `scratch_dir`) and returned as a tensor backed by it.

Settings, compute options, needs
--------------------------------
Every method's `__init__` names each of its settings (no `**kwargs`: a misspelt or foreign setting
is a TypeError in Python and a ConfigError through `make_attributor`), stores each under its own
name (`settings()` returns them) and validates it there. How a method computes, never what it
computes (chunks, blocks, memory budget, scratch folder, spilling, progress bars), is one `ComputeOptions`
passed as `compute=`; `make_attributor` also takes each of them as a flat setting (the CLI's one dict).
What a method takes from the training run is declared, not guessed from its name: `needs` (a subset
of `NEEDS`), each need filling the settings listed there; an orchestrator asks `method_class(m).needs`.
`save(dir)` / `load(dir, model, x_train, y_train)` / `load_attributor(...)`: see `state`.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

# flat_per_example_grads lives in the core; re-exported here for the methods that import it from base (trak)
from modelsense.core.functional import (  # noqa: F401
    FunctionalModel,
    Params,
    chunks,
    flat_per_example_grads,
    input_tensors,
    map_inputs,
    take_rows,
)
from modelsense.data import scratch
from modelsense.data.stream import BatchAdapter, Rows, as_examples
from modelsense.errors import ConfigError, DataError, shown
from modelsense.progress import progress_bar
from modelsense.training.objective import LOSSES

#: What a method can take from the training run that produced the model, and the settings of the
#: method each one fills. An orchestrator (`attribution.settings.method_context`) supplies them for
#: the methods whose class lists the need in `needs`; a method works without them (its defaults).
NEEDS: dict[str, tuple[str, ...]] = {
    # parameter snapshots θ_t of the training trajectory and the learning rate η_t of each (TracIn)
    "checkpoints": ("checkpoints", "learning_rates"),
    # the training recipe and a builder of fresh models, to train models from scratch (ensembles:
    # trak, el2n, fscore, cl, if-* with n_models > 1)
    "recipe": ("train_config", "model_fn"),
    # the training's δ as the prior precision of a Laplace posterior, > 0 (la-kfac, mpe)
    "prior_precision": ("prior_precision",),
    # the training's δ as the weight decay of a fine-tuning objective, >= 0 (gex, tracinrp-fge)
    "delta": ("delta",),
    # the optimizer that trained the model, when its state is a posterior (mpe after ivon / adam)
    "optimizer_state": ("source", "optimizer"),
}


def check_int(what: str, value: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    """`value` as an int >= minimum (an integral float such as 3.0 is accepted); ConfigError otherwise."""
    if value is None and allow_none:
        return None
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or int(value) < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}{' or None' if allow_none else ''}, "
                          f"received {shown(value)}")
    return int(value)


def check_positive(what: str, value: Any, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (>= 0 with allow_zero); ConfigError otherwise."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not math.isfinite(float(value)) or not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'} (finite), received {shown(value)}")
    return float(value)


def check_choice(what: str, value: Any, choices: Sequence[str]) -> str:
    """`value` when it is one of `choices`; ConfigError naming `what` otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, received {shown(value)}")
    return value


#: dtypes of the per-example gradient passes (`ComputeOptions.precision`)
PRECISIONS = ("full", "bfloat16", "float16")


@dataclass(frozen=True)
class ComputeOptions:
    """How a method computes, never what: the scores do not depend on these beyond rounding, so a
    saved state loads under other compute options (`state`), and they are not compared there.

    chunk_size: examples per vmapped per-example gradient pass; None: as many as fit in an eighth
        of `memory_budget` as flat gradients (between 32 and 4096) — larger chunks are much faster
        (digits MLP: 0.42 s per gradient pass with one chunk of 1297 vs 1.5 s in chunks of 256).
    block_size: rows of a score block (train and test).
    memory_budget: bytes; a score matrix larger than this goes to a memory-mapped file, and train
        features are cached in memory when they fit in a quarter of it.
    scratch_dir: where such files go when `scores(..., out=None)`, and the spilled caches (`spill`)
        (default: `$MODELSENSE_SCRATCH`, else the system temp dir; `data.scratch.scratch_dir`).
    spill: `auto` (default), True or False. Train features larger than their in-memory share
        (per-example gradients, preconditioned or projected ones) are kept in a temporary file under
        `scratch_dir` when the disk has room (`scratch_buffer`), so each is computed once however many
        blocks of test rows read them; False, or a disk without room: recomputed for every block of
        test rows (`FeatureAttributor._scores`, schedule 3). `auto`: spill, but on the CPU time the
        training blocks of the first pass (their computation c and their writing w, totals so far)
        and recompute the remaining blocks once (passes − 1)·c <= passes·w (`spill_pays`), since
        reading back costs about w per pass.
        Measured (`bench/spill.py`, if-ekfac, MLP 64-256-256-10, 2 CPU threads), time of recompute
        over spill / auto: 5 test blocks of a 0.65 GB cache 1.08x / 1.30x, 11 blocks 1.37x / 1.92x,
        2 blocks of a 2.6 GB cache 0.71x / 0.96x (writing and reading it back cost more than the
        MLP's cheap gradient pass), MLP 64-32-32-10 with 7 blocks 2.12x / 2.12x. trak's projections,
        computed in `fit` anyway, are spilled unless False.
    progress: show progress bars.
    precision: dtype of the per-example gradient passes: `full` (the parameters', default), `bfloat16`
        or `float16` (parameters, buffers and inputs cast for the pass; the gradients are written into
        a buffer of the parameters' dtype, so projections, curvature solves and score sums accumulate
        in full precision). Tested on CPU (float32 model): bfloat16 scores within 5% (relative
        Frobenius error), float16 within 0.5% of full precision on the contract problem.
    """

    chunk_size: int | None = None
    block_size: int = 2048
    memory_budget: int = 2 * 2**30
    scratch_dir: str | None = None
    progress: bool = True
    precision: str = "full"
    spill: bool | str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "chunk_size", check_int("chunk_size", self.chunk_size, allow_none=True))
        set_(self, "block_size", check_int("block_size", self.block_size))
        set_(self, "memory_budget", check_int("memory_budget", self.memory_budget))
        if self.scratch_dir is not None:
            if not isinstance(self.scratch_dir, (str, os.PathLike)):
                raise ConfigError(f"scratch_dir must be a folder path or None, received {shown(self.scratch_dir)}")
            set_(self, "scratch_dir", os.fspath(self.scratch_dir))
        set_(self, "progress", bool(self.progress))
        check_choice("precision", self.precision, PRECISIONS)
        if not (isinstance(self.spill, (bool, np.bool_)) or (isinstance(self.spill, str) and self.spill == "auto")):
            raise ConfigError(f"spill must be True, False or 'auto' (keep train features in a scratch file when they "
                              f"exceed their share of memory_budget), received {shown(self.spill)}")
        set_(self, "spill", self.spill if isinstance(self.spill, str) else bool(self.spill))


#: the names of the compute options, which `make_attributor` also takes as flat settings
COMPUTE_OPTIONS = tuple(f.name for f in fields(ComputeOptions))


#: bytes a spilled buffer leaves free on its disk (`scratch_buffer`)
SCRATCH_DISK_MARGIN = 2**30


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy twin of `dtype`; float32 for those numpy lacks (bfloat16)."""
    try:
        return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    except TypeError:
        return np.dtype(np.float32)


def memmap_array(path: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype) -> np.memmap:
    """A new memory-mapped `.npy` file at `path` of `shape` and the numpy twin of `dtype`, as an array of
    zeros (`data.scratch.open_map`); `torch.from_numpy` shares it."""
    return scratch.open_map(path, shape, _numpy_dtype(dtype))


def scratch_buffer(shape: tuple[int, ...], dtype: torch.dtype, ram_bytes: int, scratch_dir: str | None,
                   prefix: str = "scratch", device: torch.device | str = "cpu", disk: bool = True,
                   zero: bool = False) -> Tensor | None:
    """A scratch tensor of `shape` (uninitialised, or zeros with `zero`): in memory on `device` when its
    bytes fit `ram_bytes` (the caller's share of `memory_budget`); else, with `disk`, a CPU tensor
    backed by a temporary memory-mapped file under `scratch_dir` (None: `$MODELSENSE_SCRATCH` or the
    temp dir; `data.scratch.scratch_array`, which unlinks it once mapped, so nothing is left behind, an
    exception included) when that disk keeps `SCRATCH_DISK_MARGIN` bytes free after reserving it; else
    None, and the caller recomputes what it would have kept. Read and write it with `read_rows` /
    `write_rows`, which keep its pages out of the resident memory.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if math.prod(shape) * itemsize <= ram_bytes:
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    if not disk or _numpy_dtype(dtype).itemsize != itemsize:  # no numpy twin (bfloat16): recomputed
        return None
    try:
        array = scratch.scratch_array(shape, _numpy_dtype(dtype), f"a spilled {prefix} buffer", folder=scratch_dir,
                                      prefix=f"{prefix}_", margin=SCRATCH_DISK_MARGIN, file_handle=True)
    except scratch.NoScratchRoom:
        return None
    buffer = torch.from_numpy(array)
    buffer._scratch_map = array  # for release_rows
    if hasattr(array, "fd"):  # read_rows / write_rows copy through the page cache
        buffer._scratch_file = (array.fd, array.offset)
    return buffer


def release_rows(buffer: Tensor, rows: slice) -> None:
    """Drop the pages of rows `rows` of a memory-mapped `scratch_buffer` from this process's resident
    memory (`data.scratch.release`; the data stays in the file and the page cache), so a buffer written
    or read block by block does not add its size to the resident memory; a no-op for an in-memory buffer."""
    mm = getattr(buffer, "_scratch_map", None)
    if mm is not None:
        scratch.release(mm, rows)


#: bytes of a memory-mapped buffer mapped at a time by `read_rows` / `write_rows`
MAPPED_BYTES = 8 * 2**20


def _mapped_chunks(buffer: Tensor, rows: slice) -> list[slice]:
    """`rows` in slices of at most `MAPPED_BYTES` of `buffer` (all of it for an in-memory buffer)."""
    if getattr(buffer, "_scratch_map", None) is None:
        return [rows]
    step = max(1, MAPPED_BYTES // max(1, buffer.stride(0) * buffer.element_size()))
    return [slice(start, min(start + step, rows.stop)) for start in range(rows.start, rows.stop, step)]


def _file_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable memoryview (any dtype)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_rows(buffer: Tensor, rows: slice, device: torch.device | str) -> Tensor:
    """Rows `rows` of a `scratch_buffer` on `device`: a view of an in-memory buffer, a copy of a
    disk-backed one: read with `os.preadv` from the page cache where the platform has it (no page
    faults, nothing mapped), else copied from the mapping `MAPPED_BYTES` at a time (`release_rows`)."""
    if getattr(buffer, "_scratch_map", None) is None:
        return buffer[rows].to(device)
    block = torch.empty((rows.stop - rows.start, *buffer.shape[1:]), dtype=buffer.dtype)
    file = getattr(buffer, "_scratch_file", None)
    if file is not None:
        fd, offset = file
        view, at = _file_bytes(block), offset + rows.start * buffer.stride(0) * buffer.element_size()
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], at + done)
            if got <= 0:
                raise OSError(f"the spilled scratch file ended after {done} of {len(view)} bytes")
            done += got
        return block.to(device)
    for part in _mapped_chunks(buffer, rows):
        block[part.start - rows.start:part.stop - rows.start] = buffer[part]
        release_rows(buffer, part)
    return block.to(device)


def write_rows(buffer: Tensor, rows: slice, parts: Sequence[Tensor]) -> None:
    """Write `parts` ((b, d_c) each, side by side) into rows `rows` of a `scratch_buffer`,
    `MAPPED_BYTES` at a time for a disk-backed one (`os.pwrite` where the platform has it, else through
    the mapping, each part's pages released once written)."""
    file = getattr(buffer, "_scratch_file", None)
    row_bytes = buffer.stride(0) * buffer.element_size()
    for sub in _mapped_chunks(buffer, rows):
        local = slice(sub.start - rows.start, sub.stop - rows.start)
        if file is not None:
            chunk = torch.cat([f[local].detach().to("cpu", buffer.dtype) for f in parts], 1).contiguous()
            fd, offset = file
            view, done = _file_bytes(chunk), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + sub.start * row_bytes + done)
            continue
        start = 0
        for f in parts:
            buffer[sub, start:start + f.shape[1]] = f[local].detach()
            start += f.shape[1]
        release_rows(buffer, sub)


def as_functional(model: FunctionalModel | nn.Module, loss: str = "cross_entropy") -> FunctionalModel:
    """The model as a `FunctionalModel` (eval mode) with the requested loss.

    `loss="sigmoid_bce"` returns a model sharing its state whose per-example loss is the summed per-class
    sigmoid binary cross-entropy (`FunctionalModel.with_loss`; the GEX original's default); the default
    keeps the model's own likelihood (softmax cross-entropy for `categorical`).
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if isinstance(model, FunctionalModel):
        fm = model
    elif isinstance(model, nn.Module):
        fm = FunctionalModel(model)
    else:
        raise ConfigError(f"expected an nn.Module or a FunctionalModel, received {type(model).__name__}")
    fm.module.eval()
    return fm.with_loss(loss)


def param_dtype(params: Params) -> torch.dtype:
    """The dtype of the first tensor of `params`."""
    return next(iter(params.values())).dtype


def param_device(params: Params) -> torch.device:
    """The device of the first tensor of `params`."""
    return next(iter(params.values())).device


def detached_params(params: Params) -> Params:
    """A detached copy (clone) of every tensor of `params`."""
    return {k: v.detach().clone() for k, v in params.items()}


class Attributor:
    """Base of every influence estimator (see the module docstring for the sign and scale).

    Settings go to `__init__` (each named there, validated there, stored under its own name);
    `fit(model, x_train, y_train)` learns, or `load(dir, model, x_train, y_train)` restores what a
    fit saved; learned state ends with `_`; `scores(x_test, y_test)` returns the (N, M) matrix and
    `self_scores()` the (N,) self-influences, both as tensors in the parameters' dtype on the CPU.
    Data: tensors as above, or `fit(model, data)` / `scores(data)` / `load(dir, model, data)` with
    `data` a map-style Dataset or a DataLoader (shuffle=False), `adapter=` a `BatchAdapter` for
    other item layouts (`modelsense.data.stream`). A method whose `streams()` is True reads such data
    batch by batch (row i of the result is item i); the others read it into tensors within
    `memory_budget` (DataError above it, or for dict / tuple inputs).

    Settings of every method:
        loss: `cross_entropy` (softmax, default) or `sigmoid_bce` (per-class sigmoid, GEX original).
        seed: seed of every random draw of the method (projections, sampling, fine-tuning).
        compute: `ComputeOptions` (chunks, blocks, memory budget, scratch folder, progress).

    Class attributes: `pairwise` (False: self-influence only), `needs` (what the method takes from
    the training run, keys of `NEEDS`), `needs_curvature` (builds a curvature operator of the
    model's likelihood), `informative_self` (False where the self-score says nothing, grad-cos),
    `splits_by_module` (scores and self-scores split exactly over modules: `by_module=True`),
    `state_attributes` (the fitted attributes `save` writes; subclasses with more than plain
    tensors, lists and numbers override `_get_state` / `_set_state`).
    """

    name: ClassVar[str] = ""
    pairwise: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_curvature: ClassVar[bool] = False
    #: False where the self-score carries no information about the example (grad-cos: always 1)
    informative_self: ClassVar[bool] = True
    #: True where score(i, j) = Σ_c a_cᵀ b_c with a_c, b_c in parameter space (P,) and b_c = M_c g_j
    #: for a preconditioner M_c block-diagonal over modules: then the score is exactly the sum over
    #: modules m of a_c[m]ᵀ b_c[m] (`scores(..., by_module=True)`)
    splits_by_module: ClassVar[bool] = False
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        self.loss = check_choice("loss", loss, LOSSES)
        if loss != "cross_entropy" and self.needs_curvature:
            raise ConfigError(
                f"method {self.name!r} builds a curvature operator of the model's likelihood and supports "
                "loss='cross_entropy' only; use a gradient or ensemble method for loss='sigmoid_bce'"
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, received {shown(seed)}")
        self.seed = int(seed)
        if compute is None:
            compute = ComputeOptions()
        if not isinstance(compute, ComputeOptions):
            raise ConfigError(f"compute must be a ComputeOptions, received {type(compute).__name__}")
        self.compute = compute

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Names of the method's settings: the parameters of its `__init__` other than `compute`."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name not in ("self", "compute"))

    def settings(self) -> dict[str, Any]:
        """{name: value} of every setting (as stored by `__init__`)."""
        return {name: getattr(self, name) for name in self.setting_names()}

    def __repr__(self) -> str:
        scalar = (int, float, str, bool, type(None))
        shown_ = ", ".join(
            f"{k}={shown(v) if isinstance(v, scalar) else type(v).__name__}" for k, v in self.settings().items()
        )
        return f"{type(self).__name__}({shown_})"

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, model: FunctionalModel | nn.Module, data: Any, y: Tensor | None = None, *,
            adapter: BatchAdapter | None = None) -> Attributor:
        """Prepare the method for the trained `model` and its training data: `fit(model, x, y)` with
        tensors (N, ...), (N,), or `fit(model, data)` with an (x, y) pair, a map-style `Dataset` or a
        `DataLoader` (shuffle=False), items found by `adapter` (see `modelsense.data.stream`)."""
        self._bind(model, data, y, adapter)
        self._fit()
        return self

    def streams(self) -> bool:
        """True when the method reads the training data only in batches (by position), so a Dataset or
        DataLoader is never read whole; False: such data is read into tensors when it fits
        `memory_budget` (refused otherwise). Methods override it."""
        return False

    def _examples(self, data: Any, y: Any, adapter: BatchAdapter | None, what: str, fitted: bool) -> tuple[Any, Any]:
        """Checked data of the forms `as_examples` takes: tensors on the parameters' device (tensor data,
        or a Dataset read whole when the method does not stream), else lazy `Rows` (a first batch checked)."""
        ex = as_examples(data, y, adapter, what)
        if ex.in_memory:
            return self._check_data(*ex.tensors, what, fitted=fitted)
        ex = ex.on(param_device(self.params_), param_dtype(self.params_))
        if not self.streams():
            return self._check_data(*ex.materialize(self.compute.memory_budget, f"method {self.name!r}"), what,
                                    fitted=fitted)
        self._check_data(*ex.get(slice(0, min(len(ex), 64))), what, fitted=fitted)
        return ex.inputs, ex.labels

    def _bind(self, model: FunctionalModel | nn.Module, data: Any, y: Any = None,
              adapter: BatchAdapter | None = None) -> None:
        """The bookkeeping of `fit` and `load`: model, parameters, checked training data, chunk size."""
        self.model_ = as_functional(model, self.loss)
        self.params_ = detached_params(self.model_.params)
        self.x_train_, self.y_train_ = self._examples(data, y, adapter, "training", fitted=False)
        row_bytes = self.model_.n_params * torch.empty(0, dtype=param_dtype(self.params_)).element_size()
        budget = self.compute.memory_budget
        self.chunk_size_ = self.compute.chunk_size or int(min(4096, max(32, budget // (8 * row_bytes))))

    def _fit(self) -> None:
        """Method-specific fitting (state in attributes ending with `_`)."""

    # -- saved state --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the fitted state and the settings to the folder `path` (see `state`)."""
        from modelsense.attribution.state import save_attributor

        return save_attributor(self, path, overwrite=overwrite)

    def load(self, path: str | os.PathLike, model: FunctionalModel | nn.Module, x_train: Any,
             y_train: Tensor | None = None, *, adapter: BatchAdapter | None = None) -> Attributor:
        """Instead of `fit`: restore the state `save` wrote to `path`. Refused (ConfigError, naming what
        differs) when it is another method's, was fitted with other settings, on another model
        (parameter names, shapes or values) or on other training data (see `state`)."""
        from modelsense.attribution.state import load_state

        load_state(self, path, model, x_train, y_train, adapter=adapter)
        return self

    def _get_state(self) -> dict[str, Any]:
        """The fitted state to save: tensors, numbers, strings, None, in dicts, lists and tuples."""
        return {k: getattr(self, k) for k in self.state_attributes if hasattr(self, k)}

    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore `_get_state()` (tensors already on the parameters' device); rebuild what derives from it."""
        for k, v in state.items():
            setattr(self, k, v)

    @property
    def n_train(self) -> int:
        self._check_fitted()
        return len(self.x_train_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError(f"{type(self).__name__} is not fitted; call .fit(model, x_train, y_train) first")

    def _check_data(self, x: Any, y: Any, what: str, fitted: bool = True) -> tuple[Any, Tensor]:
        """Tensors on the parameters' device; DataError on a shape/label mismatch with the model or a
        non-finite input. Inputs may be a tensor or a dict / tuple of tensors (a collate_fn's)."""
        if not isinstance(y, Tensor) or not (isinstance(x, Tensor) or isinstance(x, (dict, tuple, list))):
            raise DataError(
                f"{what} data: expected torch tensors x and y, received {type(x).__name__} and {type(y).__name__}; "
                "convert with torch.as_tensor"
            )
        tensors = input_tensors(x) if not isinstance(x, Tensor) else [x]
        if not tensors or any(not isinstance(t, Tensor) for t in tensors):
            raise DataError(f"{what} data: inputs hold no tensors")
        rows = {len(t) for t in tensors}
        if len(rows) != 1 or rows == {0} or len(y) != tensors[0].shape[0]:
            raise DataError(f"{what} data: expected x and y with the same number (>= 1) of rows, received "
                            f"{sorted(rows)} and {len(y)}")
        fm, device = self.model_, param_device(self.params_)
        dtype = param_dtype(self.params_)
        from modelsense.core.functional import to_device

        x = to_device(x, device, dtype)
        y = y.to(device)
        reference = None
        if fitted:
            ref = self.x_train_
            reference = (
                tuple(ref.shape[1:])
                if isinstance(ref, Tensor)
                else ref.example_shape
                if isinstance(ref, Rows)
                else None
            )
        if isinstance(x, Tensor) and reference is not None and tuple(x.shape[1:]) != reference:
            raise DataError(
                f"{what} data: examples of shape {tuple(x.shape[1:])} but the model was fitted on examples of shape "
                f"{reference}; pass test data with the training data's features"
            )
        for name, t in [*(("inputs", t) for t in input_tensors(x)), ("targets", y)]:
            bad = 0
            for part in scratch.row_chunks(t) if t.is_floating_point() else ():  # no whole-size mask
                bad += int((~torch.isfinite(t[part])).reshape(part.stop - part.start, -1).any(1).sum())
            if bad:
                raise DataError(f"{what} data: {bad} of {len(t)} examples have NaN or infinite {name}; "
                                "drop or impute them first")
        shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else type(x).__name__
        try:
            with torch.no_grad():
                out = fm(self.params_, take_rows(x, slice(0, 1)))
        except Exception as exc:  # noqa: BLE001 - any failure means the input does not fit the model
            raise DataError(f"{what} data: the model cannot take examples of shape {shape} ({exc})") from exc
        if fm.likelihood == "categorical":
            if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise DataError(f"{what} data: classification labels must be integers, received dtype {y.dtype}")
            y = y.long()
            n_classes = out.shape[-1]
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
                raise DataError(
                    f"{what} data: labels must lie in [0, {n_classes}) (the model has {n_classes} outputs), "
                    f"received labels in [{int(y.min())}, {int(y.max())}]"
                )
        elif y.is_floating_point():
            y = y.to(dtype)
        return x, y

    # -- results ------------------------------------------------------------------------------
    def scores(self, data: Any, y: Tensor | None = None, out: str | os.PathLike | np.ndarray | None = None,
               by_module: bool = False, *, adapter: BatchAdapter | None = None) -> Tensor | dict[str, Tensor]:
        """score(i, j) for every training example i and test example j, shape (N, M).

        Args:
            data, y: test examples (M, ...) with the training data's feature shape and labels (M,); or,
                with y None, an (x, y) pair, a map-style Dataset or a DataLoader (shuffle=False) whose
                items `adapter` reads (see `modelsense.data.stream`).
            out: a `.npy` path (written as a memory map) or a writable (N, M) array to fill; None:
                in memory, or a temporary memory map when N·M·itemsize > memory_budget.
            by_module: return {module name: (N, M)} instead, the part of each score that comes from
                the parameters of each module (`ParamSpec.modules`); the parts sum to the score
                exactly. Methods with `splits_by_module` only (see `module_scores`).
        """
        self._check_fitted()
        if not self.pairwise:
            raise ConfigError(
                f"method {self.name!r} gives a self-influence only; call self_scores(), or choose a pairwise "
                f"method ({', '.join(_pairwise_names())})"
            )
        if by_module:
            self._check_by_module()
            if out is not None:
                raise ConfigError("out= is where the total (N, M) matrix goes; with by_module=True each module's "
                                  "matrix is in memory or in a temporary memory map under scratch_dir: drop out=")
        x_test, y_test = self._examples(data, y, adapter, "test", fitted=True)
        if by_module:
            return self._module_scores(x_test, y_test)
        try:
            return self._scores(x_test, y_test, out)
        except BaseException:
            self._discard_partial_scores()
            raise

    def self_scores(self, by_module: bool = False) -> Tensor | dict[str, Tensor]:
        """score(i, i) for every training example i, shape (N,); by_module: {module name: (N,)}
        summing to it (see `scores`)."""
        self._check_fitted()
        if by_module:
            self._check_by_module()
            return self._module_self_scores()
        return self._self_scores()

    def _check_by_module(self) -> None:
        if not self.splits_by_module:
            raise ConfigError(
                f"method {self.name!r} does not split exactly over modules (its preconditioner, projection or "
                "ensemble mixes the parameters of different modules); by_module is available for "
                f"{', '.join(by_module_names())}"
            )

    def _module_scores(self, x_test: Tensor, y_test: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _module_self_scores(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _scores(self, x_test: Tensor, y_test: Tensor, out) -> Tensor:
        raise NotImplementedError

    def _self_scores(self) -> Tensor:
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------------
    def _per_example_grads(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Flat per-example loss gradients (n, P): `FunctionalModel.per_example_grads(flat=True)` of
        the model's per-example loss, in chunks of `chunk_size`."""
        if self.compute.precision == "full":
            return self.model_.per_example_grads(params, x, y, chunk_size=self.chunk_size_, flat=True)
        low = getattr(torch, self.compute.precision)

        def cast(t: Tensor) -> Tensor:
            return t.to(low) if t.is_floating_point() else t

        model = copy.copy(self.model_)  # the same module, its buffers cast for this pass
        model.fixed = {k: cast(v) for k, v in self.model_.fixed.items()}

        def loss(p: Params, xi: Any, yi: Tensor) -> Tensor:
            return model._single_loss(p, map_inputs(cast, xi), yi)

        first = next(iter(params.values()))
        out = torch.empty(len(y), self.model_.n_params, dtype=first.dtype, device=first.device)
        return flat_per_example_grads(model, loss, {k: cast(v) for k, v in params.items()}, x, y,
                                      self.chunk_size_, out=out)

    def _per_example_losses(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    self.model_.per_example_loss(params, take_rows(x, s), y[s])
                    for s in chunks(len(y), 4 * self.chunk_size_)
                ]
            )

    def _allocate(self, shape: tuple[int, int], dtype: torch.dtype, out) -> Tensor:
        """The result matrix: `out` (an array, or a `.npy` path written as a memory map), else in memory
        when it fits `memory_budget`, else a memory-mapped `.npy` file under `scratch_dir` that is the
        result (its path in `scores_path_`; removed if scoring fails)."""
        np_dtype = _numpy_dtype(dtype)
        if isinstance(out, np.ndarray):
            if tuple(out.shape) != tuple(shape):
                raise ConfigError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
            if out.dtype != np_dtype:
                raise ConfigError(f"out has dtype {out.dtype}, expected {np_dtype}")
            return torch.from_numpy(out)
        if out is None:
            result = scratch_buffer(shape, dtype, self.compute.memory_budget, self.compute.scratch_dir, disk=False,
                                    zero=True)
            if result is not None:
                return result
            fd, path = tempfile.mkstemp(suffix=".npy", prefix=f"scores_{self.name}_",
                                        dir=self.compute.scratch_dir or scratch.scratch_dir())
            os.close(fd)
            self._partial_scores = Path(path)
        else:
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
        self._memmap = memmap_array(path, shape, dtype)
        self.scores_path_ = Path(path)
        return torch.from_numpy(self._memmap)

    def _flush(self) -> None:
        mm = getattr(self, "_memmap", None)
        if mm is not None:
            mm.flush()
            self._memmap = None
        self._partial_scores = None

    def _discard_partial_scores(self) -> None:
        """Remove the temporary score file of a scoring that failed (`_allocate`)."""
        path = getattr(self, "_partial_scores", None)
        self._memmap, self._partial_scores = None, None
        if path is not None:
            scratch.remove_quietly(str(path))


class _TrainFeatureCache:
    """Train features of the blocks of training rows, each block computed once by `compute(rows)` (a
    list of (b, d_c) tensors) and written into `buffer` (N, Σ d_c) at its rows; read back from there
    on later passes. `buffer` None: recomputed on every pass."""

    def __init__(self, compute: Callable[[slice], list[Tensor]], buffer: Tensor | None, widths: list[int],
                 device: torch.device, passes: int = 1, timed: bool = False) -> None:
        self.compute, self.buffer, self.widths, self.device = compute, buffer, widths, device
        self.passes, self.timed = passes, timed
        self.done: set[int] = set()
        self.recompute = False  # set once the timings of the blocks written so far show spilling does not pay
        self.compute_s = self.write_s = 0.0

    def get(self, k: int, rows: slice) -> list[Tensor]:
        """The features of block k (training rows `rows`)."""
        if self.buffer is None:
            return self.compute(rows)
        if k in self.done:
            return list(read_rows(self.buffer, rows, self.device).split(self.widths, dim=1))
        if self.recompute:
            return self.compute(rows)
        start = time.perf_counter()
        a = self.compute(rows)
        computed = time.perf_counter()
        write_rows(self.buffer, rows, a)
        self.compute_s += computed - start
        self.write_s += time.perf_counter() - computed
        if self.timed:  # writes slow down once the kernel starts writing the file back: decide on the totals
            self.recompute = not spill_pays(self.compute_s, self.write_s, self.passes)
        self.done.add(k)
        return a


def spill_pays(compute_s: float, write_s: float, passes: int) -> bool:
    """Whether keeping a block of features on disk beats recomputing it: it saves passes − 1
    computations (compute_s each) for one write and passes − 1 reads (each about write_s)."""
    return (passes - 1) * compute_s > passes * write_s


class FeatureAttributor(Attributor):
    """A method whose scores are inner products of embeddings: score(i, j) = Σ_c ⟨a_c(z_i), b_c(z_j)⟩.

    Subclasses implement `_train_features(rows)` (a list of (b, d_c) tensors for the training rows
    `rows`) and `_test_features(x, y)` (the matching list for any examples); the engine does the
    blocks, the memory budget and the progress bar. `symmetric = True` declares a(z) = b(z).
    """

    symmetric: ClassVar[bool] = False

    def _train_features(self, rows: slice) -> list[Tensor]:
        raise NotImplementedError

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _self_feature_pair(self, rows: slice) -> tuple[list[Tensor], list[Tensor]]:
        """(train features, test features) of the training rows `rows`; symmetric methods
        (a = b on the same example) compute them once."""
        a = self._train_features(rows)
        if self.symmetric:
            return a, a
        return a, self._test_features(self.x_train_[rows], self.y_train_[rows])

    def _block_rows(self, row_bytes: int) -> int:
        """Rows of a block of per-example features: `block_size`, fewer when one block of features
        (row_bytes each) would take more than an eighth of `memory_budget` (a block of gradients of a
        large model: 2048 x 700k parameters would be 5.7 GB)."""
        return max(1, min(self.compute.block_size, self.compute.memory_budget // (8 * max(int(row_bytes), 1))))

    def _feature_row_bytes(self) -> tuple[list[Tensor], int]:
        probe = self._train_features(slice(0, 1))
        return probe, sum(f.shape[1] for f in probe) * probe[0].element_size()

    def _self_scores(self) -> Tensor:
        n = self.n_train
        out = torch.zeros(n, dtype=param_dtype(self.params_))
        blocks = list(chunks(n, self._block_rows(self._feature_row_bytes()[1])))
        with progress_bar(len(blocks), f"{self.name} self-influence", enabled=self.compute.progress) as bar:
            for rows in blocks:
                a, b = self._self_feature_pair(rows)
                out[rows] = sum((ac * bc).sum(1) for ac, bc in zip(a, b)).detach().cpu()
                bar.advance(1)
        return out

    def _n_components(self) -> int:
        return 1

    def _train_component(self, rows: slice, c: int) -> Tensor:
        """Train features of component c alone (override when components are computed separately)."""
        return self._train_features(rows)[c]

    def _test_component(self, x: Tensor, y: Tensor, c: int) -> Tensor:
        return self._test_features(x, y)[c]

    def _scores(self, x_test: Tensor, y_test: Tensor, out) -> Tensor:
        """Three schedules, chosen by the memory budget: (1) all train features fit in budget/4:
        cached, blocks of test rows outer; (2) else, when one component's test features fit
        (components: checkpoints, ensemble members): components outer, test features of the
        component held, train blocks inner, result accumulated — every per-example feature is
        computed once; (3) otherwise test blocks outer, train blocks inner, each block of train
        features computed on the first pass over them and read back on later passes from a
        memory-mapped scratch file (`ComputeOptions.spill`; recomputed per test block without it)."""
        n, m = self.n_train, len(x_test)
        dtype = param_dtype(self.params_)
        result = self._allocate((n, m), dtype, out)
        quarter = self.compute.memory_budget // 4
        probe, row_bytes = self._feature_row_bytes()
        comp_bytes = max(f.shape[1] for f in probe) * probe[0].element_size()
        train_blocks = list(chunks(n, self._block_rows(row_bytes)))
        if row_bytes * n > quarter and comp_bytes * m <= quarter:
            with progress_bar(
                len(probe) * len(train_blocks), f"{self.name} scores", enabled=self.compute.progress
            ) as bar:
                for c in range(len(probe)):
                    B = torch.cat([self._test_component(x_test[cols], y_test[cols], c)
                                   for cols in chunks(m, self._block_rows(comp_bytes))])
                    for rows in train_blocks:
                        block = (self._train_component(rows, c) @ B.T).detach().to("cpu", result.dtype)
                        if c == 0:
                            result[rows] = block
                        else:
                            result[rows] += block
                        bar.advance(1)
                    del B
            self._flush()
            return result
        test_rows = max(1, min(self.compute.block_size, quarter // max(row_bytes, 1)))
        test_blocks = list(chunks(m, test_rows))
        cache = self._train_feature_cache(probe, len(test_blocks))
        with progress_bar(
            len(test_blocks) * len(train_blocks), f"{self.name} scores", enabled=self.compute.progress
        ) as bar:
            for cols in test_blocks:
                b = self._test_features(x_test[cols], y_test[cols])
                for k, rows in enumerate(train_blocks):
                    a = cache.get(k, rows)
                    block = sum(ac @ bc.T for ac, bc in zip(a, b))
                    result[rows, cols] = block.detach().to("cpu", result.dtype)
                    bar.advance(1)
        self._flush()
        return result

    def _holds_train_features(self) -> bool:
        """True when `_train_features` reads features the method already keeps (nothing to cache)."""
        return False

    def _train_feature_cache(self, probe: list[Tensor], passes: int) -> _TrainFeatureCache:
        """The train features of each block computed once over `passes` passes (blocks of test rows):
        kept in memory when all N rows fit a quarter of `memory_budget`, else spilled to a memory-mapped
        scratch file (`ComputeOptions.spill`, `scratch_buffer`; with `auto` on the CPU, while the timings
        of the blocks written so far say it pays); one pass, no spill or no disk room: recomputed every pass."""
        buffer = None
        if passes > 1 and not self._holds_train_features():
            shape = (self.n_train, sum(f.shape[1] for f in probe))
            buffer = scratch_buffer(shape, probe[0].dtype, self.compute.memory_budget // 4, self.compute.scratch_dir,
                                    prefix=f"features_{self.name}", device=probe[0].device,
                                    disk=self.compute.spill is not False)
        timed = self.compute.spill == "auto" and buffer is not None and buffer.device.type == "cpu" and \
            getattr(buffer, "_scratch_map", None) is not None and probe[0].device.type == "cpu"
        return _TrainFeatureCache(self._train_features, buffer, [f.shape[1] for f in probe], probe[0].device,
                                  passes, timed)

    # -- per-module breakdown (methods with splits_by_module) --------------------------------------
    def _module_columns(self, features: list[Tensor]) -> dict[str, Tensor]:
        """module name -> its columns of the (parameter-space) features; checks they are (n, P)."""
        P = self.model_.n_params
        if any(f.shape[1] != P for f in features):
            raise ConfigError(f"method {self.name!r}: features of width {[f.shape[1] for f in features]} are not in "
                              f"parameter space (P = {P}); it cannot split by module")
        return {m: idx.to(features[0].device) for m, idx in self.model_.spec.modules.items()}

    def _module_results(self, shape: tuple[int, int]) -> dict[str, Tensor]:
        """A zero (N, M) matrix per module: in memory when all fit the memory budget, else each a
        memory-mapped temporary file under scratch_dir (`scratch_buffer`: removed with the matrix)."""
        dtype = param_dtype(self.params_)
        modules = list(self.model_.spec.modules)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        ram = self.compute.memory_budget // len(modules) if len(modules) * math.prod(shape) * itemsize <= \
            self.compute.memory_budget else 0
        results: dict[str, Tensor] = {}
        for name in modules:
            buffer = scratch_buffer(shape, dtype, ram, self.compute.scratch_dir, prefix=f"scores_{self.name}_module",
                                    zero=True)
            if buffer is None:
                raise ConfigError(
                    f"the per-module score matrices ({len(modules)} x {shape[0]} x {shape[1]}) exceed memory_budget "
                    f"and the disk of scratch_dir ({self.compute.scratch_dir or scratch.scratch_dir()}) has no room "
                    "for them; choose another scratch_dir or raise memory_budget")
            results[name] = buffer
        return results

    def _module_scores(self, x_test: Tensor, y_test: Tensor) -> dict[str, Tensor]:
        """{module: (N, M)} with block[i, j] = Σ_c a_c(z_i)[m]ᵀ b_c(z_j)[m]: blocks of test rows outer,
        train rows inner, the features of each block split by the columns of each module (the
        per-example-gradient path; `grad-dot`, `grad-cos` and `tracin` take their factored MLP path)."""
        n, m = self.n_train, len(x_test)
        dtype = param_dtype(self.params_)
        results = self._module_results((n, m))
        train_blocks = list(chunks(n, self.compute.block_size))
        test_blocks = list(chunks(m, self.compute.block_size))
        cache = self._train_feature_cache(self._feature_row_bytes()[0], len(test_blocks))
        with progress_bar(len(test_blocks) * len(train_blocks), f"{self.name} scores by module",
                          enabled=self.compute.progress) as bar:
            for cols in test_blocks:
                b = self._test_features(x_test[cols], y_test[cols])
                columns = self._module_columns(b)
                for k, rows in enumerate(train_blocks):
                    a = cache.get(k, rows)
                    for name, idx in columns.items():
                        block = sum(ac[:, idx] @ bc[:, idx].T for ac, bc in zip(a, b))
                        results[name][rows, cols] = block.detach().to("cpu", dtype)
                    bar.advance(1)
        return results

    def _module_self_scores(self) -> dict[str, Tensor]:
        """{module: (N,)} with entry i = Σ_c a_c(z_i)[m]ᵀ b_c(z_i)[m]."""
        n = self.n_train
        dtype = param_dtype(self.params_)
        results = {name: torch.zeros(n, dtype=dtype) for name in self.model_.spec.modules}
        blocks = list(chunks(n, self.compute.block_size))
        with progress_bar(len(blocks), f"{self.name} self-influence by module", enabled=self.compute.progress) as bar:
            for rows in blocks:
                a, b = self._self_feature_pair(rows)
                for name, idx in self._module_columns(a).items():
                    results[name][rows] = sum((ac[:, idx] * bc[:, idx]).sum(1) for ac, bc in zip(a, b)).detach().cpu()
                bar.advance(1)
        return results


# -- registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Attributor]] = {}


def register(name: str) -> Callable[[type[Attributor]], type[Attributor]]:
    """Class decorator: register an `Attributor` subclass under `name` (the CLI's method name).

    Checks the class's declarations: an `__init__` that names every setting (no *args / **kwargs),
    `needs` among `NEEDS`, and the settings each need fills among the method's settings.
    """

    def deco(cls: type[Attributor]) -> type[Attributor]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"attribution method {name!r} is registered twice")
        params = inspect.signature(cls.__init__).parameters.values()
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            raise TypeError(f"{cls.__name__}.__init__ must name each of its settings (no *args / **kwargs)")
        unknown = sorted(set(cls.needs) - set(NEEDS))
        if unknown:
            raise TypeError(f"{cls.__name__}.needs lists {unknown}, not among {sorted(NEEDS)}")
        missing = [s for need in sorted(cls.needs) for s in NEEDS[need] if s not in cls.setting_names()]
        if missing:
            raise TypeError(f"{cls.__name__} needs {sorted(cls.needs)} but takes no setting {missing}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def _pairwise_names() -> list[str]:
    return [n for n, c in _REGISTRY.items() if c.pairwise]


def by_module_names() -> list[str]:
    """The methods whose scores split exactly over modules (`scores(..., by_module=True)`)."""
    return [n for n, c in _REGISTRY.items() if c.splits_by_module]


def method_class(name: str) -> type[Attributor]:
    """The Attributor class registered under `name` (case and surrounding spaces ignored); ConfigError if none."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown attribution method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def method_settings(name: str) -> tuple[str, ...]:
    """Names of the settings `make_attributor(name, ...)` takes: the method's own (its `__init__`'s)
    and the compute options (`COMPUTE_OPTIONS`, flat)."""
    return tuple(dict.fromkeys([*method_class(name).setting_names(), *COMPUTE_OPTIONS]))


def _takers(setting: str) -> str:
    takers = [n for n, c in _REGISTRY.items() if setting in c.setting_names()]
    return f"a setting of {', '.join(takers)}" if takers else "a setting of no method"


def make_attributor(name: str, settings: Mapping[str, Any] | None = None, strict: bool = True, *,
                    shared_with: Sequence[str] | None = None, **kw: Any) -> Attributor:
    """An unfitted attributor of method `name` with `settings` (and keyword settings).

    Settings: the method's own (`method_class(name).setting_names()`), and the compute options,
    either as `compute=ComputeOptions(...)` or flat (`chunk_size=...`, ...; flat ones override).

    strict: True: every setting must be one the method takes (ConfigError naming the others).
        False: one settings dict is shared by several methods (the CLI's): a setting this method
        does not take is passed over when one of the methods `shared_with` takes it (None: any
        registered method); a setting that none of them takes is refused, naming the methods that
        would take it. So a misspelt setting, or one for a method that was not asked for, never
        disappears silently; pass only the settings the user gave (leave defaults out).
    """
    cls = method_class(name)
    given = {**(settings or {}), **kw}
    own = set(cls.setting_names())
    foreign = [k for k in given if k not in own and k not in COMPUTE_OPTIONS and k != "compute"]
    if foreign and strict:
        listed = "; ".join(f"{k!r} is {_takers(k)}" for k in foreign)
        raise ConfigError(f"method {name!r} does not take settings {foreign} ({listed}); "
                          f"it takes {', '.join(method_settings(name))}")
    if foreign:
        pool = list(_REGISTRY) if shared_with is None else [method_class(m).name for m in shared_with]
        orphans = [k for k in foreign if not any(k in _REGISTRY[m].setting_names() for m in pool)]
        if orphans:
            asked = "any method" if shared_with is None else f"the methods asked for ({', '.join(pool)})"
            listed = "; ".join(f"{k!r} is {_takers(k)}" for k in orphans)
            raise ConfigError(
                f"{'setting' if len(orphans) == 1 else 'settings'} {', '.join(map(repr, orphans))} would be unused: "
                f"not taken by {asked} ({listed}); drop {'it' if len(orphans) == 1 else 'them'} "
                "or ask for a method that takes it"
            )
    compute = given.get("compute")
    if compute is not None and not isinstance(compute, ComputeOptions):
        raise ConfigError(f"compute must be a ComputeOptions, received {type(compute).__name__}")
    flat = {k: v for k, v in given.items() if k in COMPUTE_OPTIONS}
    if flat or compute is None:
        compute = replace(compute or ComputeOptions(), **flat)
    return cls(**{k: v for k, v in given.items() if k in own}, compute=compute)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'gex,loss' or ['gex', 'loss'] -> validated names (ConfigError on an unknown one)."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise ConfigError(f"no attribution method given; choose among {', '.join(_REGISTRY)}")
    for n in names:
        method_class(n)
    if len(set(names)) != len(names):
        raise ConfigError(f"method list {names} names a method twice")
    return names
