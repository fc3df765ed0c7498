"""Shared plumbing of the curvature layer: data chunks, validation, and `DataOperator`, the state every
operator built from (model, x, y) keeps for its passes over the data.

Notation used across the package: N examples, C outputs, P parameters; f_i = f(x_i; θ) ∈ R^C;
l_i = per-example loss of `FunctionalModel` (categorical: cross-entropy; gaussian: ½‖f_i − y_i‖²).
The output-space maths (∂l_i/∂f_i, Λ_i = ∂²l_i/∂f_i², its square root L_i, Λ_i u) is the model's
likelihood object, `model.objective` (`core.likelihood`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from modelsense.core.functional import (
    FunctionalModel,
    Params,
    check_per_example_mode,
    chunks,
    n_rows,
    take_rows,
    to_device,
)
from modelsense.data.stream import BatchAdapter, Rows, as_examples, is_stream
from modelsense.errors import ConfigError, DataError, shown

REDUCTIONS = ("sum", "mean")


def param_dtype_device(params: Params) -> tuple[torch.dtype, torch.device]:
    first = next(iter(params.values()))
    return first.dtype, first.device


def resolve_data(x: Any, y: Any = None, adapter: BatchAdapter | None = None) -> tuple[Any, Any]:
    """The training data of a curvature operator as (x, y): tensors as given, or the lazy `Rows` of a
    map-style Dataset / DataLoader (`modelsense.data.stream`), read one chunk at a time by every pass."""
    if isinstance(x, Rows) or (is_stream(x) and y is None):
        ex = as_examples(x, y, adapter)
        if ex.in_memory:
            return ex.tensors
        return ex.inputs, ex.labels
    return x, y


def check_data(model: FunctionalModel, x: Any, y: Any) -> None:
    """Raise DataError unless x, y are tensors (or the lazy `Rows` of a Dataset) with the same number of
    examples (at least one); ConfigError when the model is not in eval mode where that matters
    (`check_per_example_mode`: batch norm, dropout)."""
    tensor_like = (Tensor, Rows, dict, tuple, list)
    if not isinstance(x, tensor_like) or not isinstance(y, (Tensor, Rows)):
        raise DataError(
            f"expected x and y as torch tensors (or a Dataset / DataLoader as x with y=None), received "
            f"{type(x).__name__} and {type(y).__name__}; convert with torch.as_tensor"
        )
    n = n_rows(x)
    if n == 0 or n != len(y):
        raise DataError(
            f"expected x and y with the same number (>= 1) of examples, received {n} and {len(y)}"
        )
    if model.likelihood == "categorical" and y.dtype not in (torch.int64, torch.int32, torch.long):
        raise DataError(f"categorical likelihood expects integer labels, received dtype {y.dtype}")
    check_per_example_mode(model.module)


def data_chunks(
    x: Any, y: Any, chunk_size: int, params: Params
) -> Iterator[tuple[Any, Tensor | None]]:
    """Yield (x, y) chunks moved to the parameters' device; floating inputs cast to their dtype.
    x may be a tensor, a dict / tuple of tensors, or lazy `Rows` (gathered chunk by chunk)."""
    dtype, device = param_dtype_device(params)
    for s in chunks(n_rows(x), chunk_size):
        xb = to_device(take_rows(x, s), device, dtype)
        yb = None
        if y is not None:
            yb = y[s].to(device)
            if yb.is_floating_point():
                yb = yb.to(dtype)
        yield xb, yb


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {allowed}")


class DataOperator:
    """Mixin of the curvature operators computed from a model and its training data one chunk at a
    time (`ImplicitCurvature`, `KroneckerCurvature`): validation, the settings every such operator
    keeps, and the chunked pass over the data.

    After `_bind_data`: `model`, `x`, `y`, `matrix`, `params` (default `model.params`), `spec`,
    `n_params`, `dtype`, `device` (those of the parameters), `reduction`, `chunk_size` and `scale`,
    the factor applied to the summed matrix Σ_i K_i: 1 (reduction "sum") or 1/N ("mean").
    """

    def _bind_data(
        self,
        model: FunctionalModel,
        x: Tensor,
        y: Tensor,
        matrix: str,
        matrices: tuple[str, ...],
        params: Params | None,
        reduction: str,
        chunk_size: int,
    ) -> None:
        x, y = resolve_data(x, y)
        check_data(model, x, y)
        check_choice("matrix", matrix, matrices)
        check_choice("reduction", reduction, REDUCTIONS)
        self.model, self.x, self.y, self.matrix = model, x, y, matrix
        self.params = params if params is not None else model.params
        self.spec, self.n_params = model.spec, model.n_params
        self.dtype, self.device = param_dtype_device(self.params)
        self.reduction = reduction
        self.scale = 1.0 if reduction == "sum" else 1.0 / n_rows(x)
        self.chunk_size = int(chunk_size)

    def _data_chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The training data (x, y) in chunks of `chunk_size` on the parameters' device and dtype."""
        return data_chunks(self.x, self.y, self.chunk_size, self.params)


def check_damping(damping: float | Tensor, strictly_positive: bool, what: str) -> None:
    """ConfigError unless damping >= 0 (or > 0 when `strictly_positive`)."""
    d = torch.as_tensor(damping)
    bad = (d <= 0).any() if strictly_positive else (d < 0).any()
    if bool(bad) or not bool(torch.isfinite(d).all()):
        need = "> 0" if strictly_positive else ">= 0"
        raise ConfigError(
            f"{what} needs damping {need} (finite), received {shown(damping)}; pass a positive damping "
            "such as the prior precision"
        )


def as_matrix(v: Tensor, n_params: int) -> tuple[Tensor, bool]:
    """View a (P,) or (P, m) tensor as (P, m); also say whether the input was a vector."""
    if v.ndim not in (1, 2) or v.shape[0] != n_params:
        raise ConfigError(
            f"expected a vector of shape ({n_params},) or a matrix ({n_params}, m), received shape "
            f"{tuple(v.shape)}"
        )
    return (v.unsqueeze(1), True) if v.ndim == 1 else (v, False)
