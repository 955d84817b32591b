"""The scorer of Kronecker-family closures built with ``model=``: captured contractions, no per-example gradient.

``ihvp.scorer(loss, params, options)`` of a :class:`~ifunc.ihvp.kronecker.closure.KroneckerIHVP` with a model
returns a :class:`KroneckerScorer`; :func:`ifunc.attribute` and :func:`ifunc.self_influence` drive it like any
other scorer (:class:`ifunc.ihvp.Scorer`). The queries are preconditioned once per layer
(:func:`~ifunc.ihvp.kronecker.score.kronecker_prepare`); a chunk of training examples is scored from its captured
layer inputs ``a`` and output gradients ``g``: ``Σ_l Σ_t g_tᵀ Q̃_l a_t`` per pair
(:func:`~ifunc.ihvp.kronecker.score.kronecker_chunk_scores`), per position with ``per_token``
(:func:`~ifunc.ihvp.kronecker.tokens.token_chunk_scores`), and ``Σ_l Σ (Q_Sᵀ DW Q_A)² / (Λ + λ)`` for
self-influence (:func:`~ifunc.ihvp.kronecker.score.kronecker_self_terms`). The queries are preconditioned and the self
terms computed in the closure's dtype (the parameters', float32 for a half-precision model); the pairwise and
per-token contractions run in ``options.dtype`` when given (``attribute(dtype=torch.bfloat16)``: the prepared
queries and each chunk's captured ``a, g`` cast to it, the layers summed in float32), else in the closure's.
"""

from __future__ import annotations

import torch

from ... import distributed
from ..._data import DataSource
from ..._types import LossFn, Params
from .._scorer import ScoreOptions
from ._kernels import input_major
from .blocks import scatter
from .budget import capture_chunk_size
from .layers import kind_of
from .score import (
    PreparedQueries,
    kronecker_chunk_and_self_terms,
    kronecker_chunk_scores,
    kronecker_prepare,
    kronecker_self_terms,
)
from .tokens import check_per_token, token_chunk_scores

__all__ = ["KroneckerScorer"]


