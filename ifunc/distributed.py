"""Collectives for ``torchrun``: world and rank, all-reduce, broadcast, gather; no-ops without a process group.

A leaf: it imports no ifunc module outside the ranks group (:mod:`ifunc._ranks`: the world, the collectives'
device and the shape/dtype handshakes; :func:`world`, :func:`active` and :func:`check_same` are re-exported here),
and is called only by the orchestrating layers (the solvers hand the curvature operators their rank's partition
of the data; :func:`ifunc.attribute` picks a sink that gathers columns or merges per-rank stores). Under a default
process group (``gloo`` on CPU, ``nccl`` on GPU) ifunc splits its work over the ``W`` ranks and every rank returns
what one process would have; every rank passes the *same* data in the same order (not a ``DistributedSampler``).
Which rank computes what is not decided here: the callers pass the owners, from the one rule of
:class:`ifunc._data.Partition` (``r`` the rank, ``i`` a batch or chunk):

- Sums over the data (curvature products, so every operator-based solver; the Kronecker statistics ``A, S, D, Λ,
  n``): rank ``r`` computes ``i ≡ r (mod W)``, the partial sums are all-reduced, and all ranks hold the same bits,
  so iterative solvers take identical steps everywhere.
- Work per layer (eigendecompositions): layer ``l`` on rank ``l mod W``, shared by an all-reduce in which the
  others contribute zeros in the owner's dtypes (``x + 0 = x`` exactly).
- Scores: chunk ``i`` on rank ``i mod W``, columns all-gathered, or written to per-rank stores merged by rank 0.
  Query gradients are broadcast from rank 0 first (float32 kernels can differ in the last bits between
  processes, and a distributed CG must see the same right-hand sides); self-influence solves rounds of ``W``
  chunks jointly for the same reason.
- Before a collective whose ranks could disagree (statistics, shared eigendecompositions, broadcast queries,
  gathered scores) the ranks swap shapes and dtypes: a mismatch raises ``ValueError`` on every rank, naming what
  disagrees and each rank's shape and dtype, rather than aborting or hanging inside gloo/nccl.
- Monte Carlo labels (``curvature="fisher"``) come from one generator in data order; a rank that skips a batch
  still draws its labels, so the result equals the single-process one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import optree
import torch

from ._ranks import SAME_PARAMS, SAME_QUERIES, _agree, _check_owners, _device, _gather_object, _spec, active, world
from ._ranks import check_same as check_same  # re-exported: a public collective of this module

__all__ = [
    "world",
    "active",
    "reduce_sum",
    "reduce_tensor",
    "reduce_count",
    "reduce_stats",
    "owner_map",
    "broadcast_from_rank0",
    "broadcast_result",
    "gather_columns",
    "gather_rows",
    "barrier",
    "check_same",
]


T = TypeVar("T")


def _all_reduce_exact(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums over the ranks, each in its own dtype (one collective per dtype), on each tensor's device.

    Every rank must pass the same shapes and dtypes in the same order (the callers check it first).
    """
    out = list(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for j, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(j)
    dev = _device()
    for js in groups.values():  # first-appearance order: the same on every rank
        flat = torch.cat([tensors[j].detach().reshape(-1).to(dev) for j in js])
        torch.distributed.all_reduce(flat)
        start = 0
        for j in js:
            t = tensors[j]
            out[j] = flat[start : start + t.numel()].reshape(t.shape).to(t.device)
            start += t.numel()
    return out


def reduce_sum(values: Sequence, names: Sequence[str] | None = None) -> list:
    """All-reduce a list of partial sums (tensors, or the number ``0`` where a rank saw no data).

    Returns the totals, identical on every rank, in the dtype each entry has on the ranks that hold a
    tensor (summed in float64 for floating entries); without a process group the values are returned
    unchanged. One handshake and one collective for the whole list.

    Raises:
      ValueError: on every rank, when the ranks' tensors for one entry differ in shape or dtype, naming the entry
        (``names[j]``, e.g. a layer's statistic) and each rank's shape and dtype.
    """
    values = list(values)
    if not active():
        return values
    specs = [_spec(v) for v in values]
    every = _gather_object(specs)
    agreed = [
        _agree(names[j] if names is not None else f"sum {j}", [ranks[j] for ranks in every], SAME_PARAMS)
        for j in range(len(values))
    ]
    # integer tensors only: summed exactly in int64; otherwise float64 (plain numbers too: 0.5 stays 0.5)
    wide = torch.int64 if all(a is not None and not a[1].is_floating_point for a in agreed) else torch.float64
    parts = []
    for v, a in zip(values, agreed):
        if a is None:  # no rank has a tensor: a plain number, summed as such
            parts.append(torch.tensor([float(v)], dtype=wide))
        elif isinstance(v, torch.Tensor):
            parts.append(v.detach().to(wide))
        else:  # this rank saw no data: zeros shaped like the others' tensors
            parts.append(torch.full(a[0], float(v), dtype=wide))
    totals = _all_reduce_exact(parts)
    return [t.item() if a is None else t.to(a[1]) for t, a in zip(totals, agreed)]


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


def owner_map(
    items: Sequence, fn: Callable[[object], tuple], empty: Callable[[object], tuple], owners: Sequence[int]
) -> list[tuple]:
    """``[fn(item) for item in items]`` with item ``l`` computed on rank ``owners[l]`` and shared.

    The other ranks call ``empty(item)`` for zeros shaped like ``fn(item)``; the owner's result sets the dtype
    (a placeholder in another dtype is cast: zeros are zeros in any dtype), and an all-reduce of the owner's
    tensors with those zeros, in the owner's dtypes, gives every rank the owner's exact values (``x + 0 = x``).
    Without a process group every item is computed here.

    Raises:
      ValueError: ``owners`` is not one rank per item; on every rank, when a placeholder's shape differs from the
        owner's result (naming the item).
    """
    rank, size = world()
    _check_owners(owners, len(items), size)
    if size == 1:
        return [tuple(fn(x)) for x in items]
    local = [tuple(fn(x)) if owners[i] == rank else tuple(empty(x)) for i, x in enumerate(items)]
    every = _gather_object([[_spec(t) for t in tup] for tup in local])
    flat = []
    for i, (x, tup) in enumerate(zip(items, local)):
        owner = every[owners[i]][i]
        shapes = [[s[0] if s else None for s in ranks[i]] for ranks in every]
        if any(s != shapes[owners[i]] for s in shapes):
            raise ValueError(
                f"the zeros standing in for {x!r} (computed on rank {owners[i]}) have shapes {shapes} per rank; "
                "empty(item) must return zeros shaped like fn(item)"
            )
        flat.extend(t.to(s[1]) for t, s in zip(tup, owner))
    flat = _all_reduce_exact(flat)
    out, start = [], 0
    for tup in local:
        out.append(tuple(flat[start : start + len(tup)]))
        start += len(tup)
    return out


def reduce_stats(acc: dict[str, dict], keys: str, extra: dict | None = None) -> None:
    """All-reduce, in place, the entries ``keys`` of every ``acc[layer]`` and every entry of ``extra``."""
    if not active():
        return
    extra = {} if extra is None else extra
    where = [(acc[name], k) for name in acc for k in keys] + [(extra, k) for k in extra]
    names = [f"layer {name!r} statistic {k}" for name in acc for k in keys] + [f"the diagonal of {k!r}" for k in extra]
    for (d, k), total in zip(where, reduce_sum([d[k] for d, k in where], names)):
        d[k] = total


def gather_columns(mine: list[torch.Tensor], widths: list[int], owners: Sequence[int]) -> torch.Tensor:
    """All-gather column blocks: block ``i`` (width ``widths[i]``, examples on the last axis) is held by rank
    ``owners[i]``; ``mine`` are this rank's blocks in order. Returns the concatenation ``[..., Σ widths]`` on
    every rank (the blocks themselves without a process group).

    Raises:
      ValueError: no block at all; ``owners`` is not one rank per block; on every rank, when the ranks' blocks
        disagree in shape (all axes but the last) or dtype.
    """
    _, size = world()
    _check_owners(owners, len(widths), size)
    if not active():
        if not mine:
            raise ValueError("the training data yielded no examples")
        return torch.cat(mine, dim=-1)
    local = torch.cat(mine, dim=-1) if mine else None
    spec = _agree(
        "the score columns (all axes but the last)",
        _gather_object(None if local is None else (tuple(local.shape[:-1]), local.dtype)),
        SAME_QUERIES,
    )
    if spec is None:
        raise ValueError("the training data yielded no examples")
    lead, dtype = spec
    per_rank = [sum(w for w, o in zip(widths, owners) if o == r) for r in range(size)]
    longest = max(per_rank)
    dev = _device()
    home = local.device if local is not None else dev  # a rank without chunks: where its collectives run
    buf = torch.zeros(*lead, longest, dtype=dtype, device=dev)
    if local is not None:
        buf[..., : local.shape[-1]] = local.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(size)]
    torch.distributed.all_gather(bufs, buf)
    cols, used = [], [0] * size
    for w, r in zip(widths, owners):
        cols.append(bufs[r][..., used[r] : used[r] + w])
        used[r] += w
    return torch.cat(cols, dim=-1).to(home)


