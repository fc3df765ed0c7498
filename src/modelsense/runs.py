"""Run directories: where every computing command writes its results.

Layout of a run directory:
    config.json     everything needed to rerun (command, options, seeds, package versions)
    metrics.json    scalar summaries and small lists, and the run's `status`
    *.npy / *.npz   arrays; large matrices as memory-mapped .npy
    figures/*.png   figures
    run.log         a log of what happened
    .lock           held (flock) by the one process writing the run

A run directory holds one run. `RunDir.open` is the only way to start writing one; it

- refuses an `--out` that already holds anything, unless `resume` (a command that can continue; the
  stored config must match on the command's resume keys, and the outputs that are not resumable
  state are removed, so no stale result survives) or `overwrite` (which empties it first, and only
  empties a modelsense run directory);
- takes an exclusive lock, so two processes never write one folder;
- marks the run `running` in metrics.json and, when the command returns, `finished`; an exception
  marks it `failed`, Ctrl-C `interrupted` (`RunInterrupted` says what was kept and how to continue);
  a process killed with -9 leaves `running` with no lock holder, which `run_status` reports as
  `crashed`. Nothing reads a run as finished unless its status says so (`require_finished`).

Every file is written to a temporary name and renamed into place (`atomic_write`), so a crash never
leaves a partial file under a final name; memory-mapped outputs are filled under a temporary name
and renamed when complete (`RunDir.memmap`). Files get mode 0666 minus the umask, as `open` would.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from modelsense.errors import ConfigError, ModelsenseError

#: a run's `status` in metrics.json
RUNNING, FINISHED, FAILED, INTERRUPTED, CRASHED = "running", "finished", "failed", "interrupted", "crashed"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
#: errno values that mean "no room to write"
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

_UMASK = os.umask(0)
os.umask(_UMASK)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `message` says what was kept and how to continue."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Interrupted(BaseException):
    """Ctrl-C in the command line, raised by its SIGINT handler instead of KeyboardInterrupt (which
    click would turn into a bare "Aborted!"); `message` says what was kept and how to continue."""

    def __init__(self, message: str = "interrupted: nothing was written") -> None:
        super().__init__(message)
        self.message = message


class DiskFull(ModelsenseError, OSError):
    """No space left (or a file-size limit reached) while writing a run."""


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
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
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


# -- atomic files ---------------------------------------------------------------------------------
def _no_space(exc: OSError, path: Path) -> DiskFull:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return DiskFull(f"could not write {path}: {os.strerror(exc.errno)} ({free / 2**20:.1f} MiB free there); "
                    "free some space (or raise the file-size limit), then run again")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without error, give it the mode a
    new file gets and rename it onto `path` (else remove it). Full disks raise `DiskFull`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_UMASK)
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        full = _space_error(exc)
        if full is not None and not isinstance(exc, DiskFull):
            raise _no_space(full, path) from exc
        raise


def _space_error(exc: BaseException | None) -> OSError | None:
    """The no-space OSError behind `exc` (writers such as torch.save re-raise it as another error)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any]) -> None:
    """Call `writer(file)` on a temporary binary file next to `path`, then rename it onto `path`."""
    with atomic_path(path) as temp, open(temp, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically (dataclasses, arrays, tensors, paths made plain; NaN null)."""
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str | None = None) -> Any:
    """Read a JSON file; a damaged one is a `ConfigError` that names it (`what` says what it is)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is damaged ({what or 'not valid JSON'}: {exc}); restore it or start the run "
                          "again with --overwrite") from None


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` to a temporary file renamed onto `path`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = _jsonable(v)
    return out


def config_differences(
    stored: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str] | None = None
) -> list[str]:
    """'key: new (stored old)' for every (dotted) setting under `keys` that differs."""
    keys = list(new) if keys is None else list(keys)
    old = flatten({k: stored.get(k) for k in keys})
    now = flatten({k: _jsonable(new.get(k)) for k in keys})
    return [
        f"{k} {now.get(k)!r} (stored {old.get(k)!r})" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)
    ]


# -- status of a run directory -------------------------------------------------------------------
def _lock_is_held(path: Path) -> bool:
    lock = path / LOCK_FILE
    if not lock.exists():
        return False
    try:
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def run_status(path: str | os.PathLike) -> str | None:
    """The status of the run in `path`: finished, running (a live process holds it), crashed (marked
    running but no process holds it: killed), failed, interrupted; None when `path` holds no run.
    Runs written before statuses existed count as finished when they hold a metrics.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    metrics = path / "metrics.json"
    if not metrics.is_file():
        return RUNNING if _lock_is_held(path) else CRASHED
    try:
        status = json.loads(metrics.read_text()).get("status", FINISHED)
    except (ValueError, UnicodeDecodeError, AttributeError):
        return FAILED
    if status == RUNNING and not _lock_is_held(path):
        return CRASHED
    return status


def require_finished(path: str | os.PathLike, what: str) -> None:
    """Raise unless the run directory `path` (if it is one) finished; `what` names what is read."""
    status = run_status(path)
    if status in (None, FINISHED):
        return
    why = {RUNNING: "is still running", CRASHED: "did not finish (its process was killed)",
           FAILED: "failed", INTERRUPTED: "was interrupted"}.get(status, f"has status {status!r}")
    raise ConfigError(f"{what} belongs to the run in {path}, which {why}; finish it (--resume where the command "
                      "can) or run it again before using its results")


def finished_metrics(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metrics of the finished run in `path` (without its status), None when it did not finish."""
    if run_status(path) != FINISHED:
        return None
    metrics = RunDir(path).read_metrics()
    metrics.pop("status", None)
    return metrics


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold the exclusive lock of the folder `path` (created if missing) for the block; a folder
    another process holds is a `ConfigError` (e.g. a shared zoo another command is training into)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "ab")
    except OSError as exc:
        raise ConfigError(f"cannot write the {what} {path}: {exc.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"the {what} {path} is in use by another modelsense process; wait for it") from None
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _entries(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK_FILE] if path.is_dir() else []


class RunDir:
    """A run directory (see the module docstring). `RunDir(path)` reads one; `RunDir.open` writes one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.status: str | None = None
        self._lock: IO[bytes] | None = None
        self._metrics: dict[str, Any] = {}

    # -- opening --------------------------------------------------------------------------------
    @staticmethod
    def check_out(path: str | os.PathLike, command: str, config: Mapping[str, Any] | None = None, *,
                  resume: bool = False, overwrite: bool = False, resume_keys: Sequence[str] | None = None,
                  resumable: bool = False, _locked: bool = False) -> None:
        """Raise `ConfigError` unless a run of `command` may be written to `path` (reads only).

        Args:
            config: the new run's config (compared with the stored one on `resume_keys` when resuming).
            resumable: whether the command can continue a run (`resume` is refused otherwise).
        """
        path = Path(path)
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                              "--overwrite empties it first")
        if resume and not resumable:
            raise ConfigError(f"`{command}` cannot continue a run (--resume); use --overwrite to start again")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} exists and is not a directory; choose a directory")
        entries = _entries(path)
        if not entries:
            return
        if not (path / "config.json").is_file():
            raise ConfigError(f"--out {path} holds files that are not a modelsense run; choose an empty or new "
                              "directory (it is never emptied, even with --overwrite)")
        stored = read_json(path / "config.json", "the config of the run there")
        stored_command = stored.get("command") if isinstance(stored, dict) else None
        status = run_status(path)
        if status == RUNNING and _locked:  # the lock is ours: the run that marked it running is gone
            status = CRASHED
        if status == RUNNING:
            raise ConfigError(f"--out {path} is in use by another modelsense process (a running "
                              f"'{stored_command}' run); wait for it or choose another --out")
        if overwrite:
            return
        if not resume:
            hint = " or --resume to continue it" if resumable and stored_command == command else ""
            raise ConfigError(f"--out {path} already holds a {status} '{stored_command}' run; pass --overwrite to "
                              f"replace it{hint}, or choose another --out")
        if stored_command != command:
            raise ConfigError(f"--out {path} holds a '{stored_command}' run, not '{command}'; it cannot be resumed "
                              "by this command: choose another --out")
        diff = config_differences(stored, dict(config or {}), resume_keys)
        if diff:
            raise ConfigError(f"--resume: these options differ from the run in {path}: {'; '.join(diff)}; use the "
                              "run's settings to continue it, or another --out")

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | os.PathLike, command: str, config: Mapping[str, Any], *, resume: bool = False,
             overwrite: bool = False, resume_keys: Sequence[str] | None = None, keep: Sequence[str] = (),
             continue_hint: str | None = None) -> Iterator[RunDir]:
        """Start (or continue) the run of `command` in `path`, with `config` as its config.json.

        Checks `path` (`check_out`), locks it, empties it for `overwrite`, removes every entry but
        `keep` (the resumable state) for `resume`, writes config.json and marks the run running; the
        block's end marks it finished, an exception failed, Ctrl-C interrupted (re-raised as
        `RunInterrupted`). A command can resume iff it gives `keep` or `continue_hint`.

        Args:
            resume_keys: the top-level config keys that must equal the stored run's to resume.
            keep: names of entries kept on resume (e.g. "chunks", "store.json").
            continue_hint: what the interrupt message says to do (default: the same command with --resume).
        """
        resumable = bool(keep) or continue_hint is not None
        cls.check_out(path, command, config, resume=resume, overwrite=overwrite, resume_keys=resume_keys,
                      resumable=resumable)
        run = cls(path)
        created = not run.path.exists()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            run._lock = open(run.path / LOCK_FILE, "ab")
        except OSError as exc:
            raise ConfigError(
                f"cannot write --out {run.path}: {exc.strerror}; choose a directory you can write"
            ) from None
        try:
            fcntl.flock(run._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            run._lock.close()
            raise ConfigError(f"--out {run.path} is in use by another modelsense process; wait for it or choose "
                              "another --out") from None
        try:
            # checked again under the lock: another process may have written there meanwhile
            cls.check_out(path, command, config, resume=resume, overwrite=overwrite, resume_keys=resume_keys,
                          resumable=resumable, _locked=True)
            for entry in _entries(run.path):
                if overwrite or (resume and entry.name not in keep and entry.name not in ("config.json", "run.log")):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            previous = run.read_config() if resume else None
            run._write_config(command, config, previous)
            run.status = RUNNING
            run._write_status()
            run.log(f"{'resumed' if previous else 'started'}: {' '.join(sys.argv)}")
        except BaseException:
            run._release()
            if created:
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        try:
            yield run
        except (KeyboardInterrupt, Interrupted) as exc:
            run._finish(INTERRUPTED, "interrupted (Ctrl-C)")
            hint = continue_hint or ("rerun the same command with --resume to continue from what finished"
                                     if resumable else "rerun with --overwrite to start again")
            kind = Interrupted if isinstance(exc, Interrupted) else RunInterrupted
            raise kind(f"interrupted: the unfinished run in {run.path} is marked interrupted; {hint}") from exc
        except BaseException as exc:
            run._finish(FAILED, f"{type(exc).__name__}: {exc}")
            raise
        else:
            run._finish(FINISHED)
        finally:
            run._release()

    def _write_config(self, command: str, config: Mapping[str, Any], previous: Mapping[str, Any] | None) -> None:
        full = {"command": command, "argv": sys.argv, "created": _dt.datetime.now().isoformat(timespec="seconds"),
                "versions": package_versions(), **config}
        if previous:
            full["created"] = previous.get("created", full["created"])
            full["resumed"] = [*previous.get("resumed", []), _dt.datetime.now().isoformat(timespec="seconds")]
        write_json(self.path / "config.json", full)

    def _write_status(self) -> None:
        write_json(self.path / "metrics.json", {**self._metrics, "status": self.status})

    def _finish(self, status: str, error: str | None = None) -> None:
        self.status = status
        if error:
            self._metrics["error"] = error
        with contextlib.suppress(OSError, ModelsenseError):  # a full disk must not hide the original error
            self._write_status()
            self.log(f"{status}{': ' + error if error else ''}")
            figures = self.path / "figures"
            if figures.is_dir() and not any(figures.iterdir()):
                figures.rmdir()

    def _release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # -- config and metrics -------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        p = self.path / "config.json"
        return read_json(p, "the config of the run") if p.exists() else None

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Replace metrics.json's results (the run's status stays)."""
        self._metrics = dict(metrics)
        if self.status:
            self._write_status()
        else:
            write_json(self.path / "metrics.json", self._metrics)

    def update_metrics(self, **metrics: Any) -> dict[str, Any]:
        self._metrics.update(metrics)
        self.write_metrics(self._metrics)
        return dict(self._metrics)

    def read_metrics(self) -> dict[str, Any]:
        p = self.path / "metrics.json"
        return read_json(p, "the metrics of the run") if p.exists() else {}

    # -- arrays and figures -------------------------------------------------------------------
    def _file(self, name: str, suffix: str) -> Path:
        return self.path / (name if name.endswith(suffix) else f"{name}{suffix}")

    def save_array(self, name: str, array: Any) -> Path:
        path = self._file(name, ".npy")
        arr = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
        atomic_write(path, lambda f: np.save(f, arr))
        return path

    def save_arrays(self, name: str, **arrays: Any) -> Path:
        path = self._file(name, ".npz")
        data = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in arrays.items()}
        atomic_write(path, lambda f: np.savez(f, **data))
        return path

    def save_torch(self, name: str, obj: Any) -> Path:
        path = self._file(name, ".pt")
        torch_save(path, obj)
        return path

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.path / (name if name.endswith((".npy", ".npz")) else f"{name}.npy"))

    @contextlib.contextmanager
    def memmap(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> Iterator[np.memmap]:
        """A memory-mapped .npy array (for matrices larger than memory), filled under a temporary name
        and renamed to `name` only when the block ends without error: a partial array never carries
        the final name. The disk space is reserved first, so a full disk is a clear `DiskFull` error
        up front instead of a SIGBUS while filling."""
        path = self._file(name, ".npy")
        dtype = np.dtype(dtype)
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + 4096
        free = shutil.disk_usage(self.path).free
        if need > free:
            raise DiskFull(f"{path.name} needs {need / 2**30:.2f} GiB but {self.path} has {free / 2**30:.2f} GiB free; "
                           "free space, choose another --out, or ask for fewer examples")
        with atomic_path(path) as temp:
            mm = np.lib.format.open_memmap(temp, mode="w+", dtype=dtype, shape=shape)
            with open(temp, "r+b") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(temp))
                except OSError as exc:
                    if exc.errno in NO_SPACE:
                        del mm
                        raise
                    # file systems without fallocate: the free-space check above stands
            try:
                yield mm
                mm.flush()
            finally:
                del mm

    def figure_path(self, name: str) -> Path:
        return self.path / "figures" / (name if name.endswith(".png") else f"{name}.png")

    def save_figure(self, fig: Any, name: str) -> Path:
        return save_figure(fig, self.figure_path(name))

    def log(self, message: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path / "run.log", "a") as f:
            f.write(f"{stamp} {message}\n")