class KroneckerScorer:
    """Pairwise, per-module, per-token and self-influence scores of a Kronecker-family closure with a model."""

    splits_examples = False  # no collective in a chunk: chunk i is scored on one rank

    def __init__(self, ihvp, loss: LossFn, params: Params, options: ScoreOptions):
        if options.per_token:
            check_per_token(ihvp)
        self.ihvp, self.loss, self.params, self.options = ihvp, loss, params, options
        self.n_query = 0
        self.factored_queries: PreparedQueries | None = None  #: what prepare_factored made

    def _prepared(self, query: DataSource, chunk_size: int | None, *, eigenbasis: bool) -> PreparedQueries:
        o = self.options
        prepared = kronecker_prepare(
            self.loss,
            self.params,
            self.ihvp,
            query,
            measurement=o.measurement,
            chunk_size=chunk_size,
            max_memory=o.max_memory,
            query_rank=o.query_rank,
            eigenbasis=eigenbasis,
        )
        return distributed.broadcast_from_rank0(prepared)  # the same on every rank

    def prepare(self, query: DataSource, chunk_size: int | None) -> int:
        # each layer's queries stored input-major (the layout the pairwise contraction reads fastest), once
        self.prepared: PreparedQueries = _input_major(self._prepared(query, chunk_size, eigenbasis=False))
        self.scoring = _cast(self.prepared, self.options.dtype)  # what the chunks are contracted with
        self.n_query = int(self.prepared.diag.shape[0])
        return self.n_query

    def layer_specs(self) -> list:
        """The specs of the closure's Kronecker layers (:class:`~ifunc.ihvp.kronecker.layers.LayerSpec`), in order."""
        return [blk.spec for blk in self.ihvp.blocks]

    def prepare_factored(self, query: DataSource, chunk_size: int | None) -> int:
        """:meth:`prepare` without rotating each layer's preconditioned queries back: read them by :meth:`factored`.

        Saves ``2·q·out·in·(out + in)`` per layer when the caller maps ``Q̃`` on through its factors (a gradient
        index projects ``P_o Q̃ P_aᵀ = (P_o Q_S) R (P_a Q_A)ᵀ`` at ``q·k_o·out·in``). :meth:`chunk` and
        :meth:`preconditioned` need :meth:`prepare`.
        """
        if self.options.query_rank is not None:
            raise ValueError("prepare_factored keeps whole queries; drop query_rank")
        self.factored_queries = self._prepared(query, chunk_size, eigenbasis=True)
        self.n_query = int(self.factored_queries.diag.shape[0])
        return self.n_query

    def factored(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The preconditioned queries of :meth:`prepare_factored` as ``Q̃_l = left R rightᵀ`` per layer.

        Returns ``({module: (spec, left [out, out] or None, R [q, out, in(+1)], right [in(+1), in(+1)] or None)},
        {parameter name: [q, numel]})``: ``left``/``right`` are the block's eigenbases ``Q_S``/``Q_A`` (None: the
        identity), ``R`` in the weight-matrix layout (bias last); the second dict holds the diagonal blocks'
        preconditioned columns. Parameters in neither (excluded) are zero.
        """
        prepared = self.factored_queries
        if prepared is None:
            raise RuntimeError("factored() needs prepare_factored() first")
        layers = {
            blk.spec.name: (blk.spec, blk.Q_S, prepared.layers[blk.spec.name][0], blk.Q_A) for blk in self.ihvp.blocks
        }
        dense, start = {}, 0
        for d in self.ihvp.diags:
            width = d.sl.stop - d.sl.start
            dense[d.name] = prepared.diag[:, start : start + width]
            start += width
        return layers, dense

    def preconditioned(self) -> torch.Tensor:
        """The prepared queries as flat parameter-space vectors ``[n_query, d]``: each layer's ``Q̃_l`` written
        back into its weight (and bias) slices, each diagonal block's columns into its own, zeros elsewhere
        (excluded parameters)."""
        diag = self.prepared.diag
        out = diag.new_zeros(diag.shape[0], self.ihvp.dim)
        for blk in self.ihvp.blocks:
            scatter(out, blk, self.prepared.layers[blk.spec.name][0])
        start = 0
        for d in self.ihvp.diags:
            width = d.sl.stop - d.sl.start
            out[:, d.sl] = diag[:, start : start + width]
            start += width
        return out

    def chunk_size(self, train: DataSource, *, pairs: bool) -> int:
        """Train examples per chunk within ``max_memory``: per example its captured forward and the temporaries
        of its contraction with the largest layer ``[out, in]``.

        With ``T`` the positions one example adds (read off the probe): a pairwise pass holds ``[n_query]`` score
        columns (``[n_query, T]`` per token) and ``2 · n_query · out`` values at ``T = 1`` (the preconditioned
        queries applied to its input) or its ``out · in`` gradient otherwise (``2 · n_query · T · r`` with
        ``query_rank=r``); a self-influence pass holds ``2 · (out + in)`` values at ``T = 1`` or three
        ``out · in`` ones otherwise (its gradient in the eigenbasis, squared and weighted).
        """
        q, o = self.n_query if pairs else 0, self.options
        shapes = [  # an embedding's contraction gathers one column per position: its width counts as 1
            (blk.spec.out_features, kind_of(blk.spec).work_columns(blk.spec.columns)) for blk in self.ihvp.blocks
        ]

        def extra(T: int) -> int:
            if not pairs:
                return max((2 * (out + inp) if T == 1 else 3 * out * inp for out, inp in shapes), default=0) * (
                    self.ihvp.dtype.itemsize
                )
            columns = 2 * q * (T if o.per_token else 1)
            rank = 2 * q * T * o.query_rank if o.query_rank is not None else 0
            contraction = max(
                (2 * q * out if T == 1 else max(2 * q * out, out * inp) for out, inp in shapes), default=0
            )
            return (columns + max(rank, contraction)) * self.ihvp.dtype.itemsize

        return capture_chunk_size(
            self.loss,
            self.params,
            self.ihvp.model,
            [blk.spec for blk in self.ihvp.blocks],
            train,
            max_memory=o.max_memory,
            what="Kronecker scores of the train data",
            extra_per_example=extra,
        )

    def chunk(self, batch, offset: int) -> torch.Tensor:
        o = self.options
        if o.per_token:
            return token_chunk_scores(
                self.loss, self.params, self.ihvp, self.scoring, batch, token_mask=o.token_mask, offset=offset
            )
        out = kronecker_chunk_scores(
            self.loss, self.params, self.ihvp, self.scoring, batch, per_module=o.per_module, offset=offset
        )
        return out if o.per_module else out[0]

    def query_terms(self) -> torch.Tensor:
        """``[n_query]``: each query's own ``∇f(z_q)ᵀ (G + λ)^{-1} ∇f(z_q)``, from :meth:`prepare`'s capture."""
        return self.prepared.terms

    def chunk_and_self_terms(self, batch, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chunk(batch, offset), self_terms(batch, offset))`` from one capture (per-token: two)."""
        o = self.options
        if o.per_token:  # the per-token capture splits diagonal blocks by their uses: a pass of its own
            return self.chunk(batch, offset), self.self_terms(batch, offset)
        block, terms = kronecker_chunk_and_self_terms(
            self.loss, self.params, self.ihvp, self.scoring, batch, per_module=o.per_module, offset=offset
        )
        return (block if o.per_module else block[0]), terms

    def self_terms(self, batch, offset: int) -> torch.Tensor:
        return kronecker_self_terms(
            self.loss, self.params, self.ihvp, batch, per_module=self.options.per_module, offset=offset
        )


def _cast(prepared: PreparedQueries, dtype: torch.dtype | None) -> PreparedQueries:
    """The prepared queries in ``dtype`` (None or their own: themselves, no copy; a copy keeps the layout); the self
    terms keep theirs."""
    if dtype is None or dtype == prepared.diag.dtype:
        return prepared
    layers = {
        name: (R.to(dtype), None if lr is None else (lr[0].to(dtype), lr[1].to(dtype)))
        for name, (R, lr) in prepared.layers.items()
    }
    return PreparedQueries(prepared.diag.to(dtype), layers, prepared.terms)


def _input_major(prepared: PreparedQueries) -> PreparedQueries:
    """The prepared queries with each layer's ``Q̃`` stored input-major (:func:`~._kernels.input_major`): the same
    values, laid out once for the contraction of every chunk."""
    layers = {}
    for name in list(prepared.layers):
        R, lr = prepared.layers.pop(name)  # one layer's old layout freed before the next is copied
        layers[name] = (input_major(R), lr)
    return PreparedQueries(prepared.diag, layers, prepared.terms)
