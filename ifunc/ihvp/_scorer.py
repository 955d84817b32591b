"""How a closure scores training examples: the scorer protocol and the generic scorer every closure has.

:func:`ifunc.attribute` and :func:`ifunc.self_influence` are one loop of (chunks of training examples) × (a
scorer) × (a sink). The scorer comes from the closure, ``ihvp.scorer(loss, params, options)``; the Kronecker
family returns its own (:mod:`ifunc.ihvp.kronecker.scorer`), every other closure and any callable
``[k, d] -> [k, d]`` gets :class:`GenericScorer` (:func:`scorer_for`).

The generic scorer takes per-example gradients ``Q [q, d]`` of the queries (``vmap(grad)``, in the parameters'
dtype; cast to :func:`solve_dtype`, float32 for a half-precision model, before the solve), solves them once as
one block, ``Q̃ = (H + λI)^{-1} Q``, and contracts every chunk of training gradients ``G [b, d]`` with it:
``scores = Q̃ Gᵀ [q, b]``. Self-influence ``s_i = g_iᵀ (H + λI)^{-1} g_i`` solves each chunk as one ``[b, d]``
block. Under ``torchrun`` a solve may itself be collective (CG and LiSSA all-reduce their curvature products),
so every rank takes part in every chunk's solve with the same right-hand sides: the gradients of a chunk are
split over the ranks and all-gathered (:attr:`GenericScorer.splits_examples`). A closure that solves from what it
holds (explicit, Arnoldi, Nyström, DataInf, a Kronecker closure without ``model=``) solves locally: its chunk ``i``
runs on one rank like a pairwise chunk.

The queries' own quadratic form ``∇f(z_q)ᵀ (H + λI)^{-1} ∇f(z_q)`` (:meth:`GenericScorer.query_terms`) comes free
with the prepared queries, and :meth:`GenericScorer.chunk_and_self_terms` scores a chunk and takes its self terms
from one gradient pass: what normalised scores (``attribute(..., normalize=)``) divide by.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import optree
import torch

from .. import distributed
from .._batches import batch_size, slice_batch
from .._data import DataSource
from .._types import LossFn, Measurement, Params
from ..functional import structure
from ..grads import chunk_size_for, iter_per_sample_grads

__all__ = ["ScoreOptions", "Scorer", "GenericScorer", "scorer_for", "solve_dtype", "NEEDS_KRONECKER", "ITERATIVE"]


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype closures solve in and statistics accumulate in for parameters of ``dtype``: at least float32.

    A half-precision model (``torch.bfloat16``, unit roundoff ``2^-8``; ``torch.float16``, ``2^-11``) computes its
    gradients and curvature products in its own dtype, but a sum of many of them, an inner product of a Krylov
    solver or a damped division ``x / (Λ + λ)`` in half precision loses what ``λ`` adds (``1 + 10^-3`` is ``1`` in
    bfloat16); float32 and float64 parameters keep their dtype.
    """
    return torch.promote_types(dtype, torch.float32)


#: the error of an option only the Kronecker family's captured scoring has
NEEDS_KRONECKER = (
    "a Kronecker-family closure built with model= (ifunc.ihvp_ekfac / ihvp_kfac / ihvp_diagonal / ihvp_identity / "
    "ihvp_adam)"
)


#: the ifunc methods whose every solve iterates curvature products over the training data (``closure.name``): a
#: right-hand side costs iterations × passes over the data, and under ``torchrun`` the products are all-reduced
ITERATIVE = frozenset({"cg", "lissa"})


class ScoreOptions(NamedTuple):
    """What :func:`ifunc.attribute` asks of a scorer besides the loss and the parameters (see its Args)."""

    measurement: Measurement | None = None
    max_memory: int | None = None
    dtype: torch.dtype | None = None  #: precision of the score contraction (None: the closure's, solve_dtype)
    query_rank: int | None = None
    per_module: bool = False
    per_token: bool = False
    token_mask: Callable | None = None


