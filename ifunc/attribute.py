"""Influence scores: pairwise ``[n_query, n_train]`` and self-influence ``[n_train]``."""
from __future__ import annotations

import torch

from ._types import Data, LossFn, Measurement, Params
from .grads import iter_per_sample_grads, per_sample_grads
from .ihvp._base import IHVP

__all__ = ["attribute", "self_influence"]


def _check_ihvp(ihvp, d: int):
    if not callable(ihvp):
        raise TypeError(f"ihvp must be a callable v -> (H + λI)^{{-1}} v (e.g. ifunc.ihvp_cg(...)), got {ihvp!r}")
    if isinstance(ihvp, IHVP) and ihvp.dim != d:
        raise ValueError(f"ihvp was built for {ihvp.dim} parameters but params have {d}")


def _solve(ihvp, V: torch.Tensor) -> torch.Tensor:
    return ihvp.solve(V) if isinstance(ihvp, IHVP) else ihvp(V)


def attribute(loss: LossFn, params: Params, ihvp, train: Data, query: Data, *,
              measurement: Measurement | None = None, chunk_size: int | None = None,
              max_memory: int | None = None) -> torch.Tensor:
    """Pairwise influence scores of training examples on query measurements.

    ``scores[q, i] = ∇f(z_q)ᵀ (H + λI)^{-1} ∇ℓ(z_i)``, with ``f`` the measurement (default: the loss) and
    ``ℓ`` the training loss of one example: the first-order *decrease* of ``f(z_q)`` when example ``i`` is
    up-weighted. Positive = helpful. If ``H`` is the curvature of the mean training loss over ``n``
    examples, removing example ``i`` changes ``f(z_q)`` by about ``+scores[q, i] / n``.

    Query gradients are preconditioned once, as one ``[n_query, d]`` block solve; training gradients then
    stream in chunks (``vmap(grad)``) and each chunk costs one matrix product.

    Args:
      loss: training loss ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      ihvp: a closure from any ``ifunc.ihvp_*`` (or any callable ``[k, d] -> [k, d]``).
      train, query: batch, list of batches, Dataset or DataLoader.
      measurement: ``f(params, batch) -> scalar`` for the queries; default ``loss``.
      chunk_size, max_memory: examples per gradient chunk, or a byte budget (default 1 GiB).

    Returns:
      ``[n_query, n_train]`` tensor in the parameters' dtype.

    Example:
      >>> scores = ifunc.attribute(loss, params, ihvp, (x_tr, y_tr), (x_te, y_te))
      >>> scores.topk(5, dim=1).indices     # most helpful training examples per query
    """
    Q = per_sample_grads(measurement or loss, params, query, chunk_size=chunk_size, max_memory=max_memory)
    _check_ihvp(ihvp, Q.shape[1])
    with torch.no_grad():
        Qp = _solve(ihvp, Q)
    columns = [Qp @ G.T for G in iter_per_sample_grads(loss, params, train, chunk_size=chunk_size,
                                                         max_memory=max_memory, name="train")]
    return torch.cat(columns, dim=1)


def self_influence(loss: LossFn, params: Params, ihvp, train: Data, *, chunk_size: int | None = None,
                   max_memory: int | None = None) -> torch.Tensor:
    """Self-influence ``s[i] = ∇ℓ(z_i)ᵀ (H + λI)^{-1} ∇ℓ(z_i)``, ``[n_train]``.

    Large values flag examples the model finds surprising (often mislabelled). Each chunk of gradients is
    solved as one ``[c, d]`` block.
    """
    out = []
    for G in iter_per_sample_grads(loss, params, train, chunk_size=chunk_size, max_memory=max_memory,
                                   name="train"):
        _check_ihvp(ihvp, G.shape[1])
        with torch.no_grad():
            out.append((G * _solve(ihvp, G)).sum(dim=1))
    return torch.cat(out)
