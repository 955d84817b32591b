"""The one scoring loop: chunks of training examples × a scorer × a sink.

:func:`run_chunks` walks every chunk of the training data in order (:func:`ifunc._chunks.iter_chunks`, the one
chunk loop), shows each to the sink, and computes the chunks this rank owns (the run's
:class:`~ifunc._chunks.Partition`) that the sink still wants. A rank loads only the chunks it owns when the data is
indexed by example (a map-style Dataset, a sequential DataLoader over one, data in memory); the sink sees another
rank's chunk as an :class:`~ifunc._data.UnreadChunk` (its example count). An owned chunk already in a store is still
loaded: the store checks it against its fingerprint before the run goes on. It knows no method (the scorer comes
from the closure) and no destination (the sink says what it wants and what is returned).

:class:`Normalized` wraps a scorer so that its columns come out unit-normalised (``"cosine"``) or divided by the
training examples' own norms (``"relatif"``), in the metric of the closure (see :func:`ifunc.attribute`).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import distributed
from ._batches import batch_size
from ._chunks import Partition, iter_chunks, n_chunks
from ._data import DataSource
from ._progress import progress_bar
from ._sinks import GatherSink, ScorePlan, Sink

__all__ = ["run_chunks", "agreed_chunk", "Normalized", "check_normalize", "NORMALIZE"]

#: the values of ``attribute(..., normalize=)``
NORMALIZE = (None, "cosine", "relatif")


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


def check_normalize(normalize) -> str | None:
    """``normalize`` if it is one of :data:`NORMALIZE`, else a ``TypeError``/``ValueError`` naming the choices."""
    if normalize is not None and not isinstance(normalize, str):
        raise TypeError(
            f"normalize must be None, 'cosine' or 'relatif', got {normalize!r} ({type(normalize).__name__})"
        )
    if normalize not in NORMALIZE:
        raise ValueError(
            f"normalize={normalize!r} is not a normalisation: pass None (raw scores), 'cosine' (divide by both "
            "norms) or 'relatif' (divide by the training example's norm)"
        )
    return normalize


def _inverse_roots(terms: torch.Tensor, how: str, what: str, offset: int) -> torch.Tensor:
    """``1/√t`` of self terms ``t`` (0 where ``t = 0``: an example with zero gradient scores 0, not NaN).

    Raises:
      ValueError: a negative term (the closure is not positive definite), naming the example ``offset + j``.
    """
    negative = (terms < 0).nonzero()
    if negative.numel():
        j = int(negative[0, 0])
        raise ValueError(
            f"normalize={how!r}: the self term gᵀ (H + λI)^{{-1}} g of {what} {offset + j} is "
            f"{float(terms[j]):.3g} < 0, so it is not a squared norm: the closure is not positive definite "
            "(curvature='hessian' away from a minimum, or too little damping for an approximate solve); use the GGN "
            "(the default curvature) or more damping"
        )
    return torch.where(terms > 0, terms.rsqrt(), torch.zeros_like(terms))


class Normalized:
    """A scorer whose columns are normalised by self terms ``t = gᵀ (H + λI)^{-1} g`` in the closure's metric.

    ``"cosine"``: ``s[q, i] / (√t_q √t_i)``; ``"relatif"``: ``s[q, i] / √t_i``, with ``t_i`` the training example's
    self term (the value :func:`ifunc.self_influence` returns) and ``t_q`` the query's (the same quadratic form on
    ``∇f(z_q)``). A zero term divides to 0. Per-module (``[m, q, b]``) and per-token (``[q, b, T]``, ``tokens``)
    columns are divided by the whole example's terms, so they still sum to the normalised score.

    The train terms come, by preference, from the same capture as the chunk's scores (the inner scorer's
    ``chunk_and_self_terms``), else from ``chunk`` then ``self_terms`` (two captures). Under ``torchrun`` a scorer
    whose solve may be collective (``splits_examples``) cannot solve on the one rank that owns a chunk:
    :meth:`terms_pass` then computes every chunk's terms first, every rank taking part (as
    :func:`ifunc.self_influence` does). Query terms come from the inner scorer's ``query_terms()``, else from
    ``query_terms(query, chunk_size) -> [n_query]`` given here (None: the scorer has none; ``"cosine"`` is refused).
    """

    def __init__(self, inner, how: str, *, tokens: bool = False, query_terms: Callable | None = None):
        self.inner, self.how, self.tokens, self.query_fallback = inner, how, tokens, query_terms
        self.q_scale: torch.Tensor | None = None  #: ``[n_query]`` ``1/√t_q`` (cosine), after :meth:`prepare`
        self.train_terms: torch.Tensor | None = None  #: ``[1, n_train]`` from :meth:`terms_pass`, when it ran
        self.splits_examples = False  # pairwise chunks only: chunk i on one rank

    def prepare(self, query: DataSource, chunk_size: int | None) -> int:
        n_query = self.inner.prepare(query, chunk_size)
        if self.how == "cosine":
            own = getattr(self.inner, "query_terms", None)
            terms: torch.Tensor
            if callable(own):
                terms = own()  # pyright: ignore[reportAssignmentType]  # the optional method of the protocol
            elif self.query_fallback is not None:
                terms = self.query_fallback(query, chunk_size)
            else:
                raise NotImplementedError(
                    f"normalize='cosine': this scorer ({type(self.inner).__name__}) gives no query self terms; use "
                    "normalize='relatif' (training self terms only)"
                )
            self.q_scale = _inverse_roots(terms.reshape(-1), self.how, "query", 0)
        return n_query

    def preconditioned(self) -> torch.Tensor:
        return self.inner.preconditioned()

    def self_terms(self, batch, offset: int) -> torch.Tensor:
        return self.inner.self_terms(batch, offset)

    def chunk_size(self, train: DataSource, *, pairs: bool) -> int:
        """The smaller of the inner scorer's pairwise and self-influence chunk sizes: a chunk holds both."""
        return min(self.inner.chunk_size(train, pairs=True), self.inner.chunk_size(train, pairs=False))

    def needs_terms_pass(self) -> bool:
        """Under ``torchrun``, the inner self terms are collective (every rank in every chunk's solve)."""
        return distributed.active() and bool(self.inner.splits_examples)

    def terms_pass(self, source: DataSource, chunk: int, *, progress: bool | None) -> None:
        """Every chunk's training self terms, every rank taking part in each (same values on every rank)."""
        self.train_terms = run_chunks(
            source, chunk, Partition(), self.inner.self_terms, GatherSink(), n_query=0, desc="ifunc self terms",
            progress=progress,
        ).sum(dim=0, keepdim=True)  # fmt: skip

    def chunk(self, batch, offset: int) -> torch.Tensor:
        if self.train_terms is not None:
            block = self.inner.chunk(batch, offset)
            terms = self.train_terms[:, offset : offset + batch_size(batch)]
        else:
            both = getattr(self.inner, "chunk_and_self_terms", None)
            if callable(both):
                block, terms = both(batch, offset)  # pyright: ignore[reportGeneralTypeIssues]  # optional method
            else:
                block, terms = self.inner.chunk(batch, offset), self.inner.self_terms(batch, offset)
        return self._divide(block, _inverse_roots(terms.sum(dim=0), self.how, "training example", offset))

    def _divide(self, block: torch.Tensor, train_scale: torch.Tensor) -> torch.Tensor:
        """``block`` times ``1/√t_i`` on the examples' axis (and ``1/√t_q`` on the queries' for cosine)."""
        dtype = torch.promote_types(block.dtype, train_scale.dtype)
        trailing = 1 if self.tokens else 0  # per-token blocks [q, b, T]: examples on the middle axis
        out = block.to(dtype) * train_scale.to(dtype).reshape(-1, *[1] * trailing)
        if self.q_scale is not None:
            out = out * self.q_scale.to(dtype).reshape(-1, 1, *[1] * trailing)
        return out.to(block.dtype)
