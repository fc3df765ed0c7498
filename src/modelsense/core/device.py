"""Checking a device option (`--device`) once, before any work starts.

`check_device("cuda")` on a CPU-only build of torch, or on a machine without a visible GPU, raises
`ConfigError` with one sentence saying why and what to do, instead of the traceback torch gives at
the first `.to(device)` deep inside training.
"""

from __future__ import annotations

import torch

from modelsense.errors import ConfigError


def check_device(device: str | torch.device, what: str = "device") -> str:
    """Return `device` as a string once torch can place a tensor there; ConfigError otherwise.

    `cpu` is always accepted. `cuda` / `cuda:K` need a torch build with CUDA, a visible GPU and
    K < the number of GPUs; `mps` needs the Metal backend; any other device type must accept a
    0-element tensor.
    """
    text = str(device).strip()
    if text == "cpu":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what} {text!r} is not a torch device; use cpu, cuda, cuda:0, ... or mps") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ConfigError(f"{what} {text}: CUDA is not available in this torch build (torch {torch.__version__} "
                              "is CPU-only); install a CUDA build of torch (https://pytorch.org/get-started/locally/) "
                              "or use --device cpu")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{what} {text}: torch has CUDA support but sees no GPU (torch.cuda.is_available() is "
                              "False: no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{what} {text}: only {n} GPU(s) visible (cuda:0 ... cuda:{n - 1})")
        return text
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{what} {text}: the MPS (Apple Metal) backend is not available here; use --device cpu")
        return text
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # any backend-specific failure becomes one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what} {text} cannot be used here ({first}); use --device cpu") from None
    return text
