"""The one scoring loop: chunks of training examples × a scorer × a sink.

:func:`run_chunks` walks every chunk of the training data in order (:func:`ifunc._chunks.iter_chunks`, the one
chunk loop), shows each to the sink, and computes the chunks this rank owns (the run's
:class:`~ifunc._chunks.Partition`) that the sink still wants. A rank loads only the chunks it owns when the data is
indexed by example (a map-style Dataset, a sequential DataLoader over one, data in memory); the sink sees another
rank's chunk as an :class:`~ifunc._data.UnreadChunk` (its example count). An owned chunk already in a store is still
loaded: the store checks it against its fingerprint before the run goes on. It knows no method (the scorer comes
from the closure) and no destination (the sink says what it wants and what is returned).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import distributed
from ._chunks import Partition, iter_chunks, n_chunks
from ._data import DataSource
from ._progress import progress_bar
from ._sinks import ScorePlan, Sink

__all__ = ["run_chunks", "agreed_chunk"]


def agreed_chunk(chunk_size: int | None, default: Callable[[], int]) -> int:
    """``chunk_size``, or ``default()`` computed on rank 0 for every rank (a default sized from each rank's free
    memory could differ between ranks, and every rank must cut the data into the same chunks)."""
    if chunk_size is not None:
        return chunk_size
    return int(distributed.broadcast_result(default))  # pyright: ignore[reportArgumentType]


def _finite(block: torch.Tensor, offset: int) -> torch.Tensor:
    """``block`` unchanged, or a ValueError when the contraction itself overflowed (gradients were finite)."""
    # any inf/NaN makes the sum non-finite; only a sum that overflowed needs the elementwise check
    if not bool(torch.isfinite(block.sum())) and not bool(torch.isfinite(block).all()):
        raise ValueError(
            f"scores of the training chunk starting at example {offset} are inf/NaN although every gradient was "
            f"finite: the contraction overflowed in {block.dtype} (max {torch.finfo(block.dtype).max:.3g}); use "
            "float32 or bfloat16 (dtype=), or a loss scale that keeps gradients small"
        )
    return block


def run_chunks(
    source: DataSource,
    plan_chunk: int,
    partition: Partition,
    compute: Callable,
    sink: Sink,
    *,
    n_query: int,
    desc: str,
    progress: bool | None,
):
    """``sink.result()`` after ``compute(batch, offset) -> [..., b]`` ran on every owned chunk the sink wants.

    Under ``torchrun`` (``partition.count = W > 1``) this rank reads only its chunks ``i ≡ rank (mod W)`` of data
    indexed by example (about ``n / W`` examples instead of ``n``); the others reach ``sink.seen`` unread.
    """
    shown = progress if distributed.world()[0] == 0 else False  # one bar, on rank 0
    sink.open(ScorePlan(n_query, plan_chunk, partition, source))
    try:
        for c in progress_bar(
            iter_chunks(source, plan_chunk, partition=partition, skip_others=True),
            total=n_chunks(source, plan_chunk),
            desc=desc,
            progress=shown,
        ):
            sink.seen(c.index, c.batch)  # first: a store checks an owned chunk it has against its fingerprint
            if c.mine and sink.wants(c.index):
                sink.put(c.index, _finite(compute(c.batch, c.offset), c.offset))
        return sink.result()
    finally:
        sink.close()
