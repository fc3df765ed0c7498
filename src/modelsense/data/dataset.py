"""The `Dataset` container shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Dataset:
    """A supervised train/test split held as tensors: in memory, or -- the inputs of a user's dataset
    above `scratch.IN_MEMORY_BYTES` -- sharing the pages of a private memory-mapped file (read by row,
    like any tensor; `to("cpu")` keeps them there, no copy).

    Attributes:
        name: short name (`digits`, `mnist1d`, a file stem, ...).
        x_train, x_test: float32 features, shape (n, *input_shape). Images are (C, H, W).
        y_train, y_test: int64 class labels in [0, num_classes), shape (n,); float32 targets of
            shape (n,) or (n, d) for regression (num_classes == 0).
        num_classes: number of classes (0 for regression).
        source: where the data came from (a package, a directory, a file).
        metadata: provenance: seeds, options applied, `corrupted_indices` (training indices whose
            label actually changed under label corruption), `original_y_train`, `train_indices`
            (positions in the full training set when subsetted), `class_names`, `standardize`
            (requested / applied / reason) with `feature_mean`, `feature_std` when applied, ...
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def is_classification(self) -> bool:
        return self.num_classes > 0

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with every tensor on `device` (metadata shared)."""
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
            self.source,
            self.metadata,
        )

    def summary(self) -> dict[str, Any]:
        """Sizes, shapes and classes as plain Python values (for config.json and listings), and
        whether the features were standardised (`metadata["standardize"]`: requested, applied,
        reason) when the loader recorded it."""
        out = {
            "name": self.name,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "source": self.source,
        }
        if "standardize" in self.metadata:
            out["standardize"] = dict(self.metadata["standardize"])
        return out
