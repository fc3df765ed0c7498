"""Run directories: where every computing command writes its results.

Layout of a run directory:
    config.json     everything needed to rerun (command, options, seeds, package versions)
    metrics.json    scalar summaries and small lists
    *.npy / *.npz   arrays; large matrices as memory-mapped .npy
    figures/*.png   figures
    run.log         a log of what happened

Writes are atomic (a temporary file renamed into place), so a crash never leaves a half-written
file under a final name; `--resume` reads what finished runs left.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.errors import ConfigError


def package_versions() -> dict[str, str]:
    """Versions of modelsense and of the libraries whose numbers it depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("modelsense", "torch", "numpy", "scipy", "scikit-learn", "ivon-opt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else (1e308 if obj > 0 else -1e308)
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class RunDir:
    """A run directory (see the module docstring).

    Args:
        path: the directory; created if missing.
        resume: accept a directory that already holds a run of the same command (its config must
            match on every key in `must_match`); without it an existing non-empty run directory is an
            error, so results are never silently mixed.
    """

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a directory")
        self.resume = resume
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "figures").mkdir(exist_ok=True)

    # -- config and metrics -------------------------------------------------------------------
    def write_config(self, command: str, config: dict[str, Any]) -> dict[str, Any]:
        full = {
            "command": command,
            "argv": sys.argv,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "versions": package_versions(),
            **config,
        }
        write_json(self.path / "config.json", full)
        return full

    def read_config(self) -> dict[str, Any] | None:
        p = self.path / "config.json"
        return read_json(p) if p.exists() else None

    def check_resume(self, command: str, config: dict[str, Any], keys: list[str] | None = None) -> None:
        """Raise if this directory holds a different run than `config` (compared on `keys`)."""
        old = self.read_config()
        if old is None:
            return
        if old.get("command") != command:
            raise ConfigError(f"{self.path} holds a '{old.get('command')}' run, not '{command}'; choose another --out")
        for k in keys or list(config):
            if k in old and _jsonable(old[k]) != _jsonable(config.get(k)):
                raise ConfigError(
                    f"{self.path} holds a run with {k}={old[k]!r}, but this one has {k}={config.get(k)!r}; "
                    "use the same settings to resume, or another --out"
                )

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / "metrics.json", metrics)

    def update_metrics(self, **metrics: Any) -> dict[str, Any]:
        p = self.path / "metrics.json"
        current = read_json(p) if p.exists() else {}
        current.update(metrics)
        write_json(p, current)
        return current

    # -- arrays and figures -------------------------------------------------------------------
    def save_array(self, name: str, array: Any) -> Path:
        path = self.path / (name if name.endswith(".npy") else f"{name}.npy")
        arr = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def save_arrays(self, name: str, **arrays: Any) -> Path:
        path = self.path / (name if name.endswith(".npz") else f"{name}.npz")
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in arrays.items()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.path / (name if name.endswith((".npy", ".npz")) else f"{name}.npy"))

    def open_memmap(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.memmap:
        """A memory-mapped .npy array (for score matrices larger than memory)."""
        path = self.path / (name if name.endswith(".npy") else f"{name}.npy")
        mode = "r+" if path.exists() and self.resume else "w+"
        return np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)

    def figure_path(self, name: str) -> Path:
        return self.path / "figures" / (name if name.endswith(".png") else f"{name}.png")

    def save_figure(self, fig: Any, name: str) -> Path:
        path = self.figure_path(name)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path

    def log(self, message: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path / "run.log", "a") as f:
            f.write(f"{stamp} {message}\n")
