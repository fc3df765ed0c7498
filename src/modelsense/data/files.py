"""Readers for datasets stored in files: IDX (MNIST, Fashion-MNIST), CIFAR-10 pickle batches,
`.npz` and `.csv`.

Each reader checks the file format itself (magic numbers, sizes, keys, columns) and raises
`DataError` naming the file and the fix; the generic array checks live in `validation.py`.
Readers return raw numpy arrays; the normalisation of the image datasets is done by the
`load_*_arrays` functions, exactly as in the original MPE code: pixels / 255, then
(x - mean) / std per channel.
"""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.data.validation import (
    check_class_count,
    check_features,
    check_labels,
    plain,
    row_location,
)
from modelsense.errors import DataError

# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

#: IDX type code (third byte of the magic number) -> big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: The four IDX files of MNIST and Fashion-MNIST (each may also be gzipped as NAME.gz).
IDX_FILES: dict[str, str] = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

#: Per-dataset normalisation (mean, std) per channel, after scaling pixels to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

#: Sub-folders of `data_dir` searched besides `data_dir` itself (torchvision's layout first).
IDX_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw", "mnist"),
    "fmnist": ("FashionMNIST/raw", "fmnist", "fashion-mnist"),
}

FMNIST_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"could not read {path}: {err}; the file is damaged or truncated, "
                        "download it again.") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a native-endian numpy array.

    Format: magic number 0x00 0x00 TYPE NDIM, then NDIM big-endian uint32 sizes, then the values
    in big-endian row-major order. TYPE is one of `IDX_DTYPES`.

    Raises:
        DataError: bad magic number, header or data size that disagree with the file length.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number.")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file: magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with "
            f"type TT in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}} and NN >= 1 dimensions); "
            "if it is gzipped, name it with a .gz suffix."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dimensions).")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: the header says shape {tuple(dims)} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header} bytes after the header; the file is truncated or damaged."
        )
    array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _missing_files_message(what: str, names: Sequence[str], searched: Sequence[Path], found: dict) -> str:
    lines = [f"could not find the {what} files {', '.join(names)} (each may end in .gz);",
             "searched:"]
    for d in searched:
        if not d.is_dir():
            lines.append(f"  {d} (no such directory)")
        else:
            have = found.get(d, [])
            lines.append(f"  {d} (found {', '.join(have) if have else 'none of them'})")
    return "\n".join(lines)


def find_files(
    data_dir: str | os.PathLike | None, names: Sequence[str], subdirs: Sequence[str], what: str,
    allow_gz: bool = True,
) -> dict[str, Path]:
    """Locate every file of `names` in one folder: `data_dir` or one of its `subdirs`.

    A name also matches NAME.gz when `allow_gz`. The first folder holding all of them wins.

    Raises:
        DataError: no data_dir given, or no folder holds every file (the message lists the
            expected names and, per folder searched, which ones were found).
    """
    if data_dir is None:
        raise DataError(
            f"{what} is read from files ({', '.join(names)}); pass the folder that holds them as "
            f"data_dir (CLI: --data-dir DIR) or set MODELSENSE_DATA_DIR."
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist (needed for {what}: {', '.join(names)}).")
    searched = [root] + [root / s for s in subdirs]
    found: dict[Path, list[str]] = {}
    for d in searched:
        if not d.is_dir():
            continue
        paths = {}
        for name in names:
            for candidate in (d / name, d / f"{name}.gz") if allow_gz else (d / name,):
                if candidate.is_file():
                    paths[name] = candidate
                    break
        if len(paths) == len(names):
            return paths
        found[d] = [p.name for p in paths.values()]
    raise DataError(_missing_files_message(what, names, searched, found))


def load_idx_arrays(data_dir: str | os.PathLike | None, dataset: str) -> dict[str, Any]:
    """MNIST or Fashion-MNIST from IDX files, images (n, 1, H, W) float32 normalised.

    x = (pixel / 255 - mean) / std with `NORMALIZATION[dataset]`; labels int64 in 0..9.

    Returns:
        dict with x_train, y_train, x_test, y_test, num_classes (10), source (the folder), and
        normalization ({"mean": [...], "std": [...]}).
    """
    what = {"mnist": "MNIST", "fmnist": "Fashion-MNIST"}[dataset]
    paths = find_files(data_dir, list(IDX_FILES.values()), IDX_SUBDIRS[dataset], what)
    arrays = {key: read_idx(paths[name]) for key, name in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xp, yp = paths[IDX_FILES[f"x_{split}"]], paths[IDX_FILES[f"y_{split}"]]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{xp} must hold uint8 images of shape (n, height, width), got "
                            f"{x.dtype} of shape {x.shape}; is this the images file?")
        if y.ndim != 1:
            raise DataError(f"{yp} must hold one label per image (1-D), got shape {y.shape}; "
                            "is this the labels file?")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{xp} holds {x.shape[0]} images but {yp} holds {y.shape[0]} labels; "
                            "the two files do not belong together.")
    mean, std = NORMALIZATION[dataset]
    out: dict[str, Any] = {"num_classes": 10, "source": str(paths[IDX_FILES["x_train"]].parent),
                           "normalization": {"mean": list(mean), "std": list(std)}}
    for split in ("train", "test"):
        x = arrays[f"x_{split}"].astype(np.float32)[:, None]
        x /= 255.0
        x -= np.float32(mean[0])
        x /= np.float32(std[0])
        out[f"x_{split}"] = x
        out[f"y_{split}"] = arrays[f"y_{split}"]
    if dataset == "fmnist":
        out["class_names"] = list(FMNIST_CLASS_NAMES)
    return out


