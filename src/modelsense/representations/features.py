"""Intermediate activations of any `nn.Module`, collected with forward hooks.

`extract_features(model, x)` runs `model` over the inputs `x` in batches (eval mode, no gradients)
and returns `{module name: activations}` with the outputs of the chosen modules stacked over all n
examples, shape (n, *output shape). By default the chosen modules are every `nn.ReLU` (the layers
Godfrey et al. 2022 compare and stitch at). Functional activations (`torch.relu(x)` inside
`forward`) are not modules and cannot be hooked: wrap them in an `nn.ReLU` to see them.

A module called more than once per forward pass (e.g. one `self.relu` reused inside a ResNet block)
yields one entry per call, named `name#0`, `name#1`, ...

The channel axis of a feature (`channel_axes`, or `extract_features(..., channels_first=True)`, which
moves it to axis 1 so every consumer sees (n, C, *positions)): a convolution's features are (n, C, *S),
a transformer's (n, T, width) have their channels last, and a 3-D tensor alone cannot tell (n, C, L)
from (n, T, d). The rule, for the output of module `name`:
  1. declared: the `channel_axis` attribute (an int, e.g. -1) of the module, else of the nearest module
     above it (the model included: `vit` declares -1 for all its features), wins;
  2. else inferred from the last module that indexes a channel axis with its parameters and finished
     running before (or inside) the layer's output, in the forward pass: nn.Linear, nn.Bilinear,
     nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.MultiheadAttention -> the last axis; nn.Conv*d,
     nn.ConvTranspose*d, nn.BatchNorm*d, nn.InstanceNorm*d, nn.GroupNorm -> axis 1 (other
     parameterised modules, e.g. a learned position embedding, are skipped: their parameters do not say
     which axis is the channel);
  3. a 2-D feature (n, C) has axis 1 either way; a feature of ndim >= 3 with neither a declaration nor
     such a module before it is refused (ConfigError naming the layer and how to declare the axis),
     never guessed.
A functional permutation of the axes between that module and the layer (x.transpose(1, 2) in a
forward) is not seen: declare the axis there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.core.functional import chunks, to_device
from modelsense.data.stream import as_examples, is_stream
from modelsense.errors import ConfigError, DataError

#: modules whose parameters index the LAST axis of their output (features), and the FIRST after n
LAST_AXIS_MODULES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.Linear, nn.Bilinear, nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.Embedding,
                nn.MultiheadAttention) if t is not None
)
FIRST_AXIS_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
)


def _declared_axis(model: nn.Module, name: str) -> int | None:
    """The `channel_axis` of module `name` or of the nearest module above it (the model last), or None."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        axis = getattr(model.get_submodule(".".join(parts[:depth])), "channel_axis", None)
        if axis is not None:
            return axis
    return None


def _channel_axis(model: nn.Module, name: str, ndim: int, last: nn.Module | None) -> int:
    """The channel axis (0 < axis < ndim) of the output of module `name` of `model` (see the module
    docstring); `last` is the last channel-indexing module that finished before the output."""
    declared = _declared_axis(model, name)
    if declared is not None:
        if isinstance(declared, bool) or not isinstance(declared, int) or not -ndim <= declared < ndim \
                or declared % ndim == 0:
            raise ConfigError(
                f"layer {name!r} of {type(model).__name__}: channel_axis {declared!r} is not an axis after the "
                f"example axis of its output, of {ndim} dimensions (use 1 for (n, C, ...), -1 for channels last)"
            )
        return declared % ndim
    if ndim == 2:
        return 1
    if last is None:
        raise ConfigError(
            f"cannot tell the channel axis of layer {name!r} of {type(model).__name__}: its output has {ndim} "
            f"dimensions and no module with channel parameters (Linear, LayerNorm, Conv, BatchNorm, ...) runs "
            f"before it; declare it: set `channel_axis = 1` ((n, C, ...), convolutions) or `channel_axis = -1` "
            f"((n, ..., C), transformers) on that module or on the model"
        )
    return ndim - 1 if isinstance(last, LAST_AXIS_MODULES) else 1


def relu_module_names(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.ReLU,)) -> list[str]:
    """Names (as in `model.named_modules()`) of every submodule that is an instance of `types`."""
    return [name for name, mod in model.named_modules() if isinstance(mod, types) and name]


