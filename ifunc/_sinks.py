"""Where the columns of a score matrix go: the sink protocol, and the sinks that keep them in memory.

A *sink* receives column blocks ``[..., b]`` of the chunks of training examples (examples on the last axis;
per-token blocks ``[q, b, T]``). The one scoring loop (:func:`ifunc.attribute`, :func:`ifunc.self_influence`)
drives any object with these methods:

* ``chunk_size() -> int | None``: a chunk size the sink must be given (a store being resumed records one), else
  None; asked before the scorer is built;
* ``open(plan)``: the run's :class:`ScorePlan` (``n_query``, the chunk size, the :class:`~ifunc._data.Partition` of
  the chunks over the ranks, the training :class:`~ifunc._data.DataSource`);
* ``seen(index, batch)``: every chunk, first (a store checks a chunk it has against its fingerprint); under
  ``torchrun`` another rank's chunk arrives unread, as an ``UnreadChunk`` (its example count only:
  ``batch_size()`` works, its tensors cannot be read);
* ``wants(index) -> bool``: should this chunk, which this rank owns, be computed (not already on disk)?
* ``put(index, block)``: its columns; ``result()``: what :func:`ifunc.attribute` returns; ``close()``: always
  called at the end, also after an error.

Four implementations: :class:`MemorySink` (every chunk, concatenated), :class:`GatherSink` (``torchrun``: each
rank its own chunks, all-gathered), :class:`~ifunc._store_sinks.StoreSink` (a resumable HDF5 score store) and
:class:`~ifunc._store_sinks.RankStoreSink` (``torchrun``: one store per rank, merged by rank 0).
:func:`default_sink` picks one from ``out=`` and the process group.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

from . import distributed
from ._batches import batch_size
from ._chunks import Partition
from ._data import DataSource
from ._store_sinks import RankStoreSink, StoreSink

__all__ = ["Sink", "ScorePlan", "MemorySink", "GatherSink", "default_sink"]


class ScorePlan(NamedTuple):
    """What a sink is told when the run starts."""

    n_query: int  #: rows of the score matrix (0 for self-influence)
    chunk: int  #: examples per chunk (the last may be smaller)
    partition: Partition  #: which rank computes chunk ``i`` (``partition.owns(i)`` on that rank)
    source: DataSource  #: the training data (``source.count()`` passes over it when the count is not cheap)


class Sink(Protocol):
    """The protocol of a score sink (see the module docstring)."""

    def chunk_size(self) -> int | None: ...

    def open(self, plan: ScorePlan) -> None: ...

    def seen(self, index: int, batch) -> None: ...

    def wants(self, index: int) -> bool: ...

    def put(self, index: int, block: torch.Tensor) -> None: ...

    def result(self) -> Any: ...

    def close(self) -> None: ...


class MemorySink:
    """All columns in memory. ``tokens=True``: blocks ``[q, b, T]`` zero-padded at the end to the longest ``T``."""

    def __init__(self, tokens: bool = False):
        self.blocks: list[torch.Tensor] = []
        self.tokens = tokens

    def chunk_size(self) -> int | None:
        return None

    def open(self, plan: ScorePlan) -> None:
        self.plan = plan

    def close(self) -> None:
        pass

    def wants(self, index: int) -> bool:
        return True

    def put(self, index: int, block: torch.Tensor) -> None:
        self.blocks.append(block)

    def seen(self, index: int, batch) -> None:
        pass

    def result(self):
        if not self.blocks:
            raise ValueError("the training data yielded no examples")
        if self.tokens:
            T = max(b.shape[-1] for b in self.blocks)
            return torch.cat([torch.nn.functional.pad(b, (0, T - b.shape[-1])) for b in self.blocks], dim=-2)
        return torch.cat(self.blocks, dim=-1)


class GatherSink(MemorySink):
    """Each rank keeps the columns of its own chunks; ``result()`` all-gathers them in chunk order on every rank."""

    def __init__(self):
        super().__init__()
        self.widths: list[int] = []

    def seen(self, index: int, batch) -> None:
        self.widths.append(batch_size(batch))

    def result(self):
        if self.plan.partition.count == 1:  # every rank computed every chunk (a scorer that splits examples)
            return super().result()
        owners = [self.plan.partition.owner(i) for i in range(len(self.widths))]
        return distributed.gather_columns(self.blocks, self.widths, owners)


def default_sink(out, *, tokens: bool, meta: dict | None, overwrite: bool, resume: dict) -> Sink:
    """The sink of :func:`ifunc.attribute`'s arguments: a store when ``out`` is given, memory otherwise, per rank
    under ``torchrun``."""
    if out is None:
        return GatherSink() if distributed.active() else MemorySink(tokens=tokens)
    assert meta is not None  # computed for every store
    kind = RankStoreSink if distributed.active() else StoreSink
    return kind(out, meta=meta, overwrite=overwrite, **resume)
