"""Influence scores: pairwise ``[n_query, n_train]`` and self-influence ``[n_train]``."""
from __future__ import annotations

import torch

from ._types import Data, LossFn, Measurement, Params
from ._kscore import kronecker_attribute, kronecker_self_influence, kronecker_state
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
              max_memory: int | None = None, query_rank: int | None = None,
              per_module: bool = False) -> torch.Tensor:
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
      query_rank: Kronecker family only: compress each preconditioned query to rank ``r`` per layer
        (SVD), trading accuracy for speed.
      per_module: Kronecker family only: return ``[n_modules, n_query, n_train]``, one slice per block of
        ``ihvp.info["modules"]``, summing to the total.

    When ``ihvp`` is a Kronecker-family closure built with ``model=`` (``ihvp_ekfac``, ``ihvp_kfac``,
    ``ihvp_diagonal``, ``ihvp_identity``), queries are preconditioned per layer and contracted with
    captured layer inputs / output-gradients of the training examples (``Σ_t g_tᵀ Q̃ a_t``), with no
    per-example gradient of the whole model; the result is the same as the generic path.

    Returns:
      ``[n_query, n_train]`` tensor in the parameters' dtype.

    Example:
      >>> scores = ifunc.attribute(loss, params, ihvp, (x_tr, y_tr), (x_te, y_te))
      >>> scores.topk(5, dim=1).indices     # most helpful training examples per query
    """
    if kronecker_state(ihvp) is not None:
        return kronecker_attribute(loss, params, ihvp, train, query, measurement=measurement, chunk_size=chunk_size,
                                   max_memory=max_memory, query_rank=query_rank, per_module=per_module)
    if query_rank is not None or per_module:
        raise ValueError("query_rank= and per_module=True need a Kronecker-family closure built with model= "
                         "(ifunc.ihvp_ekfac / ihvp_kfac / ihvp_diagonal / ihvp_identity)")
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
    if kronecker_state(ihvp) is not None:
        return kronecker_self_influence(loss, params, ihvp, train, chunk_size=chunk_size)
    out = []
    for G in iter_per_sample_grads(loss, params, train, chunk_size=chunk_size, max_memory=max_memory,
                                   name="train"):
        _check_ihvp(ihvp, G.shape[1])
        with torch.no_grad():
            out.append((G * _solve(ihvp, G)).sum(dim=1))
    return torch.cat(out)
