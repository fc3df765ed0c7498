"""Checkpoint files: a model with what rebuilds it, and parameter snapshots.

A checkpoint (`save_model`) is a `torch.save`d dict of plain values and tensors, loadable with
`weights_only=True` (no pickled code runs on load):

    state_dict    the module's state
    model         the `ModelConfig` as a dict (architecture and its options)
    input_shape   one example's shape; num_classes: outputs
    dataset       the name of the dataset it was trained on; seed: its init seed

Files are written atomically (temporary name, then rename). A checkpoint inside a run directory is
used only when that run finished (`modelsense.runs.require_finished`).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsense.errors import ConfigError
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.runs import require_finished, torch_save

REQUIRED_KEYS = ("state_dict", "model", "input_shape", "num_classes")


def save_model(path: str | Path, module: nn.Module, model_cfg: ModelConfig, data: Any, seed: int) -> None:
    """Write a checkpoint that `load_model` rebuilds without other information (`data`: the dataset
    it was trained on, for its `name`, `input_shape` and `num_classes`)."""
    torch_save(path, {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                      "model": asdict(model_cfg), "input_shape": list(data.input_shape),
                      "num_classes": int(data.num_classes), "dataset": data.name, "seed": int(seed)})


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a missing, damaged or foreign file is a
    `ConfigError` naming it; a file inside an unfinished run directory is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    require_finished(path.parent, f"{what} {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():  # a pickled object, e.g. torch.save(model)
            raise ConfigError(
                f"{what} {path} holds pickled Python objects (such as a whole module saved with "
                "torch.save(model)), which modelsense does not unpickle; pass a model.pt written by "
                "`modelsense train` or `modelsense zoo` (tensors and plain values only)"
            ) from None
        raise ConfigError(
            f"{what} {path} cannot be read: it is damaged or not a PyTorch file "
            f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'UnpicklingError'})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{what} {path} cannot be read: it is damaged or not a PyTorch file ({first[:200]})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the unpickler fails in many ways on a foreign file (KeyError, ...)
        raise ConfigError(
            f"{what} {path} cannot be read: it is damaged or not a PyTorch file ({type(exc).__name__} while unpickling)"
        ) from None


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a module saved by `save_model`; returns (module in eval mode, checkpoint info)."""
    path = Path(path)
    ckpt = load_file(path)
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"{path} is not a modelsense checkpoint: it lacks {', '.join(missing)} (a model.pt written "
                          "by `modelsense train` or `modelsense zoo` holds the architecture beside the weights)")
    try:
        cfg = ModelConfig(**{**ckpt["model"], "widths": _tuple(ckpt["model"].get("widths"))})
        module = build_model_from_config(cfg, tuple(ckpt["input_shape"]), int(ckpt["num_classes"]),
                                         seed=ckpt.get("seed", 0))
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: the weights do not fit the architecture it names ({str(exc).splitlines()[0]})"
        ) from None
    return module.eval(), ckpt


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def load_weights(path: str | Path, module: nn.Module, what: str = "--weights") -> nn.Module:
    """Load a plain state_dict (a model trained elsewhere: `torch.save(model.state_dict(), path)`, or
    the `state_dict` of a modelsense checkpoint) into `module`; every key must match (names and shapes)."""
    state = load_file(path, what)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what} {path} is not a state_dict (a dict of tensors saved with "
                          "torch.save(model.state_dict(), path))")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} (the model's {tuple(own[k].shape)})" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = [
            f"missing {', '.join(missing[:8])}" if missing else "",
            f"unexpected {', '.join(extra[:8])}" if extra else "",
            f"other shapes: {'; '.join(shapes[:8])}" if shapes else "",
        ]
        raise ConfigError(f"{what} {path} does not fit the model: {'; '.join(p for p in parts if p)}; pass the "
                          "--model (and its options) these weights were trained for")
    module.load_state_dict(state)
    return module.eval()

