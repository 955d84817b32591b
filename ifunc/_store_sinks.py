"""Sinks that write score columns to resumable HDF5 score stores: one process, or one part per ``torchrun`` rank.

Both follow the sink protocol of :mod:`ifunc._sinks`. Every chunk is fingerprinted: a chunk already on disk must
hold the same training data (else the run is refused before anything is written), a new one is written with its
fingerprint, and a chunk already done is never recomputed. Which chunks a rank computes comes from the run's
:class:`~ifunc._data.Partition` only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from . import distributed, store
from ._batches import tensor_leaves
from ._chunks import Partition
from ._data import fingerprint

__all__ = ["StoreSink", "RankStoreSink", "resumed_chunk_size"]


def _columns(block: torch.Tensor):
    return block.detach().to("cpu", torch.float32).numpy()


def _fingerprint(batch) -> str:
    return fingerprint(tensor_leaves(batch))


def resumed_chunk_size(out) -> int | None:
    """The chunk size recorded in the store ``out`` (or, under ``torchrun``, in a rank's part of it), else None.

    A run with the default chunk size adopts it: the default follows the memory available at the time, so a rerun
    would compute another one and be refused. Rank 0 reads it for every rank.
    """

    def read():
        found = store.recorded_chunk_size(out)
        size = distributed.world()[1]
        for r in range(size if size > 1 else 0):
            found = found or store.recorded_chunk_size(store.part_path(out, r, size))
        return found

    return distributed.broadcast_result(read)  # type: ignore[return-value]


def _check_other_world(out, size: int, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` remove) per-rank parts of ``out`` left by a run on another number of ranks.

    Their chunks follow that run's partition of the chunks over its ranks: resuming them needs the same ``W``.
    """
    out = Path(out)
    pattern = re.compile(re.escape(out.name) + r"\.rank(\d+)of(\d+)$")
    parts = sorted(
        f
        for f in (out.parent.iterdir() if out.parent.is_dir() else ())
        if (m := pattern.match(f.name)) and int(m.group(2)) != size
    )
    if not parts:
        return
    if overwrite:
        for f in parts:
            store.remove_store(f)
        return
    worlds = sorted({int(pattern.match(f.name).group(2)) for f in parts})  # type: ignore[union-attr]
    raise ValueError(
        f"{out}: unfinished per-rank parts of a run on {worlds} rank(s) exist ({[f.name for f in parts]}); this run "
        f"has {size}. Relaunch with torchrun --nproc-per-node={worlds[0]} to resume them, or pass overwrite=True "
        "to start over (it removes them)"
    )


class StoreSink:
    """Chunks written to a resumable score store ``out`` (:class:`ifunc.store.ScoreWriter`), in one process.

    ``meta`` is what defines the scores (:func:`ifunc._store_meta.store_meta`); ``resume`` (``refuse_resume``,
    ``warn_resume``) goes to the writer.
    """

    def __init__(self, out, *, meta: dict, overwrite: bool = False, **resume):
        self.out, self.meta, self.overwrite, self.resume = out, meta, overwrite, resume
        self.count = 0
        self.pending: dict[int, str] = {}

    def chunk_size(self) -> int | None:
        return None if self.overwrite else resumed_chunk_size(self.out)

    def open(self, plan) -> None:
        _check_other_world(self.out, 1, self.overwrite)
        self.writer = store.ScoreWriter(
            self.out,
            n_query=plan.n_query,
            n_train=plan.source.count(),
            chunk_size=plan.chunk,
            meta=self.meta,
            overwrite=self.overwrite,
            **self.resume,
        )

    def close(self) -> None:
        self.writer.close()

    def wants(self, index: int) -> bool:
        return index < self.writer.n_chunks and index not in self.writer.done

    def put(self, index: int, block: torch.Tensor) -> None:
        self.writer.write(index, _columns(block), self.pending.pop(index))

    def seen(self, index: int, batch) -> None:
        self.count += 1
        if index >= self.writer.n_chunks:
            return  # more data than recorded: result() says so
        fp = _fingerprint(batch)
        if index in self.writer.done:
            self.writer.check(index, fp)
        else:
            self.pending[index] = fp

    def result(self):
        if len(self.writer.done) != self.writer.n_chunks or self.count != self.writer.n_chunks:
            raise ValueError(
                f"train data yielded {self.count} chunks, expected the {self.writer.n_chunks} recorded in {self.out}"
            )
        return self.out


class RankStoreSink(StoreSink):
    """Each rank stores the columns of its own chunks in ``out.rank{r}of{W}``; rank 0 merges them into ``out``.

    The ``j``-th chunk a rank owns is its local chunk ``j``. A rank that dies loses at most the chunk it was
    computing; a relaunch resumes each rank where it stopped, and chunks already merged into ``out`` are neither
    recomputed nor copied again. The rank files are deleted after the merge.
    """

    def open(self, plan) -> None:
        part: Partition = plan.partition
        self.rank, self.size = part.index, part.count
        n_train = plan.source.count()
        n_chunks = -(-n_train // plan.chunk)
        self.n_chunks = n_chunks
        self.widths = [min(plan.chunk, n_train - i * plan.chunk) for i in range(n_chunks)]
        self.owned = [[i for i in range(n_chunks) if part._replace(index=r).owns(i)] for r in range(self.size)]
        self.local = {i: j for j, i in enumerate(self.owned[self.rank])}
        self.final_args: dict[str, Any] = dict(
            n_query=plan.n_query, n_train=n_train, chunk_size=plan.chunk, meta=self.meta, **self.resume
        )
        distributed.broadcast_result(lambda: _check_other_world(self.out, self.size, self.overwrite))  # rank 0's

        def finished_in_final():
            if self.overwrite:
                store.remove_store(self.out)  # only if no other process has it open
            if not Path(self.out).exists():
                return {}
            with store.ScoreWriter(self.out, **self.final_args) as writer:  # refuses another run's file
                return {i: writer.fingerprint(i) for i in writer.done}

        self.finished: dict[int, str] = distributed.broadcast_result(finished_in_final)  # type: ignore[assignment]
        self.todo = {i for i in self.owned[self.rank] if i not in self.finished}
        self.writer: Any = None  # a store.ScoreWriter when this rank has chunks to compute
        if self.todo:
            self.writer = store.ScoreWriter(
                store.part_path(self.out, self.rank, self.size),
                overwrite=self.overwrite,
                warn_resume=self.final_args.get("warn_resume"),
                **self.part_args(self.rank),
            )

    def part_args(self, r: int) -> dict:
        local = sum(self.widths[i] for i in self.owned[r])
        args = dict(
            self.final_args,
            n_train=local,
            meta=dict(self.final_args["meta"], part=[r, self.size], n_train_total=self.final_args["n_train"]),
        )
        args.pop("warn_resume", None)  # said when a rank resumes its part, not again by the merge
        return args

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def wants(self, index: int) -> bool:
        return index in self.todo and self.local[index] not in self.writer.done

    def put(self, index: int, block: torch.Tensor) -> None:
        self.writer.write(self.local[index], _columns(block), self.pending.pop(index))

    def seen(self, index: int, batch) -> None:
        """Fingerprint this rank's chunks: check those already on disk (merged or in its part), record the rest."""
        self.count += 1
        if index not in self.local:
            return
        fp = _fingerprint(batch)
        if index in self.finished:
            store.check_fingerprint(self.out, index, self.finished[index], fp)
        elif self.local[index] in self.writer.done:
            store.check_fingerprint(self.out, index, self.writer.fingerprint(self.local[index]), fp)
        else:
            self.pending[index] = fp

    def result(self):
        if self.count != self.n_chunks:
            raise ValueError(
                f"train data yielded {self.count} chunks, expected the {self.n_chunks} of "
                f"{self.final_args['n_train']} examples"
            )
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        distributed.barrier()
        distributed.broadcast_result(
            lambda: store.merge_parts(self.out, self.size, self.final_args, self.part_args, self.owned.__getitem__)
        )
        return self.out
