"""Scorers: score columns of a chunk of training examples against queries prepared once.

The generic scorer takes per-example gradients of the queries, solves them as one ``[n_query, d]`` block with
the closure, and contracts each train chunk's per-example gradients with the result; the Kronecker scorer
preconditions the queries per layer and contracts them with captured layer inputs and output gradients
(:mod:`ifunc.ihvp.kronecker.score`, :mod:`ifunc.ihvp.kronecker.tokens`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import distributed
from ._data import DataSource, tensor_leaves
from .grads import chunk_size_for, iter_per_sample_grads
from .ihvp._base import IHVP
from .ihvp.kronecker.budget import capture_chunk_size
from .ihvp.kronecker.score import kronecker_chunk_scores, kronecker_prepare
from .ihvp.kronecker.tokens import token_chunk_scores

__all__ = ["Scorer", "generic_scorer", "kronecker_scorer", "solve"]


def check_ihvp(ihvp, d: int):
    if not callable(ihvp):
        raise TypeError(f"ihvp must be a callable v -> (H + λI)^{{-1}} v (e.g. ifunc.ihvp_cg(...)), got {ihvp!r}")
    if isinstance(ihvp, IHVP) and ihvp.dim != d:
        raise ValueError(f"ihvp was built for {ihvp.dim} parameters but params have {d}")


def solve(ihvp, V: torch.Tensor) -> torch.Tensor:
    check_ihvp(ihvp, V.shape[1])
    with torch.no_grad():
        return ihvp.solve(V) if isinstance(ihvp, IHVP) else ihvp(V)


class Scorer(NamedTuple):
    """Score columns of one chunk of training examples against queries prepared once."""

    chunk: int  #: examples per chunk
    n_query: int
    score: Callable  #: ``(batch, offset) -> [..., b]`` (examples on the last axis)


def generic_scorer(loss, params, ihvp, train, query, measurement, chunk_size, max_memory, dtype) -> Scorer:
    Q = torch.cat(
        list(
            iter_per_sample_grads(
                measurement or loss, params, query, chunk_size=chunk_size, max_memory=max_memory, name="query"
            )
        )
    )
    Q = distributed.broadcast_from_rank0(Q)  # identical right-hand sides on every rank: the solve may be distributed
    Qp = solve(ihvp, Q)
    Qp = Qp.to(dtype or Qp.dtype)
    held = Q.numel() * Q.element_size() + Qp.numel() * Qp.element_size()
    chunk = chunk_size or chunk_size_for(loss, params, train, max_memory=max_memory, name="train", fixed=held)

    def score(batch, offset):
        return torch.cat(
            [
                Qp @ G.to(Qp.dtype).T
                for G in iter_per_sample_grads(loss, params, batch, chunk_size=chunk, name="train", offset=offset)
            ],
            dim=1,
        )

    return Scorer(chunk, Qp.shape[0], score)


def kronecker_scorer(
    loss,
    params,
    ihvp,
    train,
    query,
    measurement,
    chunk_size,
    max_memory,
    query_rank,
    per_module,
    per_token=False,
    token_mask=None,
) -> Scorer:
    prepared = kronecker_prepare(
        loss,
        params,
        ihvp,
        query,
        measurement=measurement,
        chunk_size=chunk_size,
        max_memory=max_memory,
        query_rank=query_rank,
    )
    prepared = distributed.broadcast_from_rank0(prepared)  # identical preconditioned queries on every rank

    def score(batch, offset):
        if per_token:
            return token_chunk_scores(loss, params, ihvp, prepared, batch, token_mask=token_mask, offset=offset)
        out = kronecker_chunk_scores(loss, params, ihvp, prepared, batch, per_module=per_module, offset=offset)
        return out if per_module else out[0]

    n_query = int(prepared.diag.shape[0])
    chunk = chunk_size or train_chunk_size(loss, params, ihvp, train, max_memory, n_query=n_query, per_token=per_token)
    return Scorer(chunk, n_query, score)


def train_chunk_size(loss, params, ihvp, train, max_memory, *, n_query: int = 0, per_token: bool = False) -> int:
    """Train examples per chunk of a Kronecker pass within ``max_memory`` (:mod:`ifunc.ihvp.kronecker.budget`).

    Per example it holds its captured forward and ``[n_query]`` score columns (``[n_query, T]`` per token, with
    ``T`` read off the first example's first tensor).
    """
    one = DataSource(train, name="train").first()
    positions = tensor_leaves(one)[0][0].numel() if per_token else 1
    return capture_chunk_size(
        loss,
        params,
        ihvp.model,
        [blk.spec for blk in ihvp.blocks],
        train,
        max_memory=max_memory,
        what="Kronecker scores of the train data",
        extra_per_example=2 * n_query * positions * ihvp.dtype.itemsize,
    )
