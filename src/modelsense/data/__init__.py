"""Datasets: built-in (`digits`, `mnist1d`), from files (`mnist`, `fmnist`, `cifar10`, any
`.npz`/`.csv`), with seeded subsets, class removal, label corruption and standardisation.

    >>> from modelsense.data import load_dataset
    >>> ds = load_dataset("digits", n_train=500, corruption_ratio=0.1)
"""

from modelsense.data.dataset import Dataset
from modelsense.data.loaders import (
    DataConfig,
    available_datasets,
    known_dataset_names,
    load_dataset,
    load_dataset_from_config,
)

__all__ = [
    "Dataset",
    "DataConfig",
    "load_dataset",
    "load_dataset_from_config",
    "available_datasets",
    "known_dataset_names",
]
