"""Queries against a gradient index: the index stands where the training data stood.

``ifunc.attribute(loss, params, ihvp, index, query)`` reads no training example. The closure's own scorer prepares
the queries as always (``Q̃ = (H + λI)^{-1} ∇f(z_q)``, any method: explicit, CG, EK-FAC, ...), they are projected
with the index's projection ``P`` (:func:`~ifunc.index.projection.project_flat`), and each stored chunk of rows
``[b, dim]`` costs one matrix product:

``scores[q, i] = ⟨P Q̃_q, P g_i⟩ ≈ ⟨Q̃_q, g_i⟩ = Q̃_qᵀ ∇ℓ(z_i)``

(equal in expectation over the projection's seed; exact where the projection is the identity). The index does not
depend on the curvature: another damping or method needs no rebuild.
"""

from __future__ import annotations

import torch

from .._data import DataSource, fingerprint
from ..functional import flatten
from .handle import GradientIndex
from .projection import project_flat

__all__ = ["IndexScorer", "index_source", "check_index_params"]


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
    found = fingerprint([flatten(params)[0]])
    if index.meta.get("params") != found:
        raise ValueError(
            f"{index.path}: the index holds gradients at other parameters (fingerprint {index.meta.get('params')}, "
            f"these params {found}); query it with the parameters it was built with, or build a new index for these"
        )


class IndexScorer:
    """A closure's scorer with the index's projection: queries ``P Q̃ [q, dim]`` against stored rows ``[b, dim]``."""

    splits_examples = False

    def __init__(self, inner, index: GradientIndex, params):
        self.inner, self.index, self.params = inner, index, params

    def prepare(self, query: DataSource, chunk_size: int | None) -> int:
        n_query = self.inner.prepare(query, chunk_size)
        self.projected = project_flat(self.index.projection, self.inner.preconditioned(), self.params)
        return n_query

    def chunk_size(self, train: DataSource, *, pairs: bool) -> int:
        return self.index.chunk  # the stored chunks: each is read once, whole

    def chunk(self, batch: torch.Tensor, offset: int) -> torch.Tensor:
        return self.projected @ batch.to(self.projected.dtype).T

    def self_terms(self, batch, offset: int) -> torch.Tensor:
        raise NotImplementedError(
            "self-influence from a gradient index needs the curvature in the projected space, which the index does "
            "not hold yet; use ifunc.self_influence with the training data"
        )
