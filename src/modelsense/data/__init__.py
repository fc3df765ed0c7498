"""Datasets: built-in (`digits`, `mnist1d`), from files (`mnist`, `fmnist`, `cifar10`, any
`.npz`/`.csv`), with seeded subsets, class removal, label corruption and standardisation.

    >>> from modelsense.data import load_dataset
    >>> ds = load_dataset("digits", n_train=500, corruption_ratio=0.1)

Data of any size: `as_examples(data)` takes (x, y) tensors, a map-style `torch.utils.data.Dataset` or a
`DataLoader` (shuffle=False), with a `BatchAdapter` saying where inputs and labels are in an item; every
numerical layer reads it batch by batch (see `modelsense.data.stream`).
"""

from modelsense.data.dataset import Dataset
from modelsense.data.loaders import (
    DataConfig,
    available_datasets,
    known_dataset_names,
    load_dataset,
    load_dataset_from_config,
)
from modelsense.data.stream import BatchAdapter, Examples, as_examples

__all__ = [
    "BatchAdapter",
    "Examples",
    "as_examples",
    "Dataset",
    "DataConfig",
    "load_dataset",
    "load_dataset_from_config",
    "available_datasets",
    "known_dataset_names",
]