class Scorer(Protocol):
    """Score columns of chunks of training examples against queries prepared once.

    ``prepare(query, chunk_size)`` preconditions the queries (identical on every rank; ``chunk_size`` query
    examples at a time, None: the memory budget's) and returns ``n_query``; ``preconditioned()`` then gives them
    as flat vectors ``[n_query, d]`` (what a gradient index projects);
    ``chunk_size(train, pairs=)`` is the default examples per chunk of a pairwise (``pairs=True``, after
    ``prepare``) or self-influence pass; ``chunk(batch, offset)`` returns the columns of one chunk with the
    examples on the last axis: ``[n_query, b]``, ``[n_modules, n_query, b]`` (``per_module``) or
    ``[n_query, b, T]`` (``per_token``, examples on the middle axis); ``self_terms(batch, offset)`` returns
    ``[n_modules or 1, b]``. ``splits_examples``: ``self_terms`` runs on every rank for every chunk and splits
    the chunk's examples itself (its solve is collective); otherwise chunk ``i`` runs on one rank.

    Optional, for normalised scores: ``query_terms()`` (after ``prepare``) gives ``[n_query]``, the queries' own
    ``∇f(z_q)ᵀ (H + λI)^{-1} ∇f(z_q)`` in the metric of the scores; ``chunk_and_self_terms(batch, offset)`` gives
    ``(chunk(batch, offset), self_terms(batch, offset))`` from one capture of the chunk (run on the rank that owns
    it: not for a collective solve). ``iterative``: True when every self term costs an iterative solve over the
    training data (CG, LiSSA); a scorer without the attribute is taken as cheap.
    """

    @property
    def splits_examples(self) -> bool: ...

    def prepare(self, query: DataSource, chunk_size: int | None) -> int: ...

    def preconditioned(self) -> torch.Tensor: ...

    def chunk_size(self, train: DataSource, *, pairs: bool) -> int: ...

    def chunk(self, batch, offset: int) -> torch.Tensor: ...

    def self_terms(self, batch, offset: int) -> torch.Tensor: ...


def scorer_for(ihvp, loss: LossFn, params: Params, options: ScoreOptions) -> Scorer:
    """The closure's own scorer (``ihvp.scorer``), or the generic one for any other callable ``[k, d] -> [k, d]``."""
    own = getattr(ihvp, "scorer", None)
    if callable(own):
        scorer = own(loss, params, options)
        if isinstance(scorer, GenericScorer) and scorer.iterative is None:  # an ifunc closure: its method says
            scorer.iterative = getattr(ihvp, "name", None) in ITERATIVE
        return scorer  # pyright: ignore[reportReturnType]  # a closure's own Scorer
    if not callable(ihvp):
        raise TypeError(f"ihvp must be a callable v -> (H + λI)^{{-1}} v (e.g. ifunc.ihvp_cg(...)), got {ihvp!r}")
    return GenericScorer(ihvp, None, loss, params, options)


