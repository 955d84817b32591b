"""Queries against a gradient index: the index stands where the training data stood.

``ifunc.attribute(loss, params, ihvp, index, query)`` reads no training example. The closure's own scorer prepares
the queries as always (``Q̃ = (H + λI)^{-1} ∇f(z_q)``, any method: explicit, CG, EK-FAC, ...), they are projected
with the index's projection ``P`` (:func:`~ifunc.index.projection.project_flat`; a Kronecker closure whose layers
are the index's, through its factors: ``(P_o Q_S) R (P_a Q_A)ᵀ`` per layer,
:func:`~ifunc.index.projection.project_factored`, never forming ``Q̃``), and each stored chunk of rows ``[b, dim]``
costs one matrix product:

``scores[q, i] = ⟨P Q̃_q, P g_i⟩ ≈ ⟨Q̃_q, g_i⟩ = Q̃_qᵀ ∇ℓ(z_i)``

(equal in expectation over the projection's seed; exact where the projection is the identity). The index does not
depend on the curvature: another damping or method needs no rebuild.

With a closure fitted in the index's own coordinates (:func:`~ifunc.index.curvature.ihvp_projected`, curvature
``F̃`` of the projected rows) the raw query gradients are projected first and the closure applied after:
``scores[q, i] = ((F̃ + λI)^{-1} P ∇f(z_q))ᵀ r_i``; only then is self-influence ``r_iᵀ (F̃ + λI)^{-1} r_i`` computable
from the rows alone.
"""

from __future__ import annotations

from typing import Any

import torch

from .._data import DataSource, params_fingerprint
from ..functional import structure
from .curvature import ProjectedScorer
from .handle import GradientIndex
from .projection import factors_match, project_factored, project_flat

__all__ = ["IndexScorer", "index_source", "check_index_params", "QUERY_CHUNK"]

#: queries whose raw gradients ``[QUERY_CHUNK, d]`` are held at once on the projected-curvature path
QUERY_CHUNK = 64


class _Rows:
    """The index's rows ``[b, dim]``, chunk by chunk in order: re-iterable, one chunk in memory at a time."""

    def __init__(self, index: GradientIndex):
        self.index = index

    def __iter__(self):
        for _, rows in self.index.chunks():
            yield rows


def index_source(index: GradientIndex) -> DataSource:
    """The index as the training data of the scoring loop: its rows, with the example count known."""
    return DataSource(_Rows(index), name=f"gradient index {index.path}", known_count=index.n)


def check_index_params(index: GradientIndex, params) -> None:
    """ValueError unless ``params`` are the parameters the index's gradients were taken at (by fingerprint)."""
    dtype = structure(params).dtypes[0]
    built_in = index.meta.get("params_dtype")
    if built_in is not None and built_in != str(dtype):
        raise ValueError(
            f"{index.path}: the index was built at {built_in} parameters, these are {dtype}; query it with the "
            f"parameters it was built with (cast them back to {built_in}), or build a new index for these"
        )
    found = params_fingerprint(params)
    if index.meta.get("params") != found:
        raise ValueError(
            f"{index.path}: the index holds gradients at other parameters (fingerprint {index.meta.get('params')}, "
            f"these params {found}); query it with the parameters it was built with, or build a new index for these"
        )


class IndexScorer:
    """A closure's scorer with the index's projection: queries ``[q, dim]`` against stored rows ``[b, dim]``.

    With a parameter-space closure (any ``ihvp_*``) the queries are ``P Q̃``, the closure's preconditioned queries
    projected; with :func:`~ifunc.index.curvature.ihvp_projected`'s closure (its :class:`ProjectedScorer`, checked
    against the index's projection) they are ``(F̃ + λI)^{-1} P ∇f(z_q)``, and :meth:`self_terms` is
    ``r_iᵀ (F̃ + λI)^{-1} r_i``. ``self_influence=True``: built for self-influence, so a parameter-space closure is
    refused at once (``NotImplementedError``).
    """

    splits_examples = False

    def __init__(self, inner, index: GradientIndex, params, *, self_influence: bool = False):
        self.index, self.params = index, params
        self.curvature: ProjectedScorer | None = None
        if isinstance(inner, ProjectedScorer):
            inner.check_index(index)
            inner, self.curvature = inner.raw, inner  # raw query gradients; the curvature acts after the projection
        elif self_influence:
            raise _self_needs_projected()
        self.inner = inner

    def prepare(self, query: DataSource, chunk_size: int | None) -> int:
        P = self.index.projection
        if self.curvature is None:  # the closure's own preparation: its preconditioned queries [q, d], projected
            specs = getattr(self.inner, "layer_specs", None)
            if specs is not None and factors_match(P, specs()):  # Kronecker: Q̃ = Q_S R Q_Aᵀ projected by factors
                inner: Any = self.inner  # a KroneckerScorer (the only scorer with layer_specs)
                n_query = inner.prepare_factored(query, chunk_size)
                self.projected = project_factored(P, *inner.factored())
                return n_query
            n_query = self.inner.prepare(query, chunk_size)
            self.projected = project_flat(P, self.inner.preconditioned(), self.params)
            return n_query
        # raw gradients are projected QUERY_CHUNK queries at a time: [QUERY_CHUNK, d] is held, never [q, d]
        pieces, offset, captured = [], 0, self.curvature.project_queries
        for batch in query.chunks(chunk_size or QUERY_CHUNK):
            if captured is not None:  # the model's layers captured, as the rows were built
                pieces.append(captured(batch, offset).T)
            else:
                self.inner.prepare(DataSource(batch, name=query.name, ordered=True), None)
                pieces.append(project_flat(P, self.inner.preconditioned(), self.params))
            offset += len(pieces[-1])
        raw = torch.cat(pieces)
        self.projected = self.curvature.precondition(raw)
        self.q_terms = self.curvature.self_quadratic(raw)[0]  # p_qᵀ (F̃ + λI)^{-1} p_q, for normalize="cosine"
        return self.projected.shape[0]

    def query_terms(self) -> torch.Tensor:
        """``[n_query]``: ``p_qᵀ (F̃ + λI)^{-1} p_q`` of the projected raw queries (ihvp_projected only)."""
        if self.curvature is None:
            raise _self_needs_projected()
        return self.q_terms

    def chunk_size(self, train: DataSource, *, pairs: bool) -> int:
        return self.index.chunk  # the stored chunks: each is read once, whole

    def chunk(self, batch: torch.Tensor, offset: int) -> torch.Tensor:
        return self.projected @ batch.to(self.projected.dtype).T

    def self_terms(self, batch, offset: int) -> torch.Tensor:
        """``[1, b]``: ``r_iᵀ (F̃ + λI)^{-1} r_i`` of the stored rows (``ihvp_projected``'s closure only)."""
        if self.curvature is None:
            raise _self_needs_projected()
        return self.curvature.self_quadratic(batch)


def _self_needs_projected() -> NotImplementedError:
    return NotImplementedError(
        "self-influence from a gradient index with a parameter-space closure would need (H + λI)^{-1} of every "
        "training gradient, which the index does not hold (only its projection); use the curvature of the projected "
        "space, ifunc.ihvp_projected(index), or pass the training data instead of the index"
    )
