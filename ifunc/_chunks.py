"""The one chunk-and-rank driver: chunks of a data source, and which worker computes (and reads) each.

:func:`iter_chunks` is the only loop over fixed-size chunks of the data in ifunc (gradients, factors, scores), and
:class:`Partition` the only place that says which worker (a ``torchrun`` rank) computes chunk ``i``;
:func:`read_chunks` loads only the chunks a worker wants when the data is indexed by example.
:func:`check_chunk_size` is the one rule for a chunk size given by a user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, NamedTuple

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, default_collate

from ._batches import Batch, UnreadChunk, batch_size, concat_batches, slice_batch
from ._data import DataSource, chunk_width
from ._order import own_rng_stream

__all__ = ["Partition", "Chunk", "iter_chunks", "read_chunks", "n_chunks", "check_chunk_size"]


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
    default ``Partition()`` is the whole work in one process. Every worker walks every chunk and skips the compute
    of the others'; it skips reading them too when asked (:func:`iter_chunks` with ``skip_others``) and the data is
    indexed by example (a pass that draws labels for every chunk, to keep its generator in step, reads them all).
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


def iter_chunks(
    source: DataSource, size: int, *, partition: Partition | None = None, skip_others: bool = False
) -> Iterator[Chunk]:
    """``(index, offset, batch, mine)`` for consecutive chunks of ``size`` examples (the last may be smaller).

    Chunk ``index`` holds examples ``[offset, offset + b)``, ``offset = index · size``, whatever the batch
    size of the underlying DataLoader. Every chunk is yielded to every worker; ``mine`` says whether this one
    computes it (``partition.owns(index)``; always true without a ``partition``). With ``skip_others``, another
    worker's chunk is not loaded: its ``batch`` is an :class:`~ifunc._data.UnreadChunk` (its example count), and
    this worker reads only ``≈ 1/W`` of data indexed by example (:func:`read_chunks`). This is the one chunk loop
    of ifunc.

    Raises:
      ValueError: the data holds no examples.
    """
    wanted = partition.owns if partition is not None and skip_others and partition.count > 1 else None
    offset = 0
    for index, batch in enumerate(read_chunks(source, size, wanted)):
        yield Chunk(index, offset, batch, partition is None or partition.owns(index))
        offset += batch_size(batch)
    if offset == 0:
        raise ValueError(f"{source.name} holds no examples")


def read_chunks(source: DataSource, size: int, wanted: Callable[[int], bool] | None = None) -> Iterator[Batch]:
    """:meth:`DataSource.chunks` of ``size``, loading only the examples of the chunks ``i`` with ``wanted(i)``.

    Chunk ``i`` is examples ``[i·size, min((i+1)·size, n))``; the others come as
    :class:`~ifunc._data.UnreadChunk`. Data indexed by example (:func:`indexed_loader`) loads only the wanted
    chunks, each bit for bit the chunk a full pass builds (unless loading an example draws random numbers: an
    augmentation then sees another stream); in memory nothing is cut for the others; any other data (a
    generator, an iterable-style data set, a custom sampler) is still read whole.
    """
    loader = indexed_loader(source) if wanted is not None else None
    if loader is None or wanted is None:
        return source.chunks(size, wanted)
    return _read_by_index(loader, source.count(), chunk_width(size), wanted, source.name)


def indexed_loader(source: DataSource) -> DataLoader | None:
    """``source``'s DataLoader when its batch ``k`` is examples ``[k·B, (k+1)·B)`` of a map-style data set, else None.

    That is a DataLoader (ifunc's own over a Dataset, or the user's) with a ``batch_size`` ``B``, a
    ``SequentialSampler`` over its data set, and no ``batch_sampler`` or ``drop_last`` of its own: any example can
    be loaded without the ones before it.
    """
    loader = source.loader
    if loader is None or loader.batch_size is None or isinstance(loader.dataset, IterableDataset):
        return None
    batches, order = loader.batch_sampler, loader.sampler
    plain = type(batches) is BatchSampler and batches.sampler is order and not batches.drop_last
    sequential = type(order) is SequentialSampler and order.data_source is loader.dataset
    return loader if plain and sequential else None


class _Reads:
    """A batch sampler over the example ranges ``[lo, hi)`` of ``spans``, in order."""

    def __init__(self, spans: list[tuple[int, int]]):
        self.spans = spans

    def __iter__(self) -> Iterator[list[int]]:
        for lo, hi in self.spans:
            yield list(range(lo, hi))

    def __len__(self) -> int:
        return len(self.spans)


def _spans(loader: DataLoader, n: int, size: int, wanted: Callable[[int], bool]) -> list[tuple[int, int]]:
    """The example ranges to load, in order, for the wanted chunks of ``size`` of ``loader``'s ``n`` examples.

    torch's ``default_collate`` stacks examples, so a wanted chunk ``[a, b)`` is loaded exactly, in reads of at
    most the loader's ``B`` (its workers share a chunk as they share a pass); it types a column of Python numbers
    from the first example of a read, so examples that mix ``int`` and ``float`` in one field must be made tensors
    (or one type) by the data set for a rank's chunk to be bit for bit a full pass's. Any other ``collate_fn`` may
    look at its whole batch: the reads are then the loader's own batches ``[k·B, (k+1)·B)`` that overlap a wanted chunk,
    each once (two chunks may share one), cut and joined as a full pass does.
    """
    width = loader.batch_size
    assert width is not None  # indexed_loader() holds
    spans: list[tuple[int, int]] = []
    for i in range(-(-n // size)):
        a, b = i * size, min((i + 1) * size, n)
        if not wanted(i):
            continue
        if loader.collate_fn is default_collate:
            spans += [(lo, min(lo + width, b)) for lo in range(a, b, width)]
        else:
            batches = range(a // width * width, b, width)
            spans += [(lo, min(lo + width, n)) for lo in batches if not spans or lo >= spans[-1][1]]
    return spans


def _read_by_index(loader: DataLoader, n: int, size: int, wanted: Callable[[int], bool], name: str) -> Iterator[Batch]:
    """The chunks of ``size`` of ``loader``'s ``n`` examples, only the ``wanted`` ones loaded (the others unread).

    The reads (:func:`_spans`) are fetched as ``loader`` fetches a batch: the data set's ``__getitems__`` when it
    has one, else ``[data[j] for j in read]``, then its ``collate_fn``, in its workers, on its own RNG stream.
    """
    spans = _spans(loader, n, size, wanted)
    reader = DataLoader(
        loader.dataset,
        batch_sampler=_Reads(spans),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        pin_memory_device=loader.pin_memory_device,
    )
    reads = zip(spans, own_rng_stream(reader))
    lo = hi = 0
    read = None
    for i in range(-(-n // size)):
        a, b = i * size, min((i + 1) * size, n)
        if not wanted(i):
            yield UnreadChunk(b - a)
            continue
        pieces, at = [], a
        while at < b:
            if not lo <= at < hi:
                (lo, hi), read = next(reads)
                read = tuple(read) if isinstance(read, list) else read  # a DataLoader collates (x, y) into [x, y]
                if batch_size(read) != hi - lo:
                    raise ValueError(
                        f"{name}: examples [{lo}, {hi}) of the data set came as a batch of {batch_size(read)}; its "
                        "__getitems__ and collate_fn must return one example per index asked for"
                    )
            stop = min(b, hi)
            pieces.append(read if (at, stop) == (lo, hi) else slice_batch(read, at - lo, stop - lo))
            at = stop
        yield pieces[0] if len(pieces) == 1 else concat_batches(pieces)


def n_chunks(source: DataSource, size: int) -> int | None:
    """Number of chunks of ``size`` when the example count is cheap to know, else None (for progress bars)."""
    size = chunk_width(size)
    n = source.cheap_count()
    return None if n is None else -(-n // size)
