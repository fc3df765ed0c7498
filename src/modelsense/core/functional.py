"""The functional core: a model as `functional_call` over a parameter dict.

Every numerical layer above works on `FunctionalModel`: logits, per-example losses, gradients and
Jacobians are computed with `torch.func` (`functional_call`, `vmap`, `grad`, `jacrev`) in chunks of
`chunk_size` examples, so memory stays bounded whatever the dataset size.

Losses (per example, before any reduction) are the NLL of the model's likelihood object
(`core.likelihood`, `FunctionalModel.objective`):
    categorical:  l_i = -log softmax(f_i)[y_i]
    gaussian:     l_i = 0.5 * ||f_i - y_i||^2   (unit noise precision)
    sigmoid_bce:  l_i = Σ_c BCE(sigmoid(f_ic), onehot(y_i)_c)   (`with_loss("sigmoid_bce")`)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from modelsense.core.likelihood import LIKELIHOODS, Likelihood, likelihood_for  # noqa: F401 (LIKELIHOODS: re-exported)
from modelsense.errors import ConfigError

Params = dict[str, Tensor]


def per_example_nll(logits: Tensor, y: Tensor, likelihood: str = "categorical") -> Tensor:
    """Negative log-likelihood of each example, shape (n,) (up to constants for `gaussian`):
    `likelihood_for(likelihood).nll(logits, y)`."""
    return likelihood_for(likelihood).nll(logits, y)


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of a parameter dict, to move between dicts and flat vectors."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Params) -> ParamSpec:
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    @property
    def slices(self) -> dict[str, slice]:
        """name -> the positions of that parameter in the flat (P,) vector."""
        out, start = {}, 0
        for name, numel in zip(self.names, self.numels):
            out[name] = slice(start, start + numel)
            start += numel
        return out

    @property
    def modules(self) -> dict[str, Tensor]:
        """module name -> the flat positions (ascending) of that module's own parameters.

        A parameter `a.b.weight` belongs to the module `a.b`; a parameter registered on the root
        module (no dot in its name) to the module `(root)`. Modules in order of their first parameter.
        """
        out: dict[str, list[Tensor]] = {}
        for name, s in self.slices.items():
            out.setdefault(self.module_of(name), []).append(torch.arange(s.start, s.stop))
        return {m: torch.cat(parts) for m, parts in out.items()}

    @staticmethod
    def module_of(name: str) -> str:
        """The module a parameter name belongs to: `a.b.weight` -> `a.b`, `scale` -> `(root)`."""
        return name.rpartition(".")[0] or "(root)"

    def flatten(self, tensors: Params, batch_dims: int = 0) -> Tensor:
        """Concatenate a dict of tensors (with `batch_dims` leading dims) into (*batch, P)."""
        parts = []
        for n in self.names:
            t = tensors[n]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> Params:
        """Split (*batch, P) into a dict of tensors of shapes (*batch, *shape)."""
        batch = flat.shape[:-1]
        chunks = torch.split(flat, list(self.numels), dim=-1)
        return {n: c.reshape(*batch, *s) for n, s, c in zip(self.names, self.shapes, chunks)}


def check_per_example_mode(module: nn.Module) -> None:
    """ConfigError when a submodule makes per-example quantities ill-defined: batch norm in training
    mode or without running statistics (batch statistics couple the examples of a batch, and the
    running statistics would be updated), or dropout (p > 0) in training mode (random masks).
    Call `module.eval()` first: batch norm then uses its running statistics and dropout is off."""
    bad = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            bad.append(f"{name or type(m).__name__} (batch norm)")
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            bad.append(f"{name or type(m).__name__} (dropout)")
        elif isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
            bad.append(f"{name or type(m).__name__} (attention dropout)")
    if bad:
        raise ConfigError(
            f"per-example gradients, Jacobians and curvature need the model in eval mode; modules {bad[:4]} "
            "are in training mode (batch norm would couple the examples of a batch, dropout draws random "
            "masks); call model.eval() first (batch norm without running statistics cannot be used at all)"
        )


#: a model's input for a batch: a tensor (n, ...), or a dict / tuple / list of such tensors (a user's
#: `collate_fn`); the model's forward receives it as its one argument
Inputs = Any


def map_inputs(fn: Callable[[Tensor], Tensor], x: Inputs) -> Inputs:
    """`fn` applied to every tensor of `x` (a tensor, or a dict / tuple / list of them), structure kept."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_inputs(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(map_inputs(fn, v) for v in x)
    raise ConfigError(f"inputs must be a tensor or a dict / tuple / list of tensors, received {type(x).__name__}")


