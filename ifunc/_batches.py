"""Batches as pytrees of examples: their size, their tensors, and cutting and joining them along the examples.

A *batch* is a tensor, or a tuple / list / dict of tensors whose leading dimensions are the examples; a field that
torch's ``default_collate`` leaves as a list of plain values (strings, numbers), one per example, is cut and joined
with them. An :class:`UnreadChunk` stands for a chunk another worker reads: its example count alone.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

Batch = Any

__all__ = ["Batch", "UnreadChunk", "tensor_leaves", "batch_size", "slice_batch", "index_batch", "concat_batches"]


class UnreadChunk:
    """Stands for a chunk of ``size`` examples that this worker did not read (another worker's): no data."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def __repr__(self) -> str:
        return f"UnreadChunk(size={self.size})"


def tensor_leaves(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch (a pytree), in optree order."""
    if isinstance(batch, UnreadChunk):  # never a silent empty fingerprint of data that was not read
        raise TypeError(f"{batch!r}: another worker's chunk was not read here; only its example count is known")
    return [x for x in optree.tree_leaves(batch, namespace="ifunc") if isinstance(x, torch.Tensor)]


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch: the shared leading dimension of its tensors (an unread chunk's ``size``)."""
    if isinstance(batch, UnreadChunk):
        return batch.size
    leaves = tensor_leaves(batch)
    if not leaves:
        raise TypeError(f"a batch must contain tensors, got {type(batch).__name__}")
    sizes = {int(x.shape[0]) if x.dim() else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        hint = (
            "; a 0-d tensor has no example dimension: add a batch dimension, e.g. (x[None], y[None]) or (x[i:i+1], "
            "y[i:i+1]) for one example"
            if None in sizes
            else ""
        )
        raise ValueError(
            f"every tensor of a batch needs the same leading (example) dimension; got shapes "
            f"{[tuple(x.shape) for x in leaves]}{hint}"
        )
    size = sizes.pop()
    assert size is not None  # excluded above
    return size


def _column(x: Any) -> bool:
    """A list (or tuple) of plain values, strings or numbers: what ``default_collate`` makes of a text field."""
    return isinstance(x, (list, tuple)) and all(not isinstance(v, (torch.Tensor, list, tuple, dict)) for v in x)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``[start, stop)``: tensors and lists of plain values one per example are cut, other leaves kept."""
    b = batch_size(batch)

    def cut(x):
        return x[start:stop] if isinstance(x, torch.Tensor) or (_column(x) and len(x) == b) else x

    return optree.tree_map(cut, batch, is_leaf=_column, namespace="ifunc")


def index_batch(batch: Batch, index: torch.Tensor) -> Batch:
    return optree.tree_map(lambda x: x[index] if isinstance(x, torch.Tensor) else x, batch, namespace="ifunc")


def concat_batches(batches: list[Batch]) -> Batch:
    """The batches' examples in order: tensors concatenated, lists of plain values (one per example) joined."""
    sizes = [batch_size(b) for b in batches]

    def join(*xs):
        if isinstance(xs[0], torch.Tensor):
            return torch.cat(xs)
        if all(_column(x) and len(x) == k for x, k in zip(xs, sizes)):
            return type(xs[0])(v for x in xs for v in x)
        if all(x == xs[0] for x in xs):  # the same value in every batch (not per example): kept once
            return xs[0]
        raise TypeError(
            f"batches cannot be joined: a field that is neither a tensor nor a list of one value per example differs "
            f"between batches ({xs[0]!r}, ...); make it a tensor, or one value per example, in the data set"
        )

    return optree.tree_map(join, *batches, is_leaf=_column, namespace="ifunc")
