"""Data normalisation: every public function accepts a batch, a list of batches, a Dataset or a DataLoader.

A *batch* is a tensor, or a tuple / list / dict of tensors whose leading dimensions are the examples.
A *list of batches* is a Python ``list`` whose items are batches (tuples, dicts or tensors).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import optree
import torch
from torch.utils.data import DataLoader, Dataset

Batch = Any


def _is_batch(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (tuple, dict)):
        leaves = optree.tree_leaves(obj, namespace="ifunc")
        return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)
    return False


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch: the shared leading dimension of its tensors."""
    leaves = [x for x in optree.tree_leaves(batch, namespace="ifunc") if isinstance(x, torch.Tensor)]
    if not leaves:
        raise TypeError(f"a batch must contain tensors, got {type(batch).__name__}")
    sizes = {x.shape[0] if x.dim() else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every tensor of a batch needs the same leading (example) dimension; got shapes "
            f"{[tuple(x.shape) for x in leaves]}"
        )
    return int(sizes.pop())


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return optree.tree_map(lambda x: x[start:stop] if isinstance(x, torch.Tensor) else x, batch, namespace="ifunc")


def index_batch(batch: Batch, index: torch.Tensor) -> Batch:
    return optree.tree_map(lambda x: x[index] if isinstance(x, torch.Tensor) else x, batch, namespace="ifunc")


def concat_batches(batches: list[Batch]) -> Batch:
    return optree.tree_map(lambda *xs: torch.cat(xs), *batches, namespace="ifunc")


class DataSource:
    """A re-iterable view of user data as batches, with the total number of examples."""

    def __init__(self, data, *, name: str = "data", batch_size_hint: int = 256):
        self.name = name
        if _is_batch(data):
            self._batches: Iterable[Batch] = [data]
        elif isinstance(data, list):
            if data and all(isinstance(b, torch.Tensor) for b in data):
                raise TypeError(
                    f"{name}: a list of tensors is ambiguous; pass one batch as a tuple, e.g. (x, y), "
                    "or several batches as a list of tuples, e.g. [(x1, y1), (x2, y2)]"
                )
            data = [tuple(b) if isinstance(b, list) else b for b in data]  # collated [x, y] batches
            if not data or not all(_is_batch(b) for b in data):
                raise TypeError(
                    f"{name}: a list must hold batches (tensors, tuples or dicts of tensors); "
                    "pass one batch as a tuple, e.g. (x, y)"
                )
            self._batches = data
        elif isinstance(data, DataLoader):
            self._batches = data
        elif isinstance(data, Dataset):
            self._batches = DataLoader(data, batch_size=batch_size_hint, shuffle=False)
        elif isinstance(data, Iterator):
            raise TypeError(
                f"{name}: got a one-shot iterator/generator; ifunc may pass over the data several times. "
                "Pass a list of batches or a DataLoader instead"
            )
        elif isinstance(data, Iterable):
            self._batches = data
        else:
            raise TypeError(
                f"{name}: expected a batch (tensor / tuple / dict of tensors), a list of batches, a Dataset "
                f"or a DataLoader; got {type(data).__name__}"
            )
        self._n: int | None = None

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)

    def __len__(self) -> int:
        if self._n is None:
            self._n = sum(batch_size(b) for b in self._batches)
            if self._n == 0:
                raise ValueError(f"{self.name} holds no examples")
        return self._n

    def count(self) -> int:
        """Number of examples (one pass over the data unless it can be read off cheaply)."""
        cheap = self.cheap_count()
        return cheap if cheap is not None else len(self)

    def cheap_count(self) -> int | None:
        """Number of examples when known without loading data (in memory, or a plain DataLoader), else None."""
        if self._n is not None:
            return self._n
        if isinstance(self._batches, list):
            return len(self)
        loader = self._batches
        if isinstance(loader, DataLoader) and loader.batch_size is not None and not loader.drop_last:
            try:
                return len(loader.sampler)
            except TypeError:
                return None
        return None

    def chunks(self, size: int) -> Iterator[Batch]:
        """Yield batches of exactly ``size`` examples (the last may be smaller), in order.

        Batches are split and joined across the data's own batch boundaries, so chunk ``i`` always holds
        examples ``[i·size, (i+1)·size)`` whatever the DataLoader's batch size.
        """
        pending: list[Batch] = []
        held = 0
        for b in self._batches:
            b = tuple(b) if isinstance(b, list) else b  # a DataLoader collates (x, y) into [x, y]
            n = batch_size(b)
            start = 0
            while start < n:
                take = min(size - held, n - start)
                pending.append(b if (start == 0 and take == n) else slice_batch(b, start, start + take))
                held += take
                start += take
                if held == size:
                    yield pending[0] if len(pending) == 1 else concat_batches(pending)
                    pending, held = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else concat_batches(pending)

    def in_memory(self) -> Batch | None:
        """All examples as one batch when the data is already in memory (a batch or a list), else None."""
        if isinstance(self._batches, list):
            return self._batches[0] if len(self._batches) == 1 else concat_batches(self._batches)
        return None
