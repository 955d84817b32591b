"""Top-k sinks: per query, the ``k`` highest and/or lowest scores and their training indices, in ``O(q·k)`` memory.

A sink of the scoring loop (:mod:`ifunc._sinks`): ``attribute(loss, params, ihvp, train, query, sink=TopK(10))``
never holds the ``[n_query, n_train]`` matrix. Each chunk's columns ``S[:, o : o + b]`` are reduced to their best
``k`` per row and merged into the running best ``k`` as they arrive; memory is the running ``[q, k]`` values and
indices plus the one chunk the loop already holds.

Order. Candidates are ranked by the total order "higher score first, then lower training index" (``largest``) or
"lower score first, then lower training index" (smallest), so ties are broken by the lower index and the answer is
unique and deterministic: it equals the first ``k`` columns of ``torch.sort(S, dim=1, descending=largest,
stable=True)`` of the full matrix (``-0.0`` and ``0.0`` are a tie). Under a total order the best ``k`` of a union are
the best ``k`` of the union of each part's best ``k``, so the result does not depend on the chunk size, on the order
in which chunks arrive, or on how chunks are shared between ``torchrun`` ranks: each rank keeps the best ``k`` of the
chunks it owns (chunk ``i`` on rank ``i mod W``), and :meth:`TopK.result` all-gathers every rank's ``[q, k]``
candidates and merges them, so every rank returns the same answer, equal to one process's.

Blocks must be pairwise scores ``[n_query, b]`` (not ``per_module=`` or ``per_token=`` ones).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import distributed
from ._batches import batch_size
from ._errors import check_count
from ._sinks import ScorePlan

__all__ = ["Ranked", "Extremes", "TopK", "HelpfulHarmful"]


class Ranked(NamedTuple):
    """The best ``k`` training examples per query, best first (like :func:`torch.topk`'s result)."""

    values: torch.Tensor  #: ``[n_query, k]`` scores, in the dtype of the columns the sink received
    indices: torch.Tensor  #: ``[n_query, k]`` int64 training indices (positions in the training data)


class Extremes(NamedTuple):
    """Both ends of each query's scores: ``helpful`` the ``k`` highest (highest first), ``harmful`` the ``k`` lowest
    (lowest, i.e. most negative, first). Positive scores are helpful (see :func:`ifunc.attribute`)."""

    helpful: Ranked
    harmful: Ranked


def _ranked(values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool) -> Ranked:
    """The first ``k`` candidates per row of ``values, indices [q, m]`` in the order (score, then lower index).

    Sorting by index first, then stably by score, orders equal scores by index (``m`` is small: ``2k`` candidates).
    """
    by_index = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = values.sort(dim=1, descending=largest, stable=True).indices[:, :k]
    return Ranked(values.gather(1, by_score), indices.gather(1, by_score))


def _block_best(block: torch.Tensor, offset: int, k: int, largest: bool) -> Ranked:
    """The best ``min(k, b)`` columns per row of ``block [q, b]`` (column ``j`` is training example ``offset + j``).

    With ``t`` the ``k``-th best score of a row, every score better than ``t`` is taken and, of the scores equal to
    ``t``, those of the lowest indices until ``k`` are taken: exactly the first ``k`` of the total order, whichever
    tied column :func:`torch.topk` itself returned. Returned in that order.
    """
    k = min(k, block.shape[1])
    top = block.topk(k, dim=1, largest=largest)
    kth = top.values[:, -1:]
    at_least = block >= kth if largest else block <= kth
    if bool((at_least.sum(dim=1) == k).all()):  # no tie straddles the k-th place: topk's columns are the set
        return _ranked(top.values, top.indices + offset, k, largest)
    better = block > kth if largest else block < kth
    tied = block == kth
    room = k - better.sum(dim=1, keepdim=True)  # tied columns still wanted per row (>= 1)
    take = better | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row; ties by lower column
    columns = take.nonzero()[:, 1].view(block.shape[0], k)  # row-major: ascending columns within each row
    return _ranked(block.gather(1, columns), columns + offset, k, largest)


def _merge(best: Ranked | None, new: Ranked, k: int, largest: bool) -> Ranked:
    """The best ``k`` of two candidate sets ``[q, ·]`` in the total order."""
    if best is None:
        return new
    values = torch.cat([best.values, new.values.to(best.values.dtype)], dim=1)
    return _ranked(values, torch.cat([best.indices, new.indices], dim=1), k, largest)


def _contenders(block: torch.Tensor, offset: int, worst: torch.Tensor, kept: int, largest: bool) -> Ranked | None:
    """The columns of ``block [q, b]`` that could enter a running best of ``kept`` per row whose last (``kept``-th)
    scores are ``worst [q, 1]``.

    A column scoring worse than the last kept one cannot enter; one scoring as well can (a tie with a lower index).
    Only the rows whose best score reaches ``worst`` are searched (after the first chunks, few: a chunk of ``b``
    columns after ``m`` seen holds one of a row's best ``k`` with probability about ``k·b/m`` for exchangeable
    scores). Returned padded to ``[q, c]`` (``c`` the most of any row) with ``∓inf`` scores, which never enter, or
    None when there are more than four per kept entry (then ranking the block whole is cheaper).
    """
    q = block.shape[0]
    reach = block.amax(dim=1, keepdim=True) >= worst if largest else block.amin(dim=1, keepdim=True) <= worst
    hot = reach.squeeze(1).nonzero().squeeze(1)  # rows with at least one contender
    keep = block[hot] >= worst[hot] if largest else block[hot] <= worst[hot]
    counts = keep.sum(dim=1, dtype=torch.int64)
    if int(counts.sum()) > 4 * q * kept:
        return None
    width = int(counts.max()) if hot.numel() else 0
    values = block.new_full((q, width), -torch.inf if largest else torch.inf)
    indices = torch.full((q, width), torch.iinfo(torch.int64).max, dtype=torch.int64)
    if width:
        local, columns = keep.nonzero().unbind(1)  # row-major: grouped by row, ascending columns
        slot = torch.arange(local.numel()) - (counts.cumsum(0) - counts)[local]
        values[hot[local], slot] = block[hot[local], columns]
        indices[hot[local], slot] = columns + offset
    return Ranked(values, indices)


def _update(best: Ranked | None, block: torch.Tensor, offset: int, k: int, largest: bool) -> Ranked:
    """The best ``k`` per row of ``best`` and the columns of ``block [q, b]`` (training examples ``offset + j``).

    Once ``best`` holds ``k`` per row, only the block's columns that tie or beat its ``k``-th are ranked (few, after
    the first chunks); otherwise the block's own best ``k`` are merged in.
    """
    if best is not None and best.values.shape[1] == k:
        few = _contenders(block, offset, best.values[:, -1:], k, largest)
        if few is not None:
            return best if few.values.shape[1] == 0 else _merge(best, few, k, largest)
    return _merge(best, _block_best(block, offset, k, largest), k, largest)


class TopK:
    """Sink: per query, the ``k`` highest scores (``largest=False``: lowest) and their training indices.

    ``ifunc.attribute(loss, params, ihvp, train, query, sink=TopK(k))`` returns :class:`Ranked` ``(values [q, k],
    indices [q, k])``, best first, ties broken by the lower index: the first ``k`` columns of ``torch.sort(scores,
    dim=1, descending=largest, stable=True)`` of the full matrix, computed in ``O(q·k)`` memory beside one chunk
    (see the module docstring for the merge and ``torchrun``). ``train`` may be training data (any closure) or a
    gradient index. With ``attribute(..., normalize="cosine" | "relatif")`` it ranks the normalised scores (both
    give each query the same order: they differ by a positive factor per query).

    Args:
      k: examples per query (``1 <= k <= n_train``).
      largest: keep the highest scores (most helpful) if True, the lowest (most harmful) if False.

    Raises (from the call that drives the sink):
      ValueError: ``k`` exceeds the number of training examples; the blocks are not pairwise ``[n_query, b]``
        scores (``per_module=``, ``per_token=``).
      TypeError: ``k`` not an int, ``largest`` not a bool.

    Example:
      >>> best = ifunc.attribute(loss, params, ihvp, train, query, sink=TopK(10))
      >>> best.indices[0]        # the 10 most helpful training examples of query 0
    """

    def __init__(self, k: int, *, largest: bool = True):
        self.k = check_count(k, "k", type(self).__name__)
        if not isinstance(largest, bool):
            raise TypeError(f"{type(self).__name__}: largest must be True or False, got {largest!r}")
        self.directions: tuple[bool, ...] = (largest,)

    def chunk_size(self) -> int | None:
        return None

    def open(self, plan: ScorePlan) -> None:
        self.plan = plan
        self.offsets: list[int] = []  # first training index of every chunk seen
        self.seen_examples = 0
        self.best: list[Ranked | None] = [None] * len(self.directions)
        self._check_k(plan.source.cheap_count())

    def _check_k(self, n: int | None) -> None:
        if n is not None and self.k > n:
            raise ValueError(
                f"{type(self).__name__}: k={self.k} exceeds the {n} training examples; pass k <= {n}, or "
                "compute the full matrix without sink="
            )

    def seen(self, index: int, batch) -> None:
        self.offsets.append(self.seen_examples)
        self.seen_examples += batch_size(batch)

    def wants(self, index: int) -> bool:
        return True

    def put(self, index: int, block: torch.Tensor) -> None:
        if block.dim() != 2 or block.shape[0] != self.plan.n_query:
            raise ValueError(
                f"{type(self).__name__} ranks pairwise scores [n_query={self.plan.n_query}, b]; got a block of shape "
                f"{list(block.shape)}: drop per_module=/per_token=, or use the default sink"
            )
        for j, largest in enumerate(self.directions):
            self.best[j] = _update(self.best[j], block, self.offsets[index], self.k, largest)

    def _gathered(self, j: int) -> Ranked:
        """Direction ``j``'s best ``k`` over every rank's chunks (this rank's own without a split of the chunks)."""
        best, largest = self.best[j], self.directions[j]
        partition = self.plan.partition
        if partition.count == 1 or not distributed.active():
            if best is None:
                raise ValueError("the training data yielded no examples")
            return best
        owned = [0] * partition.count  # examples per rank, known to every rank from the chunks it has seen
        ends = [*self.offsets[1:], self.seen_examples]
        for i, (start, end) in enumerate(zip(self.offsets, ends)):
            owned[partition.owner(i)] += end - start
        widths = [min(self.k, n) for n in owned]
        ranks = list(range(partition.count))
        mine = [] if best is None else [best.values]
        values = distributed.gather_columns(mine, widths, ranks)
        indices = distributed.gather_columns([] if best is None else [best.indices], widths, ranks)
        return _ranked(values, indices, self.k, largest)

    def result(self):
        self._check_k(self.seen_examples)
        return self._gathered(0)

    def close(self) -> None:
        pass


class HelpfulHarmful(TopK):
    """Sink: per query, the ``k`` highest *and* the ``k`` lowest scores, in one pass over the training data.

    ``ifunc.attribute(..., sink=HelpfulHarmful(k))`` returns :class:`Extremes` ``(helpful, harmful)``, each a
    :class:`Ranked` ``[q, k]``: ``helpful`` equals ``TopK(k)``'s result and ``harmful`` ``TopK(k, largest=False)``'s
    (lowest first, ties by the lower index), for the cost of one.

    Example:
      >>> ends = ifunc.attribute(loss, params, ihvp, train, query, sink=HelpfulHarmful(5))
      >>> ends.helpful.indices[0], ends.harmful.indices[0]
    """

    def __init__(self, k: int):
        super().__init__(k)
        self.directions = (True, False)

    def result(self):
        self._check_k(self.seen_examples)
        return Extremes(self._gathered(0), self._gathered(1))
