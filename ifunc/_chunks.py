"""The one chunk-and-rank driver: chunks of a data source, and which worker computes each.

:func:`iter_chunks` is the only loop over fixed-size chunks of the data in ifunc (gradients, factors, scores), and
:class:`Partition` the only place that says which worker (a ``torchrun`` rank) computes chunk ``i``.
:func:`check_chunk_size` is the one rule for a chunk size given by a user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, NamedTuple

import torch

from ._data import Batch, DataSource, batch_size, chunk_width

__all__ = ["Partition", "Chunk", "iter_chunks", "n_chunks", "check_chunk_size"]


def check_chunk_size(chunk_size, *, name: str = "chunk_size") -> int | None:
    """``chunk_size`` as a positive ``int``, or ``None`` (chunks sized from the byte budget): the one chunk-size rule.

    Every public function that takes a ``chunk_size`` calls this at its boundary, and the one chunk loop
    (:meth:`DataSource.chunks`) checks its width the same way (:func:`chunk_width`).

    Raises:
      TypeError: not a whole number (a float, a string, a bool). ValueError: below 1.
    """
    return None if chunk_size is None else chunk_width(chunk_size, name=name)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Partition(NamedTuple):
    """A worker's share of a pass over chunks (or batches): chunk ``i`` belongs to worker ``i mod count``.

    This worker, ``index`` of ``count``, computes the chunks ``i ≡ index (mod count)``; ``reduce`` adds the
    workers' partial sums (an all-reduce under ``torchrun``, built by the solvers from the process group). The
    default ``Partition()`` is the whole work in one process. Every worker still walks every chunk (data loaders
    and label generators advance alike; stores fingerprint every chunk) and skips the compute of the others'.
    """

    index: int = 0
    count: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def owns(self, i: int) -> bool:
        """True when chunk ``i`` is this worker's: ``i ≡ index (mod count)``."""
        return i % self.count == self.index

    def owner(self, i: int) -> int:
        """The worker that computes chunk ``i``: ``i mod count``."""
        return i % self.count

    def local(self, i: int) -> int:
        """Position of chunk ``i`` among its owner's chunks: ``⌊i / count⌋``."""
        return i // self.count

    def width(self, n: int | None, size: int) -> int:
        """Chunk width for ``n`` examples: ``size``, or ``⌈n / count⌉`` when smaller, so that no worker idles.

        ``size`` when ``n`` is unknown (``None``) or the work is not split.
        """
        if self.count == 1 or not n:
            return size
        return max(1, min(size, -(-n // self.count)))


class Chunk(NamedTuple):
    """One chunk of the data: its position in the chunk sequence, the index of its first example, the batch, and
    whether this worker computes it (:meth:`Partition.owns`)."""

    index: int
    offset: int
    batch: Batch
    mine: bool


def iter_chunks(source: DataSource, size: int, *, partition: Partition | None = None) -> Iterator[Chunk]:
    """``(index, offset, batch, mine)`` for consecutive chunks of ``size`` examples (the last may be smaller).

    Chunk ``index`` holds examples ``[offset, offset + b)``, ``offset = index · size``, whatever the batch
    size of the underlying DataLoader. Every chunk is yielded to every worker; ``mine`` says whether this one
    computes it (``partition.owns(index)``; always true without a ``partition``). This is the one chunk loop of
    ifunc.

    Raises:
      ValueError: the data holds no examples.
    """
    offset = 0
    for index, batch in enumerate(source.chunks(size)):
        yield Chunk(index, offset, batch, partition is None or partition.owns(index))
        offset += batch_size(batch)
    if offset == 0:
        raise ValueError(f"{source.name} holds no examples")


def n_chunks(source: DataSource, size: int) -> int | None:
    """Number of chunks of ``size`` when the example count is cheap to know, else None (for progress bars)."""
    size = chunk_width(size)
    n = source.cheap_count()
    return None if n is None else -(-n // size)