def input_tensors(x: Inputs) -> list[Tensor]:
    """The tensors of `x` in a fixed order (dict keys in insertion order)."""
    out: list[Tensor] = []
    map_inputs(lambda t: out.append(t) or t, x)
    return out


def n_rows(x: Inputs) -> int:
    """Number of examples of `x`: its length (a tensor, or an object with len() and [rows] such as
    `modelsense.data.stream.Rows`), or the common first dimension of a dict / tuple of tensors."""
    if isinstance(x, Tensor) or not isinstance(x, (Mapping, tuple, list)):
        return len(x)
    sizes = {len(t) for t in input_tensors(x)}
    if len(sizes) != 1:
        raise ConfigError(f"the tensors of one batch of inputs have different numbers of rows {sorted(sizes)}")
    return sizes.pop()


def take_rows(x: Inputs, rows: slice | Tensor) -> Inputs:
    """Rows `rows` of `x` (a tensor, a lazy `Rows`, or a dict / tuple / list of tensors)."""
    if isinstance(x, Tensor) or not isinstance(x, (Mapping, tuple, list)):
        return x[rows]
    return map_inputs(lambda t: t[rows], x)


def to_device(x: Inputs, device: torch.device | str, dtype: torch.dtype | None = None) -> Inputs:
    """`x` on `device`; floating tensors cast to `dtype` when given (integer ones, e.g. tokens, kept)."""
    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    return map_inputs(move, x)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering range(n) in pieces of at most `size`."""
    size = max(int(size), 1)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class FunctionalModel:
    """An `nn.Module` seen as a pure function of its parameters.

    Args:
        module: the network; its parameters are copied (detached) into `params`.
        likelihood: `categorical` (softmax cross-entropy) or `gaussian` (squared error / 2); the
            likelihood object `objective` (`core.likelihood`) holds its maths (`with_loss` swaps it
            for the per-class sigmoid loss).
        trainable: optional predicate on parameter names; parameters for which it is False are
            held fixed with the buffers (e.g. `lambda n: n.endswith("weight")`).

    Example:
        >>> fm = FunctionalModel(nn.Linear(4, 3))
        >>> fm.per_example_grads(fm.params, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))["weight"].shape
        torch.Size([5, 3, 4])
    """

    def __init__(
        self,
        module: nn.Module,
        likelihood: str = "categorical",
        trainable: Callable[[str], bool] | None = None,
    ) -> None:
        self.objective: Likelihood = likelihood_for(likelihood)
        self.module = module
        self.likelihood = likelihood
        named = dict(module.named_parameters())
        keep = trainable or (lambda name: True)
        self.params: Params = {n: p.detach() for n, p in named.items() if keep(n)}
        self.fixed: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if not keep(n)}
        self.fixed.update({n: b.detach() for n, b in module.named_buffers()})
        if not self.params:
            raise ConfigError("no trainable parameters selected")
        self.spec = ParamSpec.of(self.params)

    @property
    def n_params(self) -> int:
        return self.spec.size

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """Model outputs (logits) for a batch x, shape (n, C)."""
        return functional_call(self.module, {**self.fixed, **params}, (x,))

    def with_loss(self, loss: str) -> FunctionalModel:
        """This model (sharing its module, parameters and buffers) with the per-example loss `loss`
        (`core.likelihood.LOSSES`: cross_entropy = the likelihood's NLL, sigmoid_bce = one sigmoid per
        class); itself when the loss is already that one."""
        objective = likelihood_for(self.likelihood, loss)
        if objective == self.objective:
            return self
        other = copy.copy(self)
        other.objective = objective
        return other

    def per_example_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """l_i = `objective.nll`(f(x_i), y_i), shape (n,)."""
        return self.objective.nll(self(params, x), y)

    def loss(self, params: Params, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        losses = self.per_example_loss(params, x, y)
        return losses.mean() if reduction == "mean" else losses.sum()

    @torch.no_grad()
    def predict(self, params: Params, x: Tensor, chunk_size: int = 1024) -> Tensor:
        """Outputs for many inputs, computed in chunks, shape (n, C)."""
        return torch.cat([self(params, take_rows(x, s)) for s in chunks(n_rows(x), chunk_size)])

    def _single_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.per_example_loss(params, map_inputs(lambda t: t.unsqueeze(0), x), y.unsqueeze(0))[0]

    def per_example_grads(
        self, params: Params, x: Tensor, y: Tensor, chunk_size: int = 256, flat: bool = False, out: Tensor | None = None
    ) -> Params | Tensor:
        """Gradients g_i = ∂l_i/∂θ of each example's loss: dict of (n, *shape), or flat (n, P) in
        the order of `spec` when `flat` (written into `out` when given; see `flat_per_example_grads`)."""
        if flat:
            return flat_per_example_grads(self, self._single_loss, params, x, y, chunk_size, out=out)
        if out is not None:
            raise ConfigError("out= takes the flat (n, P) gradients; pass flat=True or drop out")
        check_per_example_mode(self.module)
        g = vmap(grad(self._single_loss), in_dims=(None, 0, 0))
        parts = [g(params, take_rows(x, s), y[s]) for s in chunks(n_rows(x), chunk_size)]
        return {n: torch.cat([o[n] for o in parts]) for n in self.spec.names}

    def jacobians(self, params: Params, x: Tensor, chunk_size: int = 128) -> Tensor:
        """Per-example Jacobians of the outputs w.r.t. the parameters, flat (n, C, P)."""
        check_per_example_mode(self.module)

        def single(p: Params, xi: Tensor) -> Tensor:
            return self(p, map_inputs(lambda t: t.unsqueeze(0), xi))[0]

        jac = vmap(jacrev(single), in_dims=(None, 0))
        out = [self.spec.flatten(jac(params, take_rows(x, s)), batch_dims=2) for s in chunks(n_rows(x), chunk_size)]
        return torch.cat(out)


def flat_per_example_grads(
    model: FunctionalModel,
    fn: Callable,
    params: Params,
    x: Tensor,
    y: Tensor,
    chunk_size: int = 256,
    has_aux: bool = False,
    out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """∇_θ fn(θ, x_i, y_i) for every example, flat (n, P) in the order of `model.spec`.

    vmap(grad(fn)) over chunks of `chunk_size` examples; each chunk's gradients are written straight
    into one (n, P) buffer (`out`, cast to its dtype; or a new tensor in the parameters' dtype and
    device) instead of flattening every chunk and concatenating, which copies the gradients twice
    (digits MLP, n = 1297, P = 26122, 1 CPU thread: about 95 ms against 140 ms per pass, chunks of 256).
    `fn(params, x_i, y_i)` returns a scalar, or (scalar, aux) with `has_aux`: then (grads, aux) comes
    back, aux stacked over the examples. `FunctionalModel.per_example_grads(flat=True)` is this with
    fn = the model's per-example loss.
    """
    check_per_example_mode(model.module)
    n, P = n_rows(x), model.n_params
    first = next(iter(params.values()))
    if out is None:
        out = torch.empty(n, P, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != (n, P):
        raise ConfigError(
            f"out must have shape (n, P) = ({n}, {P}), received {tuple(out.shape)}; pass a buffer of that shape or "
            "out=None"
        )
    slices = model.spec.slices
    g = vmap(grad(fn, has_aux=has_aux), in_dims=(None, 0, 0))
    aux = []
    for s in chunks(n, chunk_size):
        res = g(params, take_rows(x, s), y[s])
        grads = res[0] if has_aux else res
        for name, cols in slices.items():
            out[s, cols] = grads[name].reshape(s.stop - s.start, -1)
        if has_aux:
            aux.append(res[1])
    return (out, torch.cat(aux)) if has_aux else out
