"""Inputs larger than memory: private, temporary memory-mapped .npy files.

A user's dataset (`--dataset file.py:make_data`) whose inputs take more than `IN_MEMORY_BYTES` is
read into a memory map (`scratch_array`) instead of RAM: a `.npy` file under `$MODELSENSE_SCRATCH`
(default: the system temp dir), named `modelsense_data_*.npy`, that never outlives the process: on
POSIX it is unlinked right after mapping (the pages stay valid until the last array that views them
is freed; the disk space is returned then), elsewhere it is removed once freed or at exit. The disk space is
checked (`shutil.disk_usage`, plus `DISK_MARGIN_BYTES`) and reserved before anything is written, so
a full disk is one clear `DataError` up front instead of a SIGBUS while filling.

Work on such arrays goes in row chunks of about `CHUNK_BYTES` (`row_chunks`), and `release` drops
the chunk's pages from the process's resident set after each one (the data stays in the file /
page cache), so reading or writing a mapped array does not make the process's RSS grow to its size.
`keep_rows` copies only the rows it keeps: into memory when they fit `IN_MEMORY_BYTES`, else into
another scratch map. Numbers are the same as on in-memory arrays: only where they live changes.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from modelsense.errors import DataError

#: Environment variable naming the folder of the temporary memory maps (default: the system temp dir).
SCRATCH_ENV = "MODELSENSE_SCRATCH"
#: Inputs above this many bytes (float32) go to a memory-mapped scratch file instead of RAM.
IN_MEMORY_BYTES = 2**30
#: Free disk space kept beyond the size of a scratch file (the map is refused when it would eat into it).
DISK_MARGIN_BYTES = 256 * 2**20
#: About how many bytes of rows one chunk of work on a mapped array touches.
CHUNK_BYTES = 64 * 2**20
#: File name prefix of the scratch maps (`is_scratch` recognises them by it).
PREFIX = "modelsense_data_"


def scratch_dir() -> str:
    """The folder of the scratch maps: `$MODELSENSE_SCRATCH`, else the system temp dir."""
    return os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()


class NoScratchRoom(DataError):
    """The scratch folder does not exist or has no room for a map (`scratch_array`); a caller that can do
    without the map (the attributors recompute instead of spilling) catches this one."""


def open_map(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """A new memory-mapped `.npy` file at `path` of `shape` and `dtype`, reading as zeros (a new file
    reads as zeros without touching its pages)."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)


def scratch_array(shape: tuple[int, ...], dtype: Any, what: str, *, folder: str | None = None,
                  prefix: str = PREFIX, margin: int | None = None, file_handle: bool = False) -> np.memmap:
    """A zero-filled, writable memory-mapped array of `shape` in a temporary file of `folder`
    (default `scratch_dir()`), named `<prefix>*.npy`.

    `what` names the data in messages. The file is unlinked at once on POSIX (elsewhere removed when
    the array is freed, or at exit), so it never outlives the process; the disk space (plus `margin`,
    default `DISK_MARGIN_BYTES`) is checked and reserved (`posix_fallocate`) first. With `file_handle`
    (POSIX) the array also gets `fd`, a descriptor of the file opened before the unlink and closed with
    the array, for `os.preadv` / `os.pwrite` through the page cache.

    Raises:
        NoScratchRoom: the folder does not exist, or it has less free space than the array plus
            `margin` -- before anything is written.
    """
    folder = scratch_dir() if folder is None else folder
    margin = DISK_MARGIN_BYTES if margin is None else margin
    dtype = np.dtype(dtype)
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + 4096
    fix = f"free space there or set ${SCRATCH_ENV} to a folder on a disk with room"
    if not os.path.isdir(folder):
        raise NoScratchRoom(f"{what} is memory-mapped under {folder} (${SCRATCH_ENV} or the temp dir), which is "
                            f"not a folder; create it or set ${SCRATCH_ENV} to one")
    free = shutil.disk_usage(folder).free
    if need + margin > free:
        raise NoScratchRoom(f"{what} takes {need / 2**30:.2f} GiB, more than the {IN_MEMORY_BYTES / 2**30:.2f} GiB "
                            f"held in memory, so it is memory-mapped under {folder}, which has {free / 2**30:.2f} GiB "
                            f"free ({margin / 2**20:.0f} MiB are kept free); {fix}")
    fd, path = tempfile.mkstemp(suffix=".npy", prefix=prefix, dir=folder)
    os.close(fd)
    try:
        mm = open_map(path, shape, dtype)
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
            except AttributeError:  # no posix_fallocate (not POSIX): the free-space check above stands
                pass
            except OSError as exc:
                if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                    del mm
                    raise NoScratchRoom(f"{what}: no room for its {need / 2**30:.2f} GiB memory map under "
                                        f"{folder}; {fix}") from None
        if file_handle and hasattr(os, "pread") and hasattr(os, "pwrite"):
            mm.fd = os.open(path, os.O_RDWR)
            weakref.finalize(mm, os.close, mm.fd)
    except BaseException:
        remove_quietly(path)
        raise
    try:
        os.unlink(path)
    except OSError:  # an open map cannot be removed on Windows: remove it once the array is freed, or at exit
        weakref.finalize(mm, remove_quietly, path)
    return mm