# --------------------------------------------------------------------------------------------
# CIFAR-10 python pickle batches

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, nothing that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """One CIFAR python batch as a dict with str keys (`data`, `labels`, ...).

    Loaded with a restricted unpickler that only builds numpy arrays and plain containers.
    """
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError) as err:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({err}); use the files of "
                        "cifar-10-python.tar.gz.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch: it holds a {type(obj).__name__}, "
                        "not a dict with 'data' and 'labels'.")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_batch(path)
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing} (found {sorted(batch)}); a CIFAR-10 "
                        "batch holds 'data' (n, 3072) uint8 and 'labels'.")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8 of shape (n, 3072), got {data.dtype} of shape "
                        f"{data.shape}.")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: 'labels' must hold one label per image ({data.shape[0]}), got shape "
                        f"{labels.shape}.")
    return data, labels


def load_cifar10_arrays(data_dir: str | os.PathLike | None) -> dict[str, Any]:
    """CIFAR-10 from `data_batch_1..5` and `test_batch`, images (n, 3, 32, 32) float32.

    x = (pixel / 255 - mean_c) / std_c per channel c with `NORMALIZATION["cifar10"]`.
    """
    names = list(CIFAR10_TRAIN_BATCHES) + [CIFAR10_TEST_BATCH]
    paths = find_files(data_dir, names, ("cifar-10-batches-py",), "CIFAR-10", allow_gz=False)
    train = [_cifar_batch_arrays(paths[n]) for n in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _cifar_batch_arrays(paths[CIFAR10_TEST_BATCH])
    mean, std = NORMALIZATION["cifar10"]
    mean_a = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_a = np.asarray(std, dtype=np.float32)[:, None, None]

    def to_images(data: np.ndarray) -> np.ndarray:
        x = data.reshape(-1, 3, 32, 32).astype(np.float32)
        x /= 255.0
        x -= mean_a
        x /= std_a
        return x

    out: dict[str, Any] = {
        "x_train": to_images(np.concatenate([d for d, _ in train])),
        "y_train": np.concatenate([l for _, l in train]),
        "x_test": to_images(test_x),
        "y_test": test_y,
        "num_classes": 10,
        "source": str(paths[CIFAR10_TEST_BATCH].parent),
        "normalization": {"mean": list(mean), "std": list(std)},
        "class_names": list(CIFAR10_CLASS_NAMES),
    }
    return out


# --------------------------------------------------------------------------------------------
# .npz and .csv

NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_TABLE_KEYS = ("X", "y")
#: Fraction of examples held out as the test split for files without a given split.
TEST_FRACTION = 0.2
#: random_state of that split (fixed, like `digits`, so one file always gives one split).
SPLIT_SEED = 0


def split_train_test(
    x: np.ndarray, y: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Stratified random split (sklearn `train_test_split`, test size ceil(fraction * n)).

    Falls back to an unstratified split when stratification is impossible (a class with one
    example, or fewer test slots than classes). Returns x_train, y_train, x_test, y_test and
    whether the split is stratified.
    """
    from sklearn.model_selection import train_test_split

    if x.shape[0] < 2:
        raise DataError(f"a train/test split needs at least 2 examples, got {x.shape[0]}.")
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                  stratify=y)
        return x_tr, y_tr, x_te, y_te, True
    except ValueError:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed)
        return x_tr, y_tr, x_te, y_te, False


def load_npz_arrays(path: Path) -> dict[str, Any]:
    """Arrays from a `.npz`: keys x_train, y_train, x_test, y_test, or X, y (then split).

    Optional keys: `num_classes` (scalar) and `class_names` (strings). Loaded with
    allow_pickle=False.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as err:
        raise DataError(f"could not read {path}: {err}.") from None
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path} is a single .npy array, not an .npz archive; save the arrays "
                        "together with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...).")
    if not head.startswith(b"PK"):
        raise DataError(f"could not read {path} as .npz (not a zip archive); write it with np.savez.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            wanted = [k for k in keys if k in NPZ_SPLIT_KEYS + NPZ_TABLE_KEYS + ("x", "num_classes", "class_names")]
            arrays = {k: npz[k] for k in wanted}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(f"{path} stores Python objects (object arrays); save plain numeric "
                            "arrays with np.savez(path, x_train=..., ...).") from None
        raise DataError(f"could not read {path} as .npz: {err}.") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"could not read {path} as .npz ({err}); write it with np.savez.") from None
    if "x" in arrays and "X" not in arrays:
        arrays["X"] = arrays.pop("x")
    out: dict[str, Any] = {"source": str(path)}
    if "num_classes" in arrays:
        nc = np.asarray(arrays["num_classes"])
        if nc.ndim != 0 or not np.issubdtype(nc.dtype, np.integer) or int(nc) < 1:
            raise DataError(f"{path}: 'num_classes' must be a positive integer scalar, got {plain(nc)}.")
        out["num_classes"] = int(nc)
    if all(k in arrays for k in NPZ_SPLIT_KEYS):
        out.update({k: arrays[k] for k in NPZ_SPLIT_KEYS})
        out["split"] = "given by the file"
    elif all(k in arrays for k in NPZ_TABLE_KEYS):
        x, y = _check_table(arrays["X"], arrays["y"], str(path), "X", "y", out.get("num_classes"))
        x_tr, y_tr, x_te, y_te, stratified = split_train_test(x, y)
        out.update(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
        out["split"] = _split_note(stratified)
    else:
        raise DataError(
            f"{path} holds the keys {keys}; expected either {list(NPZ_SPLIT_KEYS)} (a given split) or "
            f"{list(NPZ_TABLE_KEYS)} (split here, {TEST_FRACTION:.0%} test); save with e.g. "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
        )
    if "class_names" in arrays:
        out["class_names"] = [str(c) for c in np.asarray(arrays["class_names"]).ravel()]
    return out


def _check_table(x: np.ndarray, y: np.ndarray, where: str, x_name: str, y_name: str,
                 num_classes: int | None = None, lines: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The checks of `validation.check_arrays` on one table before it is split (so messages
    name the file's own arrays and rows; `lines`: the file line of each row of a text table)."""
    x = check_features(x, "", where, name=x_name, lines=lines)
    y = check_labels(y, "", num_classes, where, name=y_name, lines=lines)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x_name} and {y_name} in {where} have different lengths ({x.shape[0]} examples "
                        f"vs {y.shape[0]} labels); each example needs exactly one label.")
    given = num_classes is not None
    check_class_count(num_classes if given else int(y.max()) + 1, y.shape[0], where, labels=y_name,
                      given=given)
    return x, y


def _split_note(stratified: bool) -> str:
    kind = "stratified" if stratified else "unstratified (a class is too small to stratify)"
    return f"{kind} random split, {TEST_FRACTION:.0%} test, random_state={SPLIT_SEED}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_csv_arrays(path: Path, label_column: str = "label") -> dict[str, Any]:
    """Features and labels from a `.csv` with a header row and a `label` column.

    The first non-blank line must be a header naming the columns; a file whose first row holds
    only numbers is refused (it has no header, and which column holds the labels would be a
    guess). Blank lines are skipped. Every other column must be numeric; rows become examples of
    shape (n_columns - 1,); the table is split with `split_train_test`. Messages name a bad value
    as "row N of FILE (line L; rows are counted from 1 after the header)": N counts the data rows
    (header and blank lines not counted), L is the line of the file.
    """
    rows: list[list[str]] = []
    lines: list[int] = []  # line of the file where each kept row ends
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"could not read {path} as CSV: {err}.") from None
    if not rows:
        raise DataError(f"{path} is empty; expected a header row with a '{label_column}' column and "
                        "one row per example.")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        if all(_is_number(h) for h in header):
            shown = ", ".join(header[:5]) + (", ..." if len(header) > 5 else "")
            n = len(header) - 1
            names = [f"x{j}" for j in range(n)] if n <= 4 else ["x0", "x1", "...", f"x{n - 1}"]
            raise DataError(
                f"{path} has no header row: its first line holds only numbers ({shown}). A .csv "
                "dataset needs a first line naming the columns, with the class ids in a column named "
                f"'{label_column}' (when the last column holds them: {','.join(names + [label_column])}); "
                "add that line, or save the arrays as .npz with np.savez(path, X=..., y=...)."
            )
        close = [h for h in header if h.lower() == label_column]
        hint = f" (did you mean {close[0]!r}? names are case-sensitive)" if close else ""
        raise DataError(f"{path} has no '{label_column}' column{hint}; found columns {header}. Name "
                        f"the column holding the class ids '{label_column}'.")
    if header.count(label_column) > 1:
        raise DataError(f"{path} has more than one '{label_column}' column.")
    body, body_lines = rows[1:], lines[1:]
    if not body:
        raise DataError(f"{path} has a header but no data rows.")
    bad_rows = [i for i, r in enumerate(body) if len(r) != len(header)]
    if bad_rows:
        i = bad_rows[0]
        raise DataError(f"{row_location(i, '', str(path), body_lines)} has {len(body[i])} fields but "
                        f"the header has {len(header)} ({len(bad_rows)} such row(s)); every row needs "
                        "one value per column.")
    if len(header) < 2:
        raise DataError(f"{path} has only the '{label_column}' column; add at least one feature column.")
    table = np.asarray(body, dtype=str)
    label_at = header.index(label_column)
    columns = {}
    for j, name in enumerate(header):
        cells = np.char.strip(table[:, j])
        try:
            columns[name] = cells.astype(np.float64)
        except ValueError:
            for i, cell in enumerate(cells):
                if not _is_number(cell):
                    what = "an empty cell" if cell == "" else f"{str(cell)!r}"
                    kind = "class ids" if j == label_at else "numbers"
                    raise DataError(
                        f"column {name!r} of {path} must hold {kind}, but it holds {what} at "
                        f"{row_location(i, '', str(path), body_lines)}; "
                        + ("encode classes as integers 0..K-1." if j == label_at else
                           "encode categorical features numerically or drop the column.")
                    ) from None
    feature_names = [h for h in header if h != label_column]
    x = np.stack([columns[h] for h in feature_names], axis=1)
    x, y = _check_table(x, columns[label_column], str(path), "the feature columns",
                        f"the {label_column!r} column", lines=body_lines)
    x_tr, y_tr, x_te, y_te, stratified = split_train_test(x, y)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "source": str(path),
            "split": _split_note(stratified), "feature_names": feature_names}
