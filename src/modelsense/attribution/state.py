"""Saved and reused attributor state: `Attributor.save(dir)`, `Attributor.load(dir, model, x, y)`,
`load_attributor(dir, model, x, y)`.

A fit costs curvature factors, eigenbases, trained or fine-tuned ensembles, Laplace samples; a saved
state lets another process score new test data without redoing them. The folder holds two files:

    attributor.json      format and version; `method`; `settings` (every setting of the method, see
                         below); `compute` (the compute options of the fit, for information);
                         `model`: likelihood, name / shape / dtype of every parameter and buffer, and
                         a SHA-256 of their values; `data`: N, the shape and dtype of one example and of
                         one label, and a SHA-256 of the training data (after the method's conversion
                         to the parameters' dtype); `state`: the fitted attributes; package versions
    state.safetensors    every tensor of `settings` and `state` (safetensors: no code runs at load)

Settings and state are nested dicts / lists / tuples of tensors, numbers, strings and None (JSON
with a reference into the tensor file per tensor); a modelsense dataclass setting (`train_config`) is
stored by its fields. Two kinds of setting cannot be stored: callables (`model_fn`) and optimizer
objects (`mpe`'s `optimizer`); they are used by `fit` only, are recorded as "a callable" / the type's
name, and come back as None from `load_attributor`.

Loading follows kronfluence's rule: the state is reused only for what it was computed with.
`att.load(dir, model, x_train, y_train)` refuses (ConfigError, naming each difference) another
method, any setting that differs from `att`'s (tensors compared by hash; two callables are taken as
equal), another model (parameter names, shapes, dtypes, then values) and other training data (N,
shapes, dtypes, then values); `load_attributor` builds the attributor from the stored settings and
checks model and data the same way. Compute options are free to differ: they do not change the
numbers. What derives cheaply and exactly from settings and model is rebuilt rather than stored:
the Gaussian projections (redrawn from their seed; their first columns are stored and compared, so
a torch that draws other numbers is refused), TracIn's checkpoint list (a setting), the matrix-free
curvature of `if-cg` / `if-lissa` (nothing fitted), the Linear-layer factorisation of grad-dot.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import numbers
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modelsense.errors import ConfigError

if TYPE_CHECKING:
    from modelsense.attribution.base import Attributor
    from modelsense.core.functional import FunctionalModel, Params

FORMAT = "modelsense.attributor"
VERSION = 1
CONFIG_FILE = "attributor.json"
TENSOR_FILE = "state.safetensors"


# -- fingerprints -------------------------------------------------------------------------------
def _digest(h: Any, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    h = hashlib.sha256()
    _digest(h, t)
    return h.hexdigest()


def model_fingerprint(model: FunctionalModel, params: Params) -> dict[str, Any]:
    """Likelihood, [name, shape, dtype] of every trained parameter and of every fixed tensor (buffers,
    frozen parameters), and a SHA-256 of all their values."""
    h = hashlib.sha256()
    out: dict[str, Any] = {"likelihood": model.likelihood}
    for group, tensors in (("parameters", params), ("fixed", model.fixed)):
        out[group] = [[n, list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()]
        for n, t in tensors.items():
            h.update(n.encode())
            _digest(h, t)
    out["sha256"] = h.hexdigest()
    return out


def data_fingerprint(x: Any, y: Any) -> dict[str, Any]:
    """N, the shape and dtype of one example and of one label, and a SHA-256 of (x, y).

    x, y: tensors, or the lazy `Rows` of a Dataset / DataLoader (read in batches, two passes; the same
    digest as the tensors they gather into). Dict / tuple inputs: each tensor in turn, per batch."""
    from modelsense.core.functional import chunks, input_tensors
    from modelsense.data.stream import Rows

    h = hashlib.sha256()
    if not isinstance(x, Rows):
        _digest(h, x)
        _digest(h, y)
        return {"n": len(x), "x_shape": list(x.shape[1:]), "x_dtype": str(x.dtype).removeprefix("torch."),
                "y_shape": list(y.shape[1:]), "y_dtype": str(y.dtype).removeprefix("torch."), "sha256": h.hexdigest()}
    n = len(x)
    x0, y0 = x[0:1], y[0:1]
    shape = list(x0.shape[1:]) if isinstance(x0, Tensor) else [list(t.shape[1:]) for t in input_tensors(x0)]
    dtype = str(x0.dtype).removeprefix("torch.") if isinstance(x0, Tensor) else [
        str(t.dtype).removeprefix("torch.") for t in input_tensors(x0)]
    for side, first in ((x, x0), (y, y0)):
        for k, t0 in enumerate(input_tensors(first)):
            h.update(f"{t0.dtype}{(n, *t0.shape[1:])}".encode())
            for s in chunks(n, 1024):
                t = input_tensors(side[s])[k].detach().to("cpu").contiguous()
                h.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"n": n, "x_shape": shape, "x_dtype": dtype, "y_shape": list(y0.shape[1:]),
            "y_dtype": str(y0.dtype).removeprefix("torch."), "sha256": h.hexdigest()}


# -- nested values <-> JSON + a flat dict of tensors ---------------------------------------------
def pack(value: Any, key: str, tensors: dict[str, Tensor] | None) -> Any:
    """`value` as JSON: scalars as themselves, containers and tensors as one-key tagged objects.

    tensors: where a tensor goes under `key` (its path); None describes it only (shape, dtype, hash).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Tensor):
        node: dict[str, Any] = {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                                           "sha256": tensor_digest(value)}}
        if tensors is not None:
            t = value.detach().to("cpu").contiguous()
            if any(
                t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in tensors.values() if s.numel()
            ):
                t = t.clone()  # safetensors refuses two names on one storage
            tensors[key] = t
            node["key"] = key
        return node
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else {"float": repr(float(value))}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"cannot save {key}: a dict with keys other than strings")
        return {"dict": {k: pack(v, f"{key}/{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [pack(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
        return {"list": items} if isinstance(value, list) else {"tuple": items}
    if is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields_ = {f.name: getattr(value, f.name) for f in fields(value)}
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": pack(fields_, key, tensors)}
    if callable(value):
        return {"callable": True}
    return {"object": type(value).__qualname__}


NOT_STORED = object()


def unpack(node: Any, tensors: dict[str, Tensor], device: torch.device | str = "cpu") -> Any:
    """The value `pack` stored (tensors moved to `device`); NOT_STORED for a callable or an object."""
    if not isinstance(node, dict):
        return node
    tag, inner = next(iter(node.items()))
    if tag == "tensor":
        key = node.get("key")
        if key not in tensors:
            raise ConfigError(
                f"the saved state lacks tensor {key!r} in {TENSOR_FILE}; the folder is damaged, save again"
            )
        return tensors[key].to(device)
    if tag == "float":
        return float(inner)
    if tag == "dict":
        return {k: unpack(v, tensors, device) for k, v in inner.items()}
    if tag in ("list", "tuple"):
        items = [unpack(v, tensors, device) for v in inner]
        return items if tag == "list" else tuple(items)
    if tag == "dataclass":
        module, _, name = inner.partition(":")
        cls = getattr(importlib.import_module(module), name, None) if module.startswith("modelsense.") else None
        if cls is None or not is_dataclass(cls):
            raise ConfigError(f"the saved state holds a setting of type {inner}, which this modelsense does not have")
        return cls(**unpack(node["fields"], tensors, device))
    return NOT_STORED


def _described(node: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    """A packed value as {dotted path: comparable leaf} (tensors by shape, dtype and hash)."""
    if isinstance(node, dict):
        tag, inner = next(iter(node.items()))
        if tag == "tensor":
            out[path] = f"tensor {tuple(inner['shape'])} {inner['dtype']} sha256 {inner['sha256'][:12]}"
        elif tag == "dict":
            for k, v in inner.items():
                _described(v, f"{path}.{k}" if path else k, out)
            if not inner:
                out[path] = "{}"
        elif tag in ("list", "tuple"):
            out[f"{path}#len"] = len(inner)
            for i, v in enumerate(inner):
                _described(v, f"{path}.{i}", out)
        elif tag == "dataclass":
            out[f"{path}#type"] = inner
            _described(node["fields"], path, out)
        elif tag == "callable":
            out[path] = "a callable"
        elif tag == "object":
            out[path] = f"a {inner} object"
        else:
            out[path] = inner
    else:
        out[path] = node
    return out


def differences(stored: Any, now: Any, what: str) -> list[str]:
    """'path: now (saved: stored)' for every leaf of two packed values that differs."""
    a, b = _described(stored, "", {}), _described(now, "", {})
    missing = "(none)"
    return [
        f"{what} {k.removesuffix('#len').removesuffix('#type')}: {b.get(k, missing)!r} (saved: {a.get(k, missing)!r})"
        for k in sorted(set(a) | set(b), key=str)
        if a.get(k, missing) != b.get(k, missing)
    ]


# -- curvature operators ------------------------------------------------------------------------
def curvature_state(K: Any) -> dict[str, Any]:
    """What a fitted curvature operator of `modelsense.curvature` holds, as a nested dict of tensors."""
    from modelsense.curvature import (
        DenseCurvature,
        DiagonalCurvature,
        ImplicitCurvature,
        KroneckerCurvature,
        LowRankCurvature,
    )

    if isinstance(K, KroneckerCurvature):
        return {"kind": "kronecker", **K.fitted_state()}
    if isinstance(K, ImplicitCurvature):  # matrix-free: nothing fitted
        return {"kind": "implicit", "matrix": K.matrix, "reduction": K.reduction}
    if isinstance(K, DenseCurvature):
        return {"kind": "dense", "matrix": K.matrix, "K": K.K, "eigh": list(K.eigh)}
    if isinstance(K, DiagonalCurvature):
        return {"kind": "diag", "matrix": K.matrix, "diagonal": K.d}
    if isinstance(K, LowRankCurvature):
        return {"kind": "lowrank", "structure": K.structure, "matrix": K.matrix, "eigenvalues": K.lam,
                "eigenvectors": K.U, "residuals": K.residuals, "converged": K.converged}
    raise ConfigError(f"cannot save a curvature operator of type {type(K).__name__}")


def restore_curvature(state: dict[str, Any], model: FunctionalModel, x: Tensor, y: Tensor, params: Params,
                      seed: int, chunk_size: int = 256) -> Any:
    """The operator `curvature_state` described, bound to the model, its parameters and the data."""
    from modelsense.curvature import (
        DenseCurvature,
        DiagonalCurvature,
        ImplicitCurvature,
        KroneckerCurvature,
        LowRankCurvature,
    )
    from modelsense.curvature.lanczos import EigenDecomposition

    kind = state["kind"]
    if kind == "implicit":
        return ImplicitCurvature(model, x, y, state["matrix"], params, state["reduction"], chunk_size,
                                 torch.Generator().manual_seed(seed))
    if kind == "dense":
        K = DenseCurvature(state["K"], state["matrix"])
        K._eigh = tuple(state["eigh"])  # the eigendecomposition of the fit (the costly part), not redone
        return K
    if kind == "diag":
        return DiagonalCurvature(state["diagonal"], state["matrix"])
    if kind == "lowrank":
        eig = EigenDecomposition(state["eigenvalues"], state["eigenvectors"], state["residuals"], state["converged"])
        K = LowRankCurvature(eig, state["matrix"])
        if state["structure"] != K.structure:
            K.structure = state["structure"]  # "gram": the exact GGN / EF through its Gram matrix
        return K
    if kind == "kronecker":  # the factors of the fit, not refitted
        return KroneckerCurvature.from_fitted_state(state, model, x, y, params, chunk_size)
    raise ConfigError(f"the saved state holds a curvature of unknown kind {kind!r}")


# -- save and load ------------------------------------------------------------------------------
def _config_path(path: str | os.PathLike) -> Path:
    return Path(path) / CONFIG_FILE


def save_attributor(att: Attributor, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `att`'s settings and fitted state to the folder `path` (see the module docstring)."""
    from safetensors.torch import save_file

    from modelsense.runs import atomic_path, package_versions, write_json

    att._check_fitted()
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; save the attributor state into a folder")
    entries = sorted(p.name for p in path.iterdir()) if path.exists() else []
    if entries:
        if CONFIG_FILE not in entries:
            raise ConfigError(
                f"{path} holds other files ({', '.join(entries[:3])}); save the state into a new or empty folder"
            )
        if not overwrite:
            raise ConfigError(f"{path} already holds a saved attributor state; pass overwrite=True to replace it")
        foreign = [e for e in entries if e not in (CONFIG_FILE, TENSOR_FILE)]
        if foreign:
            raise ConfigError(f"{path} holds other files besides a saved state ({', '.join(foreign[:3])}); "
                              "save into a new or empty folder")
        (path / CONFIG_FILE).unlink()  # a crash before the new config is written leaves no stale pair
    tensors: dict[str, Tensor] = {}
    config = {
        "format": FORMAT, "version": VERSION, "method": att.name,
        "settings": pack(att.settings(), "settings", tensors),
        "compute": {f.name: getattr(att.compute, f.name) for f in fields(att.compute)},
        "model": model_fingerprint(att.model_, att.params_),
        "data": data_fingerprint(att.x_train_, att.y_train_),
        "state": pack(att._get_state(), "state", tensors),
        "versions": package_versions(),
    }
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / TENSOR_FILE) as temp:
        save_file(tensors, str(temp))
    write_json(path / CONFIG_FILE, config)
    return path


def read_saved(path: str | os.PathLike) -> dict[str, Any]:
    """The attributor.json of a saved state (ConfigError when `path` holds none)."""
    from modelsense.runs import read_json

    config_path = _config_path(path)
    if not config_path.is_file():
        raise ConfigError(
            f"{path} holds no saved attributor state (no {CONFIG_FILE}); save one with att.save({str(path)!r})"
        )
    config = read_json(config_path, "a saved attributor state")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{config_path} is not a saved attributor state")
    if config.get("version") != VERSION:
        raise ConfigError(f"{config_path} is a state of format version {config.get('version')}; this modelsense reads "
                          f"version {VERSION}: fit again")
    return config


def _model_differences(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    if saved["likelihood"] != now["likelihood"]:
        return f"its likelihood is {now['likelihood']!r}, the saved model's {saved['likelihood']!r}"
    for group in ("parameters", "fixed"):
        a, b = {n: (s, d) for n, s, d in saved[group]}, {n: (s, d) for n, s, d in now[group]}
        if set(a) != set(b):
            extra, lacks = sorted(set(b) - set(a)), sorted(set(a) - set(b))
            return (f"its {group} differ by name: {'extra ' + ', '.join(extra[:3]) if extra else ''}"
                    f"{'; ' if extra and lacks else ''}{'missing ' + ', '.join(lacks[:3]) if lacks else ''}")
        for n, (shape, dtype) in a.items():
            if (shape, dtype) != b[n]:
                return f"{n} has shape {tuple(b[n][0])} {b[n][1]}, the saved model's {tuple(shape)} {dtype}"
    if saved["sha256"] != now["sha256"]:
        return "its parameter values differ (same names and shapes, another SHA-256)"
    return None


def _data_differences(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    for key, what in (("n", "examples"), ("x_shape", "example shape"), ("x_dtype", "input dtype"),
                      ("y_shape", "label shape"), ("y_dtype", "label dtype")):
        if saved[key] != now[key]:
            return f"{what} {now[key]} (saved: {saved[key]})"
    if saved["sha256"] != now["sha256"]:
        return f"the same number ({now['n']}) and shape of examples with other values (another SHA-256)"
    return None


def load_state(att: Attributor, path: str | os.PathLike, model: Any, x_train: Any, y_train: Tensor | None = None,
               check_settings: bool = True, adapter: Any = None) -> None:
    """Restore the state saved in `path` into the unfitted or fitted `att` (see the module docstring)."""
    from safetensors.torch import load_file

    config = read_saved(path)
    if config["method"] != att.name:
        raise ConfigError(f"{path} holds a state of method {config['method']!r}, not {att.name!r}")
    if check_settings:
        diff = differences(config["settings"], pack(att.settings(), "settings", None), "setting")
        if diff:
            raise ConfigError(f"{path} was fitted with other settings: {'; '.join(diff)}; use the saved settings "
                              "(load_attributor reads them) or fit again")
    before = dict(vars(att))
    try:
        att._bind(model, x_train, y_train, adapter)
        problem = _model_differences(config["model"], model_fingerprint(att.model_, att.params_))
        if problem:
            raise ConfigError(f"{path} was fitted on another model: {problem}")
        problem = _data_differences(config["data"], data_fingerprint(att.x_train_, att.y_train_))
        if problem:
            raise ConfigError(f"{path} was fitted on other training data: {problem}")
        tensor_path = Path(path) / TENSOR_FILE
        if not tensor_path.is_file():
            raise ConfigError(f"{path} lacks {TENSOR_FILE}; the folder is damaged, save the state again")
        tensors = load_file(str(tensor_path))
        device = next(iter(att.params_.values())).device
        att._set_state(unpack(config["state"], tensors, device))
    except BaseException:
        for k in set(vars(att)) - set(before):  # leave `att` as it was (unfitted, or its previous fit)
            delattr(att, k)
        vars(att).update(before)
        raise


def load_attributor(path: str | os.PathLike, model: Any, x_train: Any, y_train: Tensor | None = None,
                    compute: Any = None, adapter: Any = None) -> Attributor:
    """The attributor saved in `path`, built from its stored settings and restored for `model` and its
    training data (refused when they are not the ones it was fitted on). Settings that cannot be
    stored (callables, optimizer objects) are None. compute: `ComputeOptions` (default: the defaults)."""
    from safetensors.torch import load_file

    from modelsense.attribution.base import method_class

    config = read_saved(path)
    cls = method_class(config["method"])
    tensor_path = Path(path) / TENSOR_FILE
    tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    settings = unpack(config["settings"], tensors)
    settings = {k: (None if v is NOT_STORED else v) for k, v in settings.items()}
    unknown = sorted(set(settings) - set(cls.setting_names()))
    if unknown:
        raise ConfigError(f"{path} holds settings {unknown} that method {cls.name!r} does not take (saved by another "
                          "modelsense version); fit again")
    att = cls(**settings, compute=compute)
    load_state(att, path, model, x_train, y_train, check_settings=False, adapter=adapter)
    return att