def remove_quietly(path: str) -> None:
    """Remove the file at `path` if it can be (a missing file or an open map on Windows is left alone)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _bases(x: Any) -> Iterator[Any]:
    while x is not None:
        yield x
        x = getattr(x, "base", None)


def is_mapped(x: Any) -> bool:
    """Whether the array `x` views a memory-mapped file."""
    return any(isinstance(b, mmap.mmap) for b in _bases(x))


def is_scratch(x: Any) -> bool:
    """Whether the array `x` views one of our private scratch maps (safe to change in place)."""
    return any(isinstance(b, np.memmap) and isinstance(b.filename, str) and
               os.path.basename(b.filename).startswith(PREFIX) for b in _bases(x))


def release(x: Any, rows: slice | None = None) -> None:
    """Drop the pages of the map under `x` from this process's resident set (a no-op for in-memory
    arrays): all of them, or with `rows` those of rows `rows` of `x` itself, a memory-mapped array. The
    data stays in the file: the next access reads it back (MADV_DONTNEED on a shared file mapping). A
    copy-on-write map (np.memmap mode "c") is left alone: its changes live only in its pages."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    if rows is not None:
        raw = getattr(x, "_mmap", None)
        if raw is None or getattr(x, "mode", None) == "c" or rows.stop <= rows.start:
            return
        row_bytes = x.strides[0]
        first = x.offset % mmap.ALLOCATIONGRANULARITY + rows.start * row_bytes  # numpy maps from a granule boundary
        start = first - first % mmap.PAGESIZE
        raw.madvise(mmap.MADV_DONTNEED, start, first + (rows.stop - rows.start) * row_bytes - start)
        return
    for b in _bases(x):
        if isinstance(b, np.memmap) and b.mode == "c":
            return
        if isinstance(b, mmap.mmap):
            b.madvise(mmap.MADV_DONTNEED)
            return


def row_chunks(x: np.ndarray, n: int | None = None) -> Iterator[slice]:
    """Slices of about `CHUNK_BYTES` over the first axis of `x` (or over `n` rows shaped like x's)."""
    n = x.shape[0] if n is None else n
    row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def keep_rows(x: np.ndarray, index: np.ndarray, what: str) -> np.ndarray:
    """`x[index]` for an integer `index` (the rows kept by a subset or a class drop).

    In-memory `x`: plain fancy indexing. Memory-mapped `x`: the kept rows are copied in chunks,
    into memory when they take at most `IN_MEMORY_BYTES`, else into a new scratch map (`what` names
    them in messages), so nothing of the size of `x` is ever in memory."""
    if not is_mapped(x):
        return x[index]
    shape = (int(index.shape[0]), *x.shape[1:])
    nbytes = int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
    out = np.empty(shape, x.dtype) if nbytes <= IN_MEMORY_BYTES else scratch_array(shape, x.dtype, what)
    for s in row_chunks(x, shape[0]):
        out[s] = x[index[s]]
        release(x)
        release(out)
    return out


__all__ = ["CHUNK_BYTES", "DISK_MARGIN_BYTES", "IN_MEMORY_BYTES", "PREFIX", "SCRATCH_ENV", "NoScratchRoom", "is_mapped",
           "is_scratch", "keep_rows", "open_map", "release", "remove_quietly", "row_chunks", "scratch_array",
           "scratch_dir"]