class GenericScorer:
    """Scores from per-example gradients and one block solve of the queries (see the module docstring).

    ``solve``: ``V [k, d] -> (H + λI)^{-1} V``; ``dim``: the ``d`` it was built for (None: not known).
    ``iterative``: every solve iterates curvature products over the training data (CG, LiSSA: collective under
    ``torchrun``); False: the solve uses only what the closure holds; None: not known (a custom callable), taken
    as possibly collective. :func:`scorer_for` sets it for ifunc closures.
    """

    def __init__(
        self,
        solve: Callable,
        dim: int | None,
        loss: LossFn,
        params: Params,
        options: ScoreOptions,
        *,
        iterative: bool | None = None,
    ):
        if options.per_token:
            raise ValueError(f"per_token=True needs {NEEDS_KRONECKER}: per-token scores come from layer hooks")
        if options.per_module:
            raise ValueError(f"per_module=True: per-module scores need {NEEDS_KRONECKER}")
        if options.query_rank is not None:
            raise ValueError(f"query_rank=: queries compressed per layer need {NEEDS_KRONECKER}")
        d = structure(params).dim
        if dim is not None and dim != d:
            raise ValueError(f"ihvp was built for {dim} parameters but params have {d}")
        self.solve, self.loss, self.params, self.options, self.dim = solve, loss, params, options, d
        self.work = solve_dtype(_params_dtype(params))  # of the solve: gradients are cast to it first
        self.iterative = iterative
        self.held = 0  # bytes of the prepared queries, held beside every train chunk

    @property
    def splits_examples(self) -> bool:
        """A solve that may be collective (iterative or not known) runs on every rank for every chunk."""
        return self.iterative is not False

    def prepare(self, query: DataSource, chunk_size: int | None) -> int:
        o = self.options
        Q = torch.cat(
            list(
                iter_per_sample_grads(
                    o.measurement or self.loss,
                    self.params,
                    query,
                    chunk_size=chunk_size,
                    max_memory=o.max_memory,
                    name="query",
                )
            )
        )
        # identical right-hand sides on every rank (the solve may be collective), in the solve's dtype
        Q = distributed.broadcast_from_rank0(Q.to(self.work))
        with torch.no_grad():
            Qp = self.solve(Q)
            self.q_terms = torch.einsum("qd,qd->q", Q, Qp)  # before the cast to dtype=: in the solve's precision
        self.Qp = Qp.to(o.dtype or Qp.dtype)
        self.held = Q.numel() * Q.element_size() + self.Qp.numel() * self.Qp.element_size()
        return int(self.Qp.shape[0])

    def query_terms(self) -> torch.Tensor:
        """``[n_query]``: ``∇f(z_q)ᵀ (H + λI)^{-1} ∇f(z_q)``, from the prepared queries (no further solve)."""
        return self.q_terms

    def preconditioned(self) -> torch.Tensor:
        """The prepared queries ``(H + λI)^{-1} ∇f(z_q)`` as flat vectors ``[n_query, d]``."""
        return self.Qp

    def chunk_size(self, train: DataSource, *, pairs: bool) -> int:
        fixed = self.held if pairs else 0
        return chunk_size_for(
            self.loss, self.params, train, max_memory=self.options.max_memory, name="train", fixed=fixed
        )

    def _grads(self, batch, offset: int) -> list[torch.Tensor]:
        """The chunk's per-example gradients in the parameters' dtype (cast where they meet the queries)."""
        size = batch_size(batch)  # one chunk of the loop is one vmap chunk
        return list(iter_per_sample_grads(self.loss, self.params, batch, chunk_size=size, name="train", offset=offset))

    def chunk(self, batch, offset: int) -> torch.Tensor:
        return torch.cat([self.Qp @ G.to(self.Qp.dtype).T for G in self._grads(batch, offset)], dim=1)

    def chunk_and_self_terms(self, batch, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chunk(batch, offset), [1, b] self terms)`` from one gradient pass; the chunk's solve runs on this rank
        alone (one process, or a closure that is not :attr:`iterative`)."""
        G = torch.cat(self._grads(batch, offset))
        with torch.no_grad():
            return self.Qp @ G.to(self.Qp.dtype).T, _quadratic(G.to(self.work), self.solve)

    def self_terms(self, batch, offset: int) -> torch.Tensor:
        """``[1, b]``: ``g_iᵀ (H + λI)^{-1} g_i``; with :attr:`splits_examples` rank ``r`` takes the ``r``-th slice
        of the chunk's gradients (every rank solves the whole chunk's), else the chunk is solved here."""
        if not self.splits_examples:
            with torch.no_grad():
                return _quadratic(torch.cat(self._grads(batch, offset)).to(self.work), self.solve)
        b, (rank, size) = batch_size(batch), distributed.world()
        widths = [len(range(b)[r::size]) for r in range(size)]  # contiguous slices of ⌈b / W⌉ or ⌊b / W⌋
        start = sum(widths[:rank])
        local = None
        if widths[rank]:
            part = slice_batch(batch, start, start + widths[rank])
            local = torch.cat(self._grads(part, offset + start)).to(self.work)
        G = distributed.gather_rows(local, widths, self.dim)  # one process: its own slice
        with torch.no_grad():
            return _quadratic(G, self.solve)


def _params_dtype(params: Params) -> torch.dtype:
    """The dtype of the first floating-point leaf of ``params`` (a flat vector: its own)."""
    if isinstance(params, torch.Tensor):
        return params.dtype
    leaves = [t for t in optree.tree_leaves(params, namespace="ifunc") if isinstance(t, torch.Tensor)]
    return next((t.dtype for t in leaves if t.is_floating_point()), torch.get_default_dtype())


def _quadratic(G: torch.Tensor, solve: Callable) -> torch.Tensor:
    """``[1, b]``: ``g_iᵀ (H + λI)^{-1} g_i`` of the rows of ``G [b, d]``, as one block solve."""
    return (G * solve(G)).sum(dim=1)[None]
