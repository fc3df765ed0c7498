"""Intermediate activations of any `nn.Module`, collected with forward hooks.

`extract_features(model, x)` runs `model` over the inputs `x` in batches (eval mode, no gradients)
and returns `{module name: activations}` with the outputs of the chosen modules stacked over all n
examples, shape (n, *output shape). By default the chosen modules are every `nn.ReLU` (the layers
Godfrey et al. 2022 compare and stitch at). Functional activations (`torch.relu(x)` inside
`forward`) are not modules and cannot be hooked: wrap them in an `nn.ReLU` to see them.

A module called more than once per forward pass (e.g. one `self.relu` reused inside a ResNet block)
yields one entry per call, named `name#0`, `name#1`, ...
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.core.functional import chunks, to_device
from modelsense.data.stream import as_examples, is_stream
from modelsense.errors import ConfigError, DataError


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

    Returns:
        dict name -> tensor (n, *module output shape), in the order of `names` (for a module called
        k > 1 times per forward pass: `name#0` ... `name#{k-1}`). Activations are copies, so later
        in-place operations of the model cannot change them.
    """
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

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if not isinstance(output, Tensor):
                raise DataError(f"module {name!r} returned {type(output).__name__}, not a tensor")
            out = output.detach().to(device=out_device, dtype=dtype or output.dtype, copy=True)
            calls[name].append(out)

        return hook

    collected: dict[str, list[list[Tensor]]] = {n: [] for n in modules}
    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for sl in chunks(n, batch_size):
                for lst in calls.values():
                    lst.clear()
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
    return out