def broadcast_result(fn: Callable[[], object]):
    """Run ``fn`` on rank 0 and hand its result (or its error) to every rank (just ``fn()`` on one process)."""
    if not active():
        return fn()
    rank, _ = world()
    box: list[Any] = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as err:  # re-raised on every rank, so no rank waits forever
            box[1] = err
    torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def broadcast_from_rank0(tree: T) -> T:
    """Rank 0's tensors of a pytree on every rank (a broadcast); the tree itself without a process group.

    The ranks first compare their leaves' shapes and dtypes: a mismatch (ranks given different queries, or
    parameters in different dtypes) raises ValueError on every rank naming the leaf and each rank's shape and dtype.

    Two processes running the same code on the same data can differ in the last bits (the BLAS kernels
    depend on memory alignment). Whatever feeds a solver whose products are all-reduced (CG, LiSSA)
    must be bitwise the same on every rank, or the ranks would take different branches (a converged
    column dropped on one rank only) and their collectives would no longer match.
    """
    if not active():
        return tree
    leaves = optree.tree_leaves(tree, namespace="ifunc", none_is_leaf=True)  # pyright: ignore[reportArgumentType]
    every = _gather_object([_spec(t) for t in leaves])
    for j in range(max(len(e) for e in every)):  # a mismatch would otherwise abort inside the collective
        per_rank = [e[j] if j < len(e) else None for e in every]
        _agree(f"tensor {j} broadcast from rank 0 (the queries prepared for scoring)", per_rank, SAME_QUERIES)
    dev = _device()

    def bcast(t):
        if not isinstance(t, torch.Tensor):
            return t
        buf = t.detach().to(dev).contiguous().clone()
        torch.distributed.broadcast(buf, src=0)
        return buf.to(t.device)

    out: Any = optree.tree_map(bcast, tree, namespace="ifunc", none_is_leaf=True)  # pyright: ignore[reportArgumentType]  # any pytree
    return out  # the same structure as ``tree``


def gather_rows(local: torch.Tensor | None, widths: list[int], d: int) -> torch.Tensor:
    """All-gather one round of row blocks: rank ``r`` holds block ``r`` ``[widths[r], d]`` (or None when the
    round has fewer blocks than ranks). Returns ``[Σ widths, d]`` in rank order on every rank."""
    rank, size = world()
    if size == 1:
        return local if local is not None else torch.zeros(0, d)
    # a rank without a block in the last round learns the dtype from the others (not the default dtype)
    spec = _agree(
        "the gradient rows of a self-influence round",
        _gather_object(None if local is None else (tuple(local.shape[1:]), local.dtype)),
        SAME_PARAMS,
    )
    assert spec is not None  # rank 0 holds the round's first block
    dev = _device()
    home = local.device if local is not None else dev
    buf = torch.zeros(max(widths), d, dtype=spec[1], device=dev)
    if local is not None:
        buf[: local.shape[0]] = local.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(size)]
    torch.distributed.all_gather(bufs, buf)
    return torch.cat([bufs[r][:w] for r, w in enumerate(widths)]).to(home)


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if active():
        torch.distributed.barrier()
