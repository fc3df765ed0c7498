"""One front door for every dataset: `load_dataset(name, ...)` and `DataConfig`.

Names: `digits`, `mnist1d`, `spirals` (no files needed), `mnist`, `fmnist`, `cifar10` (files from
`data_dir`), or a path to a `.npz` / `.csv` file. Names are case-insensitive (`MNIST`, `FMNIST`,
`CIFAR10` as in the MPE scripts work).

Order of work:
1. check the options (types, ranges) -- no IO;
2. resolve the name (unknown names, missing files and folders fail here);
3. read the arrays (format checks of the reader), then check them (`validation.check_arrays`:
   shapes, lengths, NaN/inf, integer labels in range, non-empty splits) and the options that
   depend on them (`validation.check_data_options`);
4. apply the options, in this order:
   a. `drop_classes`: remove those classes from both splits; the kept classes are relabelled by
      rank, new label k <-> old label `metadata["kept_classes"][k]` (an identity when the kept
      classes are already 0..K'-1, e.g. dropping the last class);
   b. `n_train`: a seeded stratified subset of the training set (every present class keeps at
      least one example, the rest in proportion to class sizes);
   c. `corruption_ratio`: round(r * n_train) training labels, chosen uniformly without
      replacement, each moved to a class drawn uniformly from the *other* classes;
   d. `standardize`: per-feature (per pixel for images) mean and std of the final training set,
      applied to both splits; a std of 0 becomes 1. `None` (the default) decides by the data:
      on for feature vectors read from a .npz/.csv file (examples of shape (d,), as tabular data
      needs: raw features on scales from 1e-3 to 1e4 make the default training recipe fail),
      off for the built-in datasets (each keeps its usual normalisation, see `datasets`) and
      for files of images or other multi-dimensional examples. True/False force it.

`seed` drives b and c only (independent streams, numpy `default_rng([seed, 1])` and
`default_rng([seed, 2])`); train/test splits that this module makes itself (digits, a `.npz`
with X/y, a `.csv`) use a fixed random_state=0 so one name always means one split.

Metadata written (always): `config` (the DataConfig as a dict; a file name as an absolute
path), `corrupted_indices` (sorted int64 tensor of positions in the returned `y_train` whose label
changed; empty without corruption), `split`; when they
apply: `kept_classes`, `train_indices` (int64 tensor, positions in the full training set as
loaded, when the training set is a strict subset), `test_indices` (same for the test split when
classes were dropped), `original_y_train` (labels before corruption, after relabelling),
`feature_mean` / `feature_std` (tensors of shape input_shape, when standardised), `normalization`
(the fixed per-channel mean/std of the image datasets), `class_names`, `feature_names` (csv);
and `standardize`: {"requested": None | bool, "applied": bool, "reason": str}, shown by
`Dataset.summary()` (so a run's config.json says what was done).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.data import builtin, files
from modelsense.data.dataset import Dataset
from modelsense.data.scratch import is_scratch, keep_rows
from modelsense.data.transforms import (
    class_keep_masks,
    corrupt_labels_symmetric,
    standardize_features,
    stratified_subset,
)
from modelsense.data.user import load_user_arrays
from modelsense.data.validation import check_arrays, check_data_options, check_options
from modelsense.errors import DataError
from modelsense.options import ints, joined, option
from modelsense.user import is_reference

#: Environment variable read when `data_dir` is None.
DATA_DIR_ENV = "MODELSENSE_DATA_DIR"
FILE_SUFFIXES = (".npz", ".csv")

_SUBSET_STREAM = 1
_CORRUPTION_STREAM = 2


@dataclass
class DataConfig:
    """Which dataset to load and the options applied to it (see `load_dataset`).

    Attributes:
        name: a built-in name (`available_datasets()`) or a path to a .npz/.csv file.
        data_dir: folder holding the files of `mnist`, `fmnist`, `cifar10` (and where relative
            .npz/.csv paths are also looked up); None reads $MODELSENSE_DATA_DIR.
        n_train: size of a stratified training subset; None keeps every training example.
        corruption_ratio: fraction in [0, 1] of training labels moved to another class.
        drop_classes: class ids removed from both splits.
        standardize: per-feature standardisation with training statistics: True, False, or None
            (automatic: on for feature vectors from a .npz/.csv file, off for built-in datasets
            and files of images; `Dataset.metadata["standardize"]` records what was done).
        seed: seed of the subset and the label corruption.
    """

    name: str = option("digits", "digits, mnist1d, spirals, mnist, fmnist, cifar10, or a path to a .npz/.csv file",
                       flag="--dataset", short="-d")
    data_dir: str | None = option(None, "directory with the MNIST/FMNIST IDX files or CIFAR-10 batches")
    n_train: int | None = option(None, "use a seeded stratified subset of this many training examples")
    corruption_ratio: float = option(0.0, "fraction of training labels flipped to another class (seeded)")
    drop_classes: tuple[int, ...] = option((), "comma-separated class labels to remove, e.g. 3,5", parse=ints,
                                           show=joined)
    standardize: bool | None = option(None, "standardise features with training-set mean and std; automatic where "
                                      "no default is shown: on for feature vectors from a .npz/.csv file, off for "
                                      "built-in datasets and images (they keep their usual normalisation)",
                                      flag="--standardize/--no-standardize")
    seed: int = option(0, "seed of subsetting, splitting and label corruption", flag="--data-seed")

    def __post_init__(self) -> None:
        self.drop_classes = tuple(int(c) for c in self.drop_classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for config.json)."""
        out = dataclasses.asdict(self)
        out["drop_classes"] = list(self.drop_classes)
        out["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        return out


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in dataset: its standard sizes and how to read it."""

    name: str
    n_train: int
    n_test: int
    input_shape: tuple[int, ...]
    num_classes: int
    source: str
    read: Callable[[str | None], dict[str, Any]]
    normalization: str
    aliases: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    subdirs: tuple[str, ...] = ()
    generated: bool = False  # sizes are exact and known without reading anything


_IMAGE_NORMALIZATION = "pixels / 255, then the usual per-channel mean and std"

_BUILTINS: tuple[DatasetInfo, ...] = (
    DatasetInfo("digits", 1297, 500, (1, 8, 8), 10,
                "sklearn load_digits (bundled)",
                lambda data_dir: builtin.load_digits_arrays(), "pixels / 16, in [0, 1]", generated=True),
    DatasetInfo("mnist1d", 4000, 1000, (40,), 10,
                "mnist1d package, generated offline",
                lambda data_dir: builtin.load_mnist1d_arrays(), "standardised by its generator",
                aliases=("mnist-1d", "mnist_1d"),
                generated=True),
    DatasetInfo("spirals", 2000, 1000, (2,), 2,
                "two spirals, generated (Maddox et al. 2020 notebooks)",
                lambda data_dir: builtin.load_spirals_arrays(), "raw coordinates, within about ±20",
                aliases=("two-spirals", "two_spirals"), generated=True),
    DatasetInfo("mnist", 60000, 10000, (1, 28, 28), 10,
                "IDX files in --data-dir (or its MNIST/raw)",
                lambda data_dir: files.load_idx_arrays(data_dir, "mnist"), _IMAGE_NORMALIZATION,
                files=tuple(files.IDX_FILES.values()), subdirs=files.IDX_SUBDIRS["mnist"]),
    DatasetInfo("fmnist", 60000, 10000, (1, 28, 28), 10,
                "IDX files in --data-dir (or its FashionMNIST/raw)",
                lambda data_dir: files.load_idx_arrays(data_dir, "fmnist"), _IMAGE_NORMALIZATION,
                aliases=("fashion-mnist", "fashion_mnist", "fashionmnist"),
                files=tuple(files.IDX_FILES.values()), subdirs=files.IDX_SUBDIRS["fmnist"]),
    DatasetInfo("cifar10", 50000, 10000, (3, 32, 32), 10,
                "python batches in --data-dir (or its cifar-10-batches-py)",
                lambda data_dir: files.load_cifar10_arrays(data_dir), _IMAGE_NORMALIZATION,
                aliases=("cifar-10", "cifar"),
                files=files.CIFAR10_TRAIN_BATCHES + (files.CIFAR10_TEST_BATCH,),
                subdirs=("cifar-10-batches-py",)),
)
_BY_NAME: dict[str, DatasetInfo] = {
    alias: info for info in _BUILTINS for alias in (info.name,) + info.aliases
}


def known_dataset_names() -> list[str]:
    """Canonical names of the built-in datasets."""
    return [info.name for info in _BUILTINS]


def _default_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    if data_dir is not None:
        return str(data_dir)
    return os.environ.get(DATA_DIR_ENV) or None


def _resolve(name: Any, data_dir: str | None) -> tuple[str, DatasetInfo | None, Path | None]:
    """(display name, built-in info or None, file path or None); raises DataError."""
    if not isinstance(name, (str, os.PathLike)) or str(name).strip() == "":
        raise DataError(f"dataset name must be a non-empty string, got {name!r}; "
                        f"known: {', '.join(known_dataset_names())}, or a path to a .npz/.csv file.")
    text = str(name).strip()
    info = _BY_NAME.get(text.lower())
    if info is not None:
        return info.name, info, None
    if is_reference(text):
        return text, None, None
    path = Path(text).expanduser()
    candidates = [path]
    if data_dir is not None and not path.is_absolute():
        candidates.append(Path(data_dir).expanduser() / path)
    if path.suffix.lower() in FILE_SUFFIXES:
        for candidate in candidates:
            if candidate.is_file():
                return path.stem, None, candidate
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is not None:
        raise DataError(_folder_message(folder))
    if path.suffix.lower() in FILE_SUFFIXES:
        looked = " or ".join(str(c) for c in candidates)
        raise DataError(f"dataset file {looked} does not exist; check the path (relative paths are "
                        "taken from the current folder, then from --data-dir).")
    if path.is_file():
        raise DataError(f"{path} has the unsupported type {path.suffix or '(no suffix)'!r}; save the "
                        "data as .npz (x_train, y_train, x_test, y_test or X, y) or as .csv with a "
                        "'label' column.")
    raise DataError(f"unknown dataset {text!r}; known: {', '.join(known_dataset_names())}; or give a "
                    "path to a .npz file (x_train, y_train, x_test, y_test or X, y) or a .csv file "
                    "(a 'label' column and numeric feature columns).")


def _folder_message(folder: Path) -> str:
    """What to say when the dataset name is a folder: what is expected, and what the folder
    holds that could be meant (the files of a built-in dataset, .npz/.csv files)."""
    text = (f"{folder} is a folder, not a dataset; the dataset is a built-in name "
            f"({', '.join(known_dataset_names())}) or the path of one .npz/.csv file")
    for info in _BUILTINS:
        if not info.files:
            continue
        try:
            files.find_files(folder, list(info.files), info.subdirs, info.name,
                             allow_gz=info.name != "cifar10")
        except DataError:
            continue
        return (f"{text}. It holds the {info.name} files: load them by name with the folder as "
                f"data_dir (CLI: --dataset {info.name} --data-dir {folder}).")
    inside = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in FILE_SUFFIXES)[:5]
    if inside:
        return f"{text}; it holds {', '.join(inside)}: pass one of those files."
    return f"{text}; the folders of mnist, fmnist and cifar10 files are given as data_dir (CLI: --data-dir)."


def standardize_choice(requested: bool | None, info: DatasetInfo | None,
                       input_shape: tuple[int, ...]) -> tuple[bool, str]:
    """Whether to standardise, and why: `requested` when True/False; None decides by the data
    (on for feature vectors read from a file, off for built-in datasets and files of images or
    other multi-dimensional examples)."""
    if requested is not None:
        return requested, "requested" if requested else "turned off"
    if info is not None:
        return False, f"automatic: off, {info.name} keeps its usual normalisation ({info.normalization})"
    if len(input_shape) == 1:
        return True, "automatic: feature vectors from a file, standardised with the training set's mean and std"
    return False, (f"automatic: off, the file holds examples of shape {tuple(input_shape)} (images or "
                   "signals keep their values); standardize=True standardises every entry")


def load_dataset(
    name: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    n_train: int | None = None,
    corruption_ratio: float = 0.0,
    drop_classes: Sequence[int] = (),
    standardize: bool | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset and apply the options (order and metadata: see the module docstring).

    Args:
        name: `digits`, `mnist1d`, `spirals`, `mnist`, `fmnist`, `cifar10`, or a path to a .npz/.csv.
        data_dir: folder with the dataset files (None: $MODELSENSE_DATA_DIR).
        n_train: stratified training subset size; None for all.
        corruption_ratio: fraction of training labels to move to another class.
        drop_classes: class ids to remove from both splits.
        standardize: per-feature standardisation with training mean/std; None (default) decides
            by the data (`standardize_choice`: on for feature vectors from a .npz/.csv file).
        seed: seed of the subset and the corruption.

    Returns:
        A `Dataset` with float32 features (n, *input_shape) and int64 labels in 0..K-1.

    Raises:
        DataError: bad options, unknown name, missing or malformed files, invalid arrays --
            always before any option is applied.

    Example:
        >>> ds = load_dataset("digits", n_train=200, corruption_ratio=0.1, seed=3)
        >>> ds.n_train, ds.input_shape, len(ds.metadata["corrupted_indices"])
        (200, (1, 8, 8), 20)
    """
    n_train, corruption_ratio, drop, standardize, seed = check_options(
        n_train, corruption_ratio, drop_classes, standardize, seed
    )
    data_dir = _default_data_dir(data_dir)
    display, info, path = _resolve(name, data_dir)
    if info is not None and info.generated:
        # sizes are known: fail before generating anything
        stand_in = np.arange(info.n_train) % info.num_classes
        check_data_options(stand_in, info.num_classes, None if drop else n_train,
                           corruption_ratio, drop, display)
    if info is not None:
        raw = info.read(data_dir)
    elif path is None:
        raw = load_user_arrays(display)
    elif path.suffix.lower() == ".npz":
        raw = files.load_npz_arrays(path)
    else:
        raw = files.load_csv_arrays(path)

    x_train, y_train, x_test, y_test, num_classes = check_arrays(
        raw["x_train"], raw["y_train"], raw["x_test"], raw["y_test"], raw.get("num_classes"),
        where=raw["source"],
    )
    check_data_options(y_train, num_classes, n_train, corruption_ratio, drop, display)
    config = DataConfig(display if path is None else str(path.resolve()), data_dir, n_train,
                        corruption_ratio, drop, standardize, seed)
    metadata: dict[str, Any] = {"config": config.to_dict(), "split": raw.get("split", "given")}
    applied, reason = standardize_choice(standardize, info, x_train.shape[1:])
    metadata["standardize"] = {"requested": standardize, "applied": applied, "reason": reason}
    for key in ("normalization", "class_names", "feature_names"):
        if key in raw:
            metadata[key] = raw[key]

    full_train = y_train.shape[0]
    train_positions = np.arange(full_train)
    if drop:
        keep_train, keep_test, kept, lookup = class_keep_masks(y_train, y_test, drop, num_classes)
        if not keep_test.any():
            raise DataError(f"dropping classes {list(drop)} leaves the test split of {display!r} empty.")
        train_positions = np.flatnonzero(keep_train)
        test_positions = np.flatnonzero(keep_test)
        x_train, y_train = keep_rows(x_train, train_positions, "the kept training inputs"), lookup[y_train[keep_train]]
        x_test, y_test = keep_rows(x_test, test_positions, "the kept test inputs"), lookup[y_test[keep_test]]
        num_classes = int(kept.size)
        metadata["kept_classes"] = kept.tolist()
        metadata["test_indices"] = torch.from_numpy(test_positions.astype(np.int64))
        if "class_names" in metadata and len(metadata["class_names"]) > int(kept.max()):
            metadata["class_names"] = [metadata["class_names"][c] for c in kept]

    if n_train is not None and n_train < y_train.shape[0]:
        rng = np.random.default_rng([seed, _SUBSET_STREAM])
        chosen = stratified_subset(y_train, n_train, num_classes, rng)
        x_train, y_train = keep_rows(x_train, chosen, "the training subset's inputs"), y_train[chosen]
        train_positions = train_positions[chosen]
    if train_positions.shape[0] < full_train:
        metadata["train_indices"] = torch.from_numpy(train_positions.astype(np.int64))

    corrupted = np.zeros(0, dtype=np.int64)
    if corruption_ratio > 0:
        rng = np.random.default_rng([seed, _CORRUPTION_STREAM])
        metadata["original_y_train"] = torch.from_numpy(y_train.copy())
        y_train, corrupted = corrupt_labels_symmetric(y_train, corruption_ratio, num_classes, rng)
    metadata["corrupted_indices"] = torch.from_numpy(corrupted)

    if applied:
        # a private memory map (a large user dataset) is standardised in place: no copy of its size
        x_train, x_test, mean, std = standardize_features(x_train, x_test,
                                                          in_place=(is_scratch(x_train), is_scratch(x_test)))
        metadata["feature_mean"] = torch.from_numpy(mean)
        metadata["feature_std"] = torch.from_numpy(std)

    # no copy of float32 C-contiguous inputs (memory-mapped ones included): the tensors share their pages
    return Dataset(
        name=display,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        source=raw["source"],
        metadata=metadata,
    )


def load_dataset_from_config(cfg: DataConfig) -> Dataset:
    """`load_dataset` with the fields of `cfg`."""
    if not isinstance(cfg, DataConfig):
        raise DataError(f"expected a DataConfig, got {type(cfg).__name__}.")
    return load_dataset(
        cfg.name, data_dir=cfg.data_dir, n_train=cfg.n_train, corruption_ratio=cfg.corruption_ratio,
        drop_classes=cfg.drop_classes, standardize=cfg.standardize, seed=cfg.seed,
    )


def available_datasets(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """What can be loaded: one dict per built-in name, then one for user files.

    Keys: name, n_train, n_test, input_shape (list), num_classes, source, files (the files
    needed, empty when none), aliases, normalization (what is done to the values by default; the
    user-files row has "-" for sizes and a `details` text), and -- for file-based datasets when a data folder is
    known (argument or $MODELSENSE_DATA_DIR) -- found (bool) and location (folder or None).
    Sizes are the standard ones; nothing is read or generated.
    """
    data_dir = _default_data_dir(data_dir)
    out = []
    for info in _BUILTINS:
        entry: dict[str, Any] = {
            "name": info.name, "n_train": info.n_train, "n_test": info.n_test,
            "input_shape": list(info.input_shape), "num_classes": info.num_classes,
            "source": info.source, "files": list(info.files), "aliases": list(info.aliases),
            "normalization": info.normalization,
        }
        if info.files and data_dir is not None:
            try:
                paths = files.find_files(data_dir, list(info.files), info.subdirs, info.name,
                                         allow_gz=info.name != "cifar10")
                entry["found"], entry["location"] = True, str(next(iter(paths.values())).parent)
            except DataError:
                entry["found"], entry["location"] = False, None
        out.append(entry)
    out.append({
        "name": "PATH.npz / PATH.csv", "n_train": "-", "n_test": "-", "input_shape": "-",
        "num_classes": "-", "aliases": [],
        "source": ".npz: x_train,y_train,x_test,y_test or X,y; .csv: a 'label' column",
        "files": [],
        "normalization": "feature vectors: standardised with the training set's mean and std "
                         "(--no-standardize keeps them raw); other shapes: as stored",
        "details": "X,y arrays and .csv tables are split 80/20 (stratified, random_state=0); "
                   ".csv files need a header row, other .csv columns must be numeric features; "
                   "feature vectors are standardised with the training set's mean and std "
                   "unless --no-standardize",
    })
    return out
