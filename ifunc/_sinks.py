"""Where the columns of a score matrix go: memory, an HDF5 store, or all ranks (gathered or merged on disk).

A *sink* receives column blocks ``[..., b]`` of chunk ``index`` (examples on the last axis). The one scoring
loop of :func:`ifunc.attribute` shows the sink every chunk first, ``sink.seen(index, batch)`` (the stores
fingerprint it: a chunk already on disk must hold the same training data, a new one is recorded with its
columns), then asks ``sink.wants(index)`` (is it mine, and not already on disk?), computes only those
(``sink.put(index, block)``), and ends with ``sink.result()``:

* :class:`MemorySink`: every chunk, concatenated (per-token blocks ``[q, b, T]`` padded to the longest ``T``);
* :class:`GatherSink` (``torchrun``): chunk ``i`` on rank ``i mod W``, all-gathered into the full matrix;
* :class:`StoreSink`: chunks not yet done in a resumable :class:`ifunc.store.ScoreWriter`;
* :class:`RankStoreSink` (``torchrun`` and ``out=``): each rank a resumable store of its own chunks,
  merged into ``out`` by rank 0 once all are done.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from . import distributed, store
from ._data import DataSource, batch_size, fingerprint, tensor_leaves
from ._identity import run_identity
from ._version import __version__
from .functional import flatten
from .ihvp._base import IHVP

__all__ = ["MemorySink", "GatherSink", "StoreSink", "RankStoreSink", "store_meta", "resumed_chunk_size"]


class MemorySink:
    """All columns in memory. ``tokens=True``: blocks ``[q, b, T]`` zero-padded at the end to the longest ``T``."""

    def __init__(self, tokens: bool = False):
        self.blocks: list[torch.Tensor] = []
        self.tokens = tokens

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

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
    """Chunk ``i`` is computed on rank ``i mod W``; the columns are all-gathered in chunk order."""

    def __init__(self):
        super().__init__()
        self.rank, self.size = distributed.world()
        self.widths: list[int] = []

    def wants(self, index: int) -> bool:
        return index % self.size == self.rank

    def seen(self, index: int, batch) -> None:
        self.widths.append(batch_size(batch))

    def result(self):
        return distributed.gather_columns(self.blocks, self.widths)


def _columns(block: torch.Tensor):
    return block.detach().to("cpu", torch.float32).numpy()


def _fingerprint(batch) -> str:
    return fingerprint(tensor_leaves(batch))


def _check_other_world(out, size: int, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` remove) per-rank parts of ``out`` left by a run on another number of ranks.

    Their chunks follow that run's split (chunk ``i`` on rank ``i mod W``): resuming them needs the same ``W``.
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
    """Chunks written to a resumable score store; a chunk already done is never recomputed.

    Every chunk is fingerprinted: a chunk already done must match the fingerprint recorded with it (else the
    training data changed and the run is refused before anything is written), a new one is written with it.
    ``resume`` (``refuse_resume``, ``warn_resume``) goes to :class:`ifunc.store.ScoreWriter`.
    """

    def __init__(self, out, *, n_query: int, n_train: int, chunk: int, meta: dict, overwrite: bool, **resume):
        self.out = out
        self.args: dict[str, Any] = dict(
            n_query=n_query, n_train=n_train, chunk_size=chunk, meta=meta, overwrite=overwrite, **resume
        )
        self.count = 0
        self.pending: dict[int, str] = {}

    def __enter__(self):
        _check_other_world(self.out, 1, bool(self.args["overwrite"]))
        self.writer = store.ScoreWriter(self.out, **self.args)
        return self

    def __exit__(self, *exc):
        self.writer.close()
        return False

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


class RankStoreSink:
    """Rank ``r`` stores the columns of its chunks ``i ≡ r (mod W)`` in ``out.rank{r}of{W}``; rank 0 merges.

    Local chunk ``j`` of rank ``r`` is global chunk ``j·W + r``. A rank that dies loses at most the chunk it
    was computing; a relaunch resumes each rank where it stopped, and chunks already merged into ``out``
    are neither recomputed nor copied again. The rank files are deleted after the merge.
    """

    def __init__(self, out, *, n_query: int, n_train: int, chunk: int, meta: dict, overwrite: bool, **resume):
        self.out, self.overwrite = out, overwrite
        self.rank, self.size = distributed.world()
        self.n_chunks = -(-n_train // chunk)
        self.widths = [min(chunk, n_train - i * chunk) for i in range(self.n_chunks)]
        self.final_args: dict[str, Any] = dict(n_query=n_query, n_train=n_train, chunk_size=chunk, meta=meta, **resume)
        self.count = 0
        self.pending: dict[int, str] = {}

    def part_args(self, r: int) -> dict:
        local = sum(w for i, w in enumerate(self.widths) if i % self.size == r)
        args = dict(
            self.final_args,
            n_train=local,
            meta=dict(self.final_args["meta"], part=[r, self.size], n_train_total=self.final_args["n_train"]),
        )
        args.pop("warn_resume", None)  # said when a rank resumes its part, not again by the merge
        return args

    def __enter__(self):
        distributed.broadcast_result(lambda: _check_other_world(self.out, self.size, self.overwrite))  # rank 0's

        def finished_in_final():
            if self.overwrite:
                store.remove_store(self.out)  # only if no other process has it open
            if not Path(self.out).exists():
                return {}
            with store.ScoreWriter(self.out, **self.final_args) as writer:  # refuses another run's file
                return {i: writer.fingerprint(i) for i in writer.done}

        self.finished: dict[int, str] = distributed.broadcast_result(finished_in_final)  # type: ignore[assignment]
        self.todo = {i for i in range(self.n_chunks) if i % self.size == self.rank and i not in self.finished}
        self.writer: Any = None  # a store.ScoreWriter when this rank has chunks to compute
        if self.todo:
            self.writer = store.ScoreWriter(
                store.part_path(self.out, self.rank, self.size),
                overwrite=self.overwrite,
                warn_resume=self.final_args.get("warn_resume"),
                **self.part_args(self.rank),
            )
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
        return False

    def wants(self, index: int) -> bool:
        return index in self.todo and index // self.size not in self.writer.done

    def put(self, index: int, block: torch.Tensor) -> None:
        self.writer.write(index // self.size, _columns(block), self.pending.pop(index))

    def seen(self, index: int, batch) -> None:
        """Fingerprint this rank's chunks: check those already on disk (merged or in its part), record the rest."""
        self.count += 1
        if index % self.size != self.rank or index >= self.n_chunks:
            return
        fp = _fingerprint(batch)
        if index in self.finished:
            store.check_fingerprint(self.out, index, self.finished[index], fp)
        elif index // self.size in self.writer.done:
            store.check_fingerprint(self.out, index, self.writer.fingerprint(index // self.size), fp)
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
        distributed.broadcast_result(lambda: store.merge_parts(self.out, self.size, self.final_args, self.part_args))
        return self.out


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


def store_meta(
    loss, params, ihvp, query, measurement, query_rank, dtype, identity: str | None = None
) -> tuple[dict, dict]:
    """What defines the scores of a store, and how far resuming one can be trusted: ``(meta, resume)``.

    ``meta`` holds the method's build inputs as far as the closure shows them: its name, the damping
    resolved per block (Kronecker family), every JSON-able ``info`` value (tolerances, rank, curvature kind,
    ``info["blocks"]``), a summary ``[numel, Σ|x|, Σx²]`` of each curvature tensor it holds (eigenvalues, the
    eigenvalues and diagonals of Kronecker blocks), its ``identity`` attribute if it has one, the measurement,
    query rank, score dtype and fingerprints of the parameters and queries. Training data is fingerprinted
    chunk by chunk by the store sinks. ``resume`` (for :class:`ifunc.store.ScoreWriter`): ``refuse_resume``
    for a callable that is not an ifunc closure and carries no ``identity`` (nothing tells two apart);
    ``warn_resume`` for a closure whose curvature data is invisible to it (CG, LiSSA, DataInf). ``defined_by``
    holds content hashes of the loss, the measurement and the model (a Kronecker closure's), or the user's
    ``identity`` (:func:`ifunc._identity.run_identity`).
    """

    def summary(t: torch.Tensor) -> list:  # robust to last-bit differences, unlike a hash
        t = t.detach().to("cpu", torch.float64)
        return [t.numel(), float(t.abs().sum()), float(t.square().sum())]

    def plain(v):  # JSON-able; an object by its type only (its repr may hold a memory address)
        if isinstance(v, (str, int, float, bool, type(None))):
            return v
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return f"<{type(v).__name__}>"

    info = getattr(ihvp, "info", {}) or {}
    model = getattr(ihvp, "model", None)
    closure_identity = getattr(ihvp, "identity", None)
    curvature = {f"info {k}": summary(v) for k, v in info.items() if isinstance(v, torch.Tensor)}
    curvature.update(
        {
            f"layer {b.spec.name}": summary(b.eigenvalues)
            for b in getattr(ihvp, "blocks", ())
            if hasattr(b, "eigenvalues")
        }
    )
    curvature.update({f"diagonal {d.name}": summary(d.diag) for d in getattr(ihvp, "diags", ()) if hasattr(d, "diag")})
    settings = {k: plain(v) for k, v in info.items() if k != "damping" and not isinstance(v, torch.Tensor)}
    damping = info.get("damping") if isinstance(info.get("damping"), dict) else getattr(ihvp, "damping", None)
    query_leaves = [t for b in DataSource(query, name="query") for t in tensor_leaves(b)]
    meta = {
        "method": getattr(ihvp, "name", None) or getattr(ihvp, "__qualname__", type(ihvp).__name__),
        "damping": {k: float(v) for k, v in damping.items()} if isinstance(damping, dict) else damping,
        "method_info": settings,
        "curvature": curvature,
        "identity": None if closure_identity is None else str(closure_identity),
        "measurement": getattr(measurement or loss, "__qualname__", type(measurement or loss).__name__),
        "defined_by": run_identity(
            loss,
            measurement,
            model if isinstance(model, torch.nn.Module) else None,
            identity,
            tracked=params if isinstance(params, dict) else None,
        ),
        "query_rank": query_rank,
        "score_dtype": None if dtype is None else str(dtype),
        "params": fingerprint([flatten(params)[0]]),
        "query": fingerprint(query_leaves),
        "versions": {"ifunc": __version__, "torch": torch.__version__},
    }
    resume = {}
    if not isinstance(ihvp, IHVP) and closure_identity is None:
        resume["refuse_resume"] = (
            f"ihvp is a custom callable ({meta['method']}), which ifunc cannot tell apart from another one, so its "
            "stored scores cannot be trusted to be this closure's. To make such a store resumable, set "
            "ihvp.identity = '<a name that changes whenever the closure does>' before the first run"
        )
    elif (
        isinstance(ihvp, IHVP)
        and not curvature
        and "data" not in info
        and info.get("curvature") != "identity"
        and closure_identity is None
    ):
        resume["warn_resume"] = (
            f"the file records this {meta['method']} closure's method, damping and settings but not the data its "
            "curvature was built on, so a change of that data cannot be detected; make sure it is the same (set "
            "ihvp.identity = '<a name for that data>' before the first run to have it checked)"
        )
    return meta, resume