def _resolve(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if names is None:
        names = relu_module_names(model)
        if not names:
            raise ConfigError(
                f"{type(model).__name__} has no nn.ReLU submodule to hook; pass the module names "
                f"to collect explicitly (available: {[n for n in modules if n][:20]})"
            )
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(
            f"no module named {missing} in {type(model).__name__}; available names: "
            f"{[n for n in modules if n][:40]}"
        )
    return {n: modules[n] for n in names}


def extract_features(
    model: nn.Module,
    x: Tensor | np.ndarray,
    names: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    out_device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    channels_first: bool = False,
) -> dict[str, Tensor]:
    """Outputs of the named modules of `model` on every example of `x`, batch by batch.

    Args:
        model: any `nn.Module`; put in eval mode for the pass (its mode is restored after).
        x: inputs (n, *input shape), a tensor or numpy array; or a map-style Dataset / DataLoader
            (shuffle=False) of (x_i, y_i) items, read batch by batch (`modelsense.data.stream`).
        names: module names from `model.named_modules()`; default every `nn.ReLU`.
        batch_size: examples per forward pass.
        device: where the forward passes run (default: the device of the model's parameters).
        out_device: where the collected activations are kept (default CPU, to spare GPU memory).
        dtype: dtype of the collected activations (None keeps the model's).
        channels_first: move each output's channel axis (`channel_axes`, the rule of the module
            docstring; a ConfigError where it cannot be decided) to axis 1: (n, C, *positions).

    Returns:
        dict name -> tensor (n, *module output shape), in the order of `names` (for a module called
        k > 1 times per forward pass: `name#0` ... `name#{k-1}`). Activations are copies, so later
        in-place operations of the model cannot change them.
    """
    return _extract(model, x, names, batch_size, device, out_device, dtype, channels_first)[0]


def _extract(model: nn.Module, x, names: Sequence[str] | None, batch_size: int, device, out_device, dtype,
             channels_first: bool) -> tuple[dict[str, Tensor], dict[str, int]]:
    """`extract_features`, and {key: channel axis} of each output (empty unless `channels_first`)."""
    if is_stream(x):
        examples = as_examples(x, what="feature")
        n, take = len(examples), (lambda sl: examples.get(sl)[0])
    else:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        n, take = (x.shape[0] if isinstance(x, Tensor) and x.ndim >= 1 else 0), (lambda sl: x[sl])
    if n == 0:
        raise DataError(
            f"expected inputs as a non-empty tensor/array of shape (n, ...), got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    modules = _resolve(model, names)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    in_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    calls: dict[str, list[Tensor]] = {n: [] for n in modules}
    axes: dict[str, list[int]] = {n: [] for n in modules}  # per call, over the batch just run
    last: list[nn.Module | None] = [None]  # the last channel-indexing module that finished (channels_first)

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if not isinstance(output, Tensor):
                raise DataError(f"module {name!r} returned {type(output).__name__}, not a tensor")
            out = output.detach()
            if channels_first:
                axis = _channel_axis(model, name, out.ndim, last[0])
                axes[name].append(axis)
                out = out if axis == 1 else out.movedim(axis, 1)
            calls[name].append(out.to(device=out_device, dtype=dtype or output.dtype, copy=True))

        return hook

    def remember(module: nn.Module, _inputs, _output) -> None:
        last[0] = module

    collected: dict[str, list[list[Tensor]]] = {n: [] for n in modules}
    # channel-indexing modules first: hooks run in the order registered, so a Linear layer sees itself
    handles = [m.register_forward_hook(remember) for m in model.modules()
               if channels_first and isinstance(m, LAST_AXIS_MODULES + FIRST_AXIS_MODULES)]
    handles += [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for sl in chunks(n, batch_size):
                for lst in (*calls.values(), *axes.values()):
                    lst.clear()
                last[0] = None
                model(to_device(take(sl), device, in_dtype))
                for n, lst in calls.items():
                    if not lst:
                        raise DataError(
                            f"module {n!r} was not called in the forward pass of "
                            f"{type(model).__name__}; choose a module that the forward pass uses"
                        )
                    collected[n].append(list(lst))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    out: dict[str, Tensor] = {}
    for n, per_batch in collected.items():
        k = len(per_batch[0])
        if any(len(b) != k for b in per_batch):
            raise DataError(f"module {n!r} was called a varying number of times per batch")
        if k == 1:
            out[n] = torch.cat([b[0] for b in per_batch])
        else:
            for i in range(k):
                out[f"{n}#{i}"] = torch.cat([b[i] for b in per_batch])
    found = {n if len(a) == 1 else f"{n}#{i}": axis for n, a in axes.items() for i, axis in enumerate(a)}
    return out, found


def channel_axes(
    model: nn.Module,
    x: Tensor | np.ndarray,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, int]:
    """{name: the channel axis (1 <= axis < ndim) of its output}, by the rule of the module docstring
    (a declared `channel_axis`, else the last channel-indexing module that ran before the output), from
    one forward pass over the first two examples of `x`; names and keys as in `extract_features` (default
    every nn.ReLU; `name#i` for a module called more than once per pass). Raises ConfigError naming a
    layer whose axis cannot be decided."""
    if is_stream(x):
        examples = as_examples(x, what="feature")
        x = examples.get(slice(0, min(2, len(examples))))[0]
    return _extract(model, x[:2], names, 2, device, "cpu", None, True)[1]

