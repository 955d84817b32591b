"""torch.distributed: data-parallel curvature, factors and scores, used automatically under ``torchrun``.

Nothing here is called by users. When a default process group is initialised (``gloo`` on CPU, ``nccl``
on GPU) the public functions of ifunc split their work across the ``W`` ranks and return on every rank
what one process would have returned; without a process group every hook below is the identity and
costs nothing. Every rank must pass the *same* data, in the same order (not a ``DistributedSampler``).

How the work is split (``r`` the rank, ``W`` the world size, ``i`` the index of a batch or chunk):

- Sums over the data: rank ``r`` computes the batches with ``i mod W = r`` and the partial sums are
  all-reduced, ``Σ_i x_i = Σ_r Σ_{i ≡ r} x_i``. This covers the curvature products
  ``M V = (1/n) Σ_b M_b V`` (so CG, Arnoldi, Nyström, full-batch LiSSA and the explicit solve are
  distributed through their operator) and the Kronecker statistics ``A``, ``S``, ``D``, ``Λ`` and ``n``.
  Every rank then holds the same numbers: an all-reduce hands one result to all ranks (for two ranks
  ``a + b = b + a`` bit for bit), so the iterative solvers take identical steps everywhere.
- Work per layer (eigendecompositions): layer ``l`` is computed by rank ``l mod W`` and shared by an
  all-reduce in which every other rank contributes zeros (``x + 0 = x`` exactly, so all ranks hold the
  owner's bits).
- Scores: train chunk ``i`` is scored by rank ``i mod W``; the columns are all-gathered into the full
  ``[n_query, n_train]`` matrix on every rank, or written by each rank into its own resumable store
  ``out.rank{r}of{W}`` and merged into ``out`` by rank 0 once all ranks are done. Query gradients are
  broadcast from rank 0 before they are preconditioned (once, by all ranks together when the solve is
  distributed): float32 kernels can differ in the last bits between processes, and a distributed CG must
  see the same right-hand sides everywhere. Self-influence gathers each round of ``W`` gradient chunks
  and solves it jointly, for the same reason.

Monte Carlo labels (``curvature="fisher"``) are drawn from one generator in data order; a rank that
skips a batch still runs its forward pass and draws its labels, so the labels (and the result) equal the
single-process ones.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ._data import DataSource, batch_size

__all__ = ["world", "active", "check_data", "shard", "batches", "chunk_size", "reduce_sum", "reduce_tensor", "reduce_count",
           "reduce_stats", "owner_map", "same", "gather_chunks", "solve_rounds", "scores_to_store", "part_path"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return world()[1] > 1


def shard(items: Iterable) -> Iterator[tuple[bool, object]]:
    """``(mine, item)`` for every item, ``mine`` true on the rank ``index mod W``.

    Every rank walks the whole sequence (skipped items may still need a cheap step, such as drawing
    their Monte Carlo labels) and computes only its own.
    """
    rank, size = world()
    for index, item in enumerate(items):
        yield index % size == rank, item


def batches(source: DataSource, *, split: bool = True) -> Iterable:
    """The batches to shard: the data's own batches, or ``W`` equal pieces of data held in fewer batches.

    One in-memory batch (the common small case) would leave all but one rank idle, so with ``split`` the
    data is cut into ``W`` chunks of ``⌈n / W⌉`` examples. The curvature is a sum over examples, so the
    result does not depend on the cut (up to rounding).
    """
    _, size = world()
    held = source._batches
    if size > 1 and split and isinstance(held, list) and len(held) < size:
        return list(source.chunks(math.ceil(len(source) / size)))  # in memory already: views, re-iterable
    return source


def _device() -> torch.device:
    """Where collectives run: the current GPU for nccl, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_object(obj) -> list:
    out = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def reduce_sum(values: Sequence) -> list:
    """All-reduce a list of partial sums (tensors, or the number ``0`` where a rank saw no data).

    Returns the totals, identical on every rank, in the dtype each entry has on the ranks that hold a
    tensor; without a process group the values are returned unchanged. One collective for the whole list.
    """
    values = list(values)
    if not active():
        return values
    specs = [(tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else None for v in values]
    every = _gather_object([None if s is None else (s[0], s[1]) for s in specs])
    agreed = []
    for j in range(len(values)):
        found = [ranks[j] for ranks in every if ranks[j] is not None]
        if not found:  # no rank has a tensor: a plain number, summed as such
            agreed.append(None)
            continue
        if any(f != found[0] for f in found):
            raise RuntimeError(f"ranks disagree on the shape/dtype of a statistic: {found}")
        agreed.append(found[0])
    wide = torch.float64 if any(a is not None and a[1].is_floating_point for a in agreed) else torch.int64
    dev = _device()
    parts = []
    for v, a in zip(values, agreed):
        if a is None:
            parts.append(torch.tensor([float(v)], dtype=wide, device=dev))
        elif isinstance(v, torch.Tensor):
            parts.append(v.detach().reshape(-1).to(dev, wide))
        else:
            parts.append(torch.full((math.prod(a[0]),), float(v), dtype=wide, device=dev))
    flat = torch.cat(parts)
    torch.distributed.all_reduce(flat)
    out, start = [], 0
    for v, a, s in zip(values, agreed, specs):
        if a is None:
            out.append(flat[start].item())
            start += 1
            continue
        size = math.prod(a[0])
        home = s[2] if s is not None else torch.device("cpu")
        out.append(flat[start:start + size].reshape(a[0]).to(home, a[1]))
        start += size
    return out


def reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of a tensor every rank holds (same shape and dtype): one all-reduce, no handshake."""
    if not active():
        return t
    buf = t.detach().to(_device()).contiguous().clone()
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def reduce_count(n: int) -> int:
    """Total of an integer count over the ranks (exact)."""
    if not active():
        return n
    t = torch.tensor([int(n)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(t)
    return int(t.item())


def owner_map(items: Sequence, fn: Callable[[object], tuple], empty: Callable[[object], tuple]) -> list[tuple]:
    """``[fn(item) for item in items]`` with item ``l`` computed on rank ``l mod W`` and shared.

    ``empty(item)`` returns zeros shaped like ``fn(item)``; the owner's tensors are shared by an
    all-reduce with those zeros, so every rank ends with the owner's exact values.
    """
    rank, size = world()
    if size == 1:
        return [fn(x) for x in items]
    local = [fn(x) if i % size == rank else empty(x) for i, x in enumerate(items)]
    lengths = [len(t) for t in local]
    flat = reduce_sum([t for tup in local for t in tup])
    out, start = [], 0
    for k in lengths:
        out.append(tuple(flat[start:start + k]))
        start += k
    return out


def gather_chunks(chunks: Iterable, compute: Callable, *, wrap=lambda it: it) -> torch.Tensor:
    """Run ``compute(batch, offset)`` on this rank's chunks and all-gather the columns in chunk order.

    ``compute`` returns ``[..., b]`` (examples on the last axis); the result is the concatenation over
    all chunks, ``[..., n]``, on every rank. ``wrap`` decorates the chunk iterator (a progress bar).
    """
    rank, size = world()
    mine, widths, offset = [], [], 0
    for index, batch in enumerate(wrap(chunks)):
        b = batch_size(batch)
        if index % size == rank:
            mine.append(compute(batch, offset))
        widths.append(b)
        offset += b
    return _assemble(mine, widths)


def _assemble(mine: list[torch.Tensor], widths: list[int]) -> torch.Tensor:
    rank, size = world()
    local = torch.cat(mine, dim=-1) if mine else None
    specs = _gather_object(None if local is None else (tuple(local.shape[:-1]), local.dtype))
    spec = next((s for s in specs if s is not None), None)
    if spec is None:
        raise ValueError("the training data yielded no examples")
    lead, dtype = spec
    per_rank = [sum(w for i, w in enumerate(widths) if i % size == r) for r in range(size)]
    longest = max(per_rank)
    home = local.device if local is not None else torch.device("cpu")
    dev = _device()
    buf = torch.zeros(*lead, longest, dtype=dtype, device=dev)
    if local is not None:
        buf[..., :local.shape[-1]] = local.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(size)]
    torch.distributed.all_gather(bufs, buf)
    cols, used = [], [0] * size
    for i, w in enumerate(widths):
        r = i % size
        cols.append(bufs[r][..., used[r]:used[r] + w])
        used[r] += w
    return torch.cat(cols, dim=-1).to(home)


def _broadcast_result(fn: Callable[[], object]):
    """Run ``fn`` on rank 0 and hand its result (or its error) to every rank."""
    rank, _ = world()
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as err:  # re-raised on every rank, so no rank waits forever
            box[1] = err
    torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def part_path(out, rank: int, size: int) -> Path:
    """File of one rank's columns: ``out.rank{r}of{W}``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}of{size}")


def scores_to_store(out, chunks: Iterable, compute: Callable, *, n_query: int, n_train: int, chunk: int,
                    meta: dict, overwrite: bool, wrap=lambda it, total: it):
    """Sharded ``attribute(..., out=)``: each rank writes its own chunks, rank 0 merges into ``out``.

    Rank ``r`` stores the columns of its chunks ``i ≡ r (mod W)`` contiguously in ``out.rank{r}of{W}``
    (local chunk ``j`` is global chunk ``jW + r``), a score store of its own with per-chunk done flags, so
    a rank that dies loses at most the chunk it was computing and a relaunch resumes each rank where it
    stopped. Once every rank has finished, rank 0 copies the chunks into ``out`` (also resumable; chunks
    already in ``out`` are never recomputed or copied again) and deletes the rank files.
    """
    from . import store

    rank, size = world()
    n_chunks = -(-n_train // chunk)
    widths = [min(chunk, n_train - i * chunk) for i in range(n_chunks)]
    final_args = dict(n_query=n_query, n_train=n_train, chunk_size=chunk, meta=meta)

    def part_args(r):
        local = sum(w for i, w in enumerate(widths) if i % size == r)
        return dict(n_query=n_query, n_train=local, chunk_size=chunk,
                    meta=dict(meta, part=[r, size], n_train_total=n_train))

    def finished_in_final():
        if overwrite:
            store.remove_store(out)
        if not Path(out).exists():
            return set()
        with store.ScoreWriter(out, **final_args) as writer:  # validates: refuses another run's file
            return set(writer.done)

    finished = _broadcast_result(finished_in_final)
    mine = [i for i in range(n_chunks) if i % size == rank and i not in finished]
    if mine:
        with store.ScoreWriter(part_path(out, rank, size), overwrite=overwrite, **part_args(rank)) as writer:
            offset, seen, todo = 0, 0, set(mine)
            for index, batch in enumerate(wrap(chunks, n_chunks)):
                if index in todo and index // size not in writer.done:
                    writer.write(index // size, compute(batch, offset).detach().to("cpu", torch.float32).numpy())
                offset += batch_size(batch)
                seen += 1
            if seen != n_chunks:
                raise ValueError(f"train data yielded {seen} chunks, expected the {n_chunks} of {n_train} examples")
    torch.distributed.barrier()

    def merge():
        with store.ScoreWriter(out, **final_args) as final:
            for r in range(size):
                path = part_path(out, r, size)
                if not path.exists():
                    continue
                with store.ScoreWriter(path, **part_args(r)) as part:
                    for j in sorted(part.done):
                        if j * size + r not in final.done:
                            final.write(j * size + r, part.read(j))
            missing = n_chunks - len(final.done)
        if missing:
            raise ValueError(f"{out}: {missing} of {n_chunks} chunks are missing after the merge")
        for r in range(size):
            store.remove_store(part_path(out, r, size))
        return out

    return _broadcast_result(merge)


def chunk_size(source: DataSource, size: int, *, split: bool = True) -> int:
    """Chunk width for sharded passes: ``size``, or ``⌈n / W⌉`` when that is smaller and ``n`` is known.

    Without it, data smaller than ``W`` chunks would keep some ranks idle. ``split=False`` keeps ``size``
    (for Monte Carlo labels, whose draws are grouped per chunk).
    """
    _, ranks = world()
    n = source.cheap_count() if ranks > 1 and split else None
    return max(1, min(size, math.ceil(n / ranks))) if n else size


def reduce_stats(acc: dict[str, dict], keys: str, extra: dict | None = None) -> None:
    """All-reduce, in place, the entries ``keys`` of every ``acc[layer]`` and every entry of ``extra``."""
    if not active():
        return
    extra = {} if extra is None else extra
    where = [(acc[name], k) for name in acc for k in keys] + [(extra, k) for k in extra]
    for (d, k), total in zip(where, reduce_sum([d[k] for d, k in where])):
        d[k] = total


def solve_rounds(chunks: Iterable, grads: Callable, finish: Callable, d: int) -> torch.Tensor:
    """Per-example ``finish(G) [b]`` over all chunks, where ``finish`` may run a collective solve.

    A solver whose products are all-reduced over the data (CG, LiSSA) must see the same right-hand sides
    on every rank. So chunks go in rounds of ``W``: rank ``r`` computes the gradients ``G_r = grads(batch,
    offset) [b_r, d]`` of the round's ``r``-th chunk, the blocks are all-gathered, and every rank calls
    ``finish`` on the whole round ``[Σ b_r, d]`` (in chunk order), which is therefore the full result.
    """
    rank, size = world()
    out, offset, held = [], 0, []

    def flush():
        widths = [b for b, _ in held]
        local = next((g for r, (_, g) in enumerate(held) if r == rank and g is not None), None)
        if local is None:
            local = torch.zeros(0, d, dtype=torch.get_default_dtype())
        home, dev = local.device, _device()
        buf = torch.zeros(max(widths), d, dtype=local.dtype, device=dev)
        buf[:local.shape[0]] = local.to(dev)
        bufs = [torch.empty_like(buf) for _ in range(size)]
        torch.distributed.all_gather(bufs, buf)
        G = torch.cat([bufs[r][:w] for r, w in enumerate(widths)]).to(home)
        out.append(finish(G))
        held.clear()

    for index, batch in enumerate(chunks):
        b = batch_size(batch)
        held.append((b, grads(batch, offset) if index % size == rank else None))
        offset += b
        if len(held) == size:
            flush()
    if held:
        flush()
    if not out:
        raise ValueError("the training data yielded no examples")
    return torch.cat(out)


def same(tree):
    """Rank 0's tensors of a pytree on every rank (a broadcast); the tree itself without a process group.

    Two processes running the same code on the same data can differ in the last bits (the BLAS kernels
    depend on memory alignment). Whatever feeds a solver whose products are all-reduced (CG, LiSSA)
    must be bitwise the same on every rank, or the ranks would take different branches (a converged
    column dropped on one rank only) and their collectives would no longer match.
    """
    if not active():
        return tree
    import optree

    dev = _device()

    def bcast(t):
        if not isinstance(t, torch.Tensor):
            return t
        buf = t.detach().to(dev).contiguous().clone()
        torch.distributed.broadcast(buf, src=0)
        return buf.to(t.device)

    return optree.tree_map(bcast, tree, namespace="ifunc", none_is_leaf=True)


def check_data(source: DataSource) -> None:
    """Raise on every rank unless all ranks see the same data: same size, same first batch.

    ifunc shards the data itself, so each rank must pass all of it, in the same order; a
    ``DistributedSampler`` (each rank a different part) or an unseeded shuffle would otherwise give
    silently wrong sums. Never an extra pass over the data: the size is compared when it is known cheaply
    (in memory, or a DataLoader's sampler, which is where a ``DistributedSampler`` shows).
    """
    if not active():
        return
    import optree

    from .store import fingerprint

    first = next(iter(source))
    leaves = [t for t in optree.tree_leaves(first, namespace="ifunc") if isinstance(t, torch.Tensor)]
    seen = _gather_object((source.cheap_count(), fingerprint(leaves)))
    if any(s != seen[0] for s in seen):
        raise ValueError(
            f"{source.name}: the ranks hold different data ({[s[0] for s in seen]} examples per rank, or a "
            "different first batch); under torch.distributed every rank must pass the same, complete data in "
            "the same order (no DistributedSampler, no unseeded shuffling): ifunc shards it across the ranks"
        )
