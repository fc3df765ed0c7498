"""Data of any size: one way for tensors, a map-style `Dataset` or a `DataLoader` to go in.

Wherever the numerical layers take training or test data (attributors' `fit` / `scores`, curvature
operators, posteriors, MPE, the retraining engine) they accept

    (x, y) tensors          x (N, ...) or a dict / tuple of (N, ...) tensors, y (N,) labels;
    a map-style Dataset     `len(ds)` and `ds[i]`, items (x_i, y_i) by default;
    a DataLoader            over a map-style Dataset, `shuffle=False` (a sequential sampler): its
                            `dataset` and `collate_fn` are used, batches gathered by index (in
                            this process: its `num_workers` and `batch_size` are not used; the
                            method's chunk size sets the batches).

`as_examples(data, y=None, adapter=None)` turns any of them into `Examples`: N known, batches gathered
by position (`examples.get(rows)`), so per-example passes (gradients, projections, K-FAC factor sums,
curvature products) run over the data one batch at a time and never hold it whole, and a method that
needs random access (the engine's per-model batches, LiSSA's minibatches) gathers by index.

How inputs and labels are found in an item or a collated batch is said in one place, a `BatchAdapter`
(kronfluence's `Task` plays this role): by default an item is a pair `(x, y)`; override `inputs` /
`labels` for other layouts, e.g. dict items::

    class DictBatch(BatchAdapter):
        def inputs(self, batch):
            return {"tokens": batch["tokens"], "mask": batch["mask"]}   # what the model's forward takes
        def labels(self, batch):
            return batch["label"]

The model's forward receives `inputs(batch)` as its one argument (a tensor, or the dict / tuple).

Why a shuffled `DataLoader` is refused: every result is indexed by the position of an example in the
data (row i of a score matrix is training example i), so the order must be the dataset's own. Pass
the loader's dataset, or `shuffle=False`; shuffling does not change any result here (every pass
sums or stacks over all examples).

Checks: tensors are checked whole as before (shapes, finite values, labels in range); a Dataset or
DataLoader read by batches has its first batch (up to 64 examples) checked when it goes in, so a bad
label further on fails in the pass that reads it (the loss raises), not at the door.

Materialising: `Examples.materialize(budget)` reads everything into tensors only when the inputs are
tensors and N x (bytes of one example) fits the memory budget; otherwise DataError saying so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
)
from torch.utils.data.dataloader import default_collate

from modelsense.core.functional import (
    Inputs,
    chunks,
    input_tensors,
    map_inputs,
    n_rows,
    take_rows,
    to_device,
)
from modelsense.errors import DataError


class BatchAdapter:
    """How the inputs and the labels are found in an item or a collated batch (override to change).

    `inputs(batch)` is what the model's forward receives (a tensor, or a dict / tuple of tensors with
    the examples along the first dimension); `labels(batch)` the (n,) labels (class indices) or
    (n, ...) regression targets. `collate(items)` makes a batch of a list of dataset items (default:
    `torch.utils.data.default_collate`; a `DataLoader`'s own `collate_fn` replaces it).
    """

    def inputs(self, batch: Any) -> Inputs:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0]
        raise DataError(f"a batch is a {type(batch).__name__}, not a pair (x, y); give a BatchAdapter whose "
                        "inputs(batch) / labels(batch) find the inputs and the labels in it")

    def labels(self, batch: Any) -> Tensor:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[1]
        raise DataError(f"a batch is a {type(batch).__name__}, not a pair (x, y); give a BatchAdapter whose "
                        "inputs(batch) / labels(batch) find the inputs and the labels in it")

    def collate(self, items: list[Any]) -> Any:
        return default_collate(items)


class _LoaderAdapter(BatchAdapter):
    """A user adapter with a `DataLoader`'s `collate_fn` as its collate."""

    def __init__(self, base: BatchAdapter, collate_fn: Any) -> None:
        self.base, self.collate_fn = base, collate_fn

    def inputs(self, batch: Any) -> Inputs:
        return self.base.inputs(batch)

    def labels(self, batch: Any) -> Tensor:
        return self.base.labels(batch)

    def collate(self, items: list[Any]) -> Any:
        return self.collate_fn(items)


def _index(rows: slice | Tensor | list[int] | int, n: int) -> Sequence[int]:
    if isinstance(rows, slice):
        return range(n)[rows]
    if isinstance(rows, Tensor):
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        return [int(i) for i in rows.reshape(-1).tolist()]
    if isinstance(rows, int):
        return [rows]
    return [int(i) for i in rows]


class Examples:
    """N examples with batches gathered by position (see the module docstring).

    Built by `as_examples`. `get(rows)` -> (inputs, labels) of those rows (a slice, an index tensor or
    list), collated, on `device` with floating tensors in `dtype` when these are set (`on(device,
    dtype)`); `batches(size)` the contiguous batches in order; `inputs` / `labels` the two sides as
    lazy `Rows` (len() and [rows]), which the numerical code slices like tensors.
    """

    def __init__(self, n: int, gather: Any, tensors: tuple[Inputs, Tensor] | None, what: str,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.n, self._gather, self.tensors, self.what = int(n), gather, tensors, what
        self.device, self.dtype = device, dtype
        self._last: tuple[Any, tuple[Inputs, Tensor]] | None = None

    def __len__(self) -> int:
        return self.n

    @property
    def in_memory(self) -> bool:
        """True when the data came as tensors (nothing to gather)."""
        return self.tensors is not None

    def on(self, device: torch.device | str | None, dtype: torch.dtype | None) -> Examples:
        """The same examples, gathered onto `device` with floating tensors in `dtype`."""
        return Examples(self.n, self._gather, self.tensors, self.what, device, dtype)

    def _key(self, rows: Any) -> Any:
        if isinstance(rows, slice):
            return ("slice", *rows.indices(self.n))
        if isinstance(rows, Tensor) and rows.dtype != torch.bool:
            return ("rows", tuple(rows.reshape(-1).tolist()))
        return None

    def get(self, rows: slice | Tensor | list[int]) -> tuple[Inputs, Tensor]:
        """(inputs, labels) of the examples `rows` (the last gather is kept: x and y of one batch are
        read once when the two sides are sliced one after the other)."""
        key = self._key(rows)
        if key is not None and self._last is not None and self._last[0] == key:
            return self._last[1]
        x, y = self._gather(rows)
        if self.device is not None or self.dtype is not None:
            x = to_device(x, self.device or "cpu", self.dtype)
            y = y.to(self.device or y.device)
            if y.is_floating_point() and self.dtype is not None:
                y = y.to(self.dtype)
            elif not y.is_floating_point() and y.dtype != torch.bool:
                y = y.long()  # class indices, as the tensor path checks them
        if key is not None:
            self._last = (key, (x, y))
        return x, y

    def batches(self, size: int) -> Iterator[tuple[Inputs, Tensor]]:
        """The examples in order, in batches of at most `size`."""
        for s in chunks(self.n, size):
            yield self.get(s)

    @property
    def inputs(self) -> Rows:
        return Rows(self, 0)

    @property
    def labels(self) -> Rows:
        return Rows(self, 1)

    def example_bytes(self) -> int:
        """Bytes of one example's inputs and label, as gathered."""
        x, y = self.get(slice(0, 1))
        return sum(t.element_size() * t.numel() for t in [*input_tensors(x), y])

    def materialize(self, budget: int, why: str) -> tuple[Inputs, Tensor]:
        """All examples as (x, y) tensors: as given when they came as tensors; gathered when the inputs
        are tensors and N x (bytes of one example) <= `budget`; DataError otherwise (`why` names the
        caller that needs the whole set)."""
        if self.tensors is not None:
            return self.tensors
        x0, _ = self.get(slice(0, 1))
        if not isinstance(x0, Tensor):
            raise DataError(f"{why} reads the {self.what} data whole and takes tensor inputs only; its inputs are a "
                            f"{type(x0).__name__} (a collate_fn's dict / tuple); pass (x, y) tensors or use a method "
                            "that streams the data")
        need = self.n * self.example_bytes()
        if need > budget:
            raise DataError(
                f"{why} reads the {self.what} data whole: {self.n} examples take {need / 2**30:.2f} GiB, above "
                f"the memory budget of {budget / 2**30:.2f} GiB; raise the budget (--memory-gb, "
                "ComputeOptions.memory_budget), use fewer examples, or a method that streams the data"
            )
        parts = [self.get(s) for s in chunks(self.n, 1024)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class Rows:
    """One side (inputs or labels) of `Examples`, sliced like a tensor: `len(rows)`, `rows[s]` gathers
    the examples `s` (a slice, an index tensor or list). `shape` is (N, *one example's shape) for tensor
    inputs; `device` / `dtype` those of a gathered batch."""

    def __init__(self, examples: Examples, side: int) -> None:
        self.examples, self.side = examples, side

    def __len__(self) -> int:
        return self.examples.n

    def __getitem__(self, rows: slice | Tensor | list[int]) -> Any:
        if isinstance(rows, int):
            rows = slice(rows, rows + 1) if rows >= 0 else slice(self.examples.n + rows, self.examples.n + rows + 1)
            return map_inputs(lambda t: t[0], self.examples.get(rows)[self.side])
        return self.examples.get(rows)[self.side]

    def _probe(self) -> Any:
        return self[slice(0, 1)]

    @property
    def example_shape(self) -> tuple[int, ...] | None:
        """The shape of one example's inputs; None when they are a dict / tuple."""
        first = self._probe()
        return tuple(first.shape[1:]) if isinstance(first, Tensor) else None

    @property
    def shape(self) -> torch.Size:
        first = self._probe()
        if not isinstance(first, Tensor):
            raise DataError(f"the {self.examples.what} inputs are a {type(first).__name__}, they have no one shape")
        return torch.Size((self.examples.n, *first.shape[1:]))

    def dim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return input_tensors(self._probe())[0].dtype

    @property
    def device(self) -> torch.device:
        return input_tensors(self._probe())[0].device

    def is_floating_point(self) -> bool:
        return input_tensors(self._probe())[0].is_floating_point()

    def __repr__(self) -> str:
        return f"Rows({'inputs' if self.side == 0 else 'labels'} of {self.examples.n} {self.examples.what} examples)"


def is_stream(data: Any) -> bool:
    """True for the forms `as_examples` gathers lazily (a Dataset, a DataLoader, `Examples`, `Rows`)."""
    if isinstance(data, (Dataset, DataLoader, Examples, Rows)):
        return True
    array_like = isinstance(data, (Tensor, tuple, list, Mapping, str, bytes)) or hasattr(data, "shape")
    return not array_like and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _tensor_examples(x: Inputs, y: Tensor, what: str) -> Examples:
    if not isinstance(y, Tensor):
        raise DataError(f"{what} data: expected labels y as a torch tensor, received {type(y).__name__}; convert with "
                        "torch.as_tensor")
    n = n_rows(x)
    if n == 0 or n != len(y):
        raise DataError(f"{what} data: expected x and y with the same number (>= 1) of rows, received {n} and {len(y)}")
    return Examples(n, lambda rows: (take_rows(x, rows), y[rows]), (x, y), what)


def as_examples(data: Any, y: Tensor | None = None, adapter: BatchAdapter | None = None,
                what: str = "training") -> Examples:
    """`data` (and `y`) as `Examples`; see the module docstring for what is accepted.

    data: x tensor (or dict / tuple of tensors) with `y` given; an (x, y) pair of tensors; a map-style
        Dataset; a DataLoader with a sequential sampler; `Examples` (returned as is); the inputs side
        of `Examples` (`Rows`) with its labels side as `y`.
    adapter: how inputs and labels are found in an item / batch (default `BatchAdapter()`: pairs).
    DataError for anything else (an iterable-style dataset, a shuffled loader, an empty set).
    """
    if adapter is not None and not isinstance(adapter, BatchAdapter):
        raise DataError(f"adapter must be a BatchAdapter, received {type(adapter).__name__}")
    if isinstance(data, Examples):
        return data
    if isinstance(data, Rows):
        if not (isinstance(y, Rows) and y.examples is data.examples):
            raise DataError(f"{what} data: lazy inputs go with the labels of the same examples")
        return data.examples
    if y is not None:
        if is_stream(data):
            raise DataError(f"{what} data: a {type(data).__name__} carries its own labels; pass it without y")
        return _tensor_examples(data, y, what)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not is_stream(data[0]):
        return _tensor_examples(data[0], data[1], what)
    adapter = adapter or BatchAdapter()
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise DataError(f"{what} data: a DataLoader over an iterable-style dataset has no positions to gather "
                            "by; give a map-style Dataset (len() and [i])")
        batches = data.batch_sampler
        custom = batches is not None and not (isinstance(batches, BatchSampler)
                                              and isinstance(batches.sampler, SequentialSampler))
        if not isinstance(data.sampler, SequentialSampler) or custom:
            raise DataError(f"{what} data: the DataLoader draws examples in a {type(data.sampler).__name__} order "
                            "(shuffle=True or a custom sampler); results are indexed by each example's position in the "
                            "dataset, so pass shuffle=False (no result depends on the order) or the dataset itself")
        if data.batch_size is not None:
            adapter = _LoaderAdapter(adapter, data.collate_fn)
        data = data.dataset
    if isinstance(data, IterableDataset):
        raise DataError(f"{what} data: an iterable-style dataset has no positions to gather by; give a map-style "
                        "Dataset (len() and [i])")
    if not is_stream(data):
        raise DataError(f"{what} data: expected (x, y) tensors, a map-style torch Dataset or a DataLoader, received a "
                        f"{type(data).__name__}")
    n = len(data)
    if n == 0:
        raise DataError(f"{what} data: the dataset is empty")

    def gather(rows: Any) -> tuple[Inputs, Tensor]:
        batch = adapter.collate([data[i] for i in _index(rows, n)])
        x, labels = adapter.inputs(batch), adapter.labels(batch)
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        return x, labels

    return Examples(n, gather, None, what)


__all__ = ["BatchAdapter", "Examples", "Rows", "as_examples", "is_stream"]
