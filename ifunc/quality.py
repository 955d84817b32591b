"""How far is an approximate iHVP from a reference one? Relative errors and score agreement in one call."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._errors import check_count
from .ihvp import IHVP
from .likelihood import default_generator

__all__ = ["ihvp_error", "IHVPError", "spearman", "pearson"]


class IHVPError(NamedTuple):
    """Result of :func:`ihvp_error`: errors relative to the reference (0 = identical)."""

    probe_error: float  #: mean over random probes ``v`` of ``‖ihvp(v) − ref(v)‖ / ‖ref(v)‖``
    probe_error_max: float  #: the largest of those relative errors
    query_error: float | None  #: the same mean relative error on the query gradients (``None`` without)
    score_cosine: float | None  #: cosine similarity of the flattened score matrices (1 = same direction)
    score_spearman: float | None  #: Spearman rank correlation of each query's scores, averaged over queries


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` of a 1-D tensor, ties sharing their average rank."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    average = start.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    return average[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of ``[m, n]`` tensors: ``[m]``; NaN for a constant row.

    ``r = Σ_j (a_j − ā)(b_j − b̄) / (‖a − ā‖ ‖b − b̄‖)`` per row.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"pearson: expected two [m, n] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of ``[m, n]`` tensors (ties get average ranks): ``[m]``.

    ``ρ = corr(rank(a_q), rank(b_q))`` (:func:`pearson` of the ranks); NaN for a constant row.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"spearman: expected two [m, n] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return pearson(torch.stack([_ranks(row) for row in a]), torch.stack([_ranks(row) for row in b]))


def _as_flat(name: str, value, ihvp: IHVP) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() != 2 or value.shape[1] != ihvp.dim:
            raise ValueError(
                f"ihvp_error: {name} must be gradients [m, d={ihvp.dim}] (e.g. from "
                f"ifunc.per_sample_grads), got {tuple(value.shape)}"
            )
        return value
    flat, _ = ihvp.unflatten.flatten_like(value, batched=True)
    return flat


def _relative(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(torch.finfo(ref.dtype).tiny)


def ihvp_error(
    ihvp: IHVP,
    reference: Callable[[torch.Tensor], torch.Tensor],
    *,
    probes: int = 8,
    queries=None,
    train=None,
    generator: torch.Generator | None = None,
) -> IHVPError:
    """Compare an approximate iHVP with a reference on random probes and on the vectors that matter.

    With ``x = ihvp(v)`` and ``x* = reference(v)`` (e.g. :func:`ifunc.ihvp_explicit`, or
    :func:`ifunc.ihvp_cg` with a tight ``tol`` for models too big for a dense matrix):

    - ``probe_error``: mean over ``probes`` standard Gaussian vectors ``v`` of ``‖x − x*‖ / ‖x*‖``
      (and ``probe_error_max``);
    - ``query_error``: the same on the rows of ``queries`` (query gradients ``∇f(z_q)``);
    - scores ``S = Q (H + λI)^{-1} Tᵀ`` ``[m, n]`` with ``Q`` the queries and ``T`` the ``train``
      gradients (the queries themselves when ``train`` is not given): ``score_cosine`` is
      ``⟨S, S*⟩ / (‖S‖ ‖S*‖)`` over all entries, ``score_spearman`` the Spearman correlation of each
      query's row of scores, averaged over queries (how well the ranking of training examples agrees).

    Probe errors measure the solver; score agreement measures what attribution needs. Cost: one call
    of each closure on ``probes`` vectors and one on the ``m`` queries.

    Args:
      ihvp: the approximate :class:`ifunc.IHVP`.
      reference: an :class:`ifunc.IHVP` or any callable ``[k, d] -> [k, d]`` for the same ``d``.
      probes: number of random probes (>= 1).
      queries: query gradients ``[m, d]`` (or a pytree with a leading ``m``), optional.
      train: training gradients ``[n, d]`` (or a pytree), optional; needs ``queries``.
      generator: draws the probes (default seeded with 0; the global RNG is never used).

    Returns:
      :class:`IHVPError` (plain floats; the query and score fields are ``None`` without ``queries``,
      ``score_spearman`` is ``None`` with fewer than 2 score columns).

    Raises:
      TypeError, ValueError: ``probes`` not an int >= 1 (a bool or a float included).
      ValueError: wrong gradient shapes, ``train`` without ``queries``.

    Example:
      >>> exact = ifunc.ihvp_explicit(loss, params, data, damping=1e-3)
      >>> approx = ifunc.ihvp_nystrom(loss, params, data, rank=20, damping=1e-3)
      >>> Q = ifunc.per_sample_grads(loss, params, test_batch)
      >>> ifunc.ihvp_error(approx, exact, queries=Q).score_spearman
    """
    probes = check_count(probes, "probes", "ihvp_error")
    ref_dim = getattr(reference, "dim", ihvp.dim)
    if ref_dim != ihvp.dim:
        raise ValueError(
            f"ihvp_error: ihvp has d={ihvp.dim} but reference has d={ref_dim}; compare iHVPs of the same parameters"
        )
    for what, value in (("queries", queries), ("train", train)):
        if value is not None and not (isinstance(value, (torch.Tensor, dict))):
            raise TypeError(
                f"ihvp_error: {what}= takes gradients (a [m, d] tensor, or a pytree like params with a leading m), "
                f"not data ({type(value).__name__}); compute them with ifunc.per_sample_grads(loss, params, data)"
            )
    if train is not None and queries is None:
        raise ValueError("ihvp_error: train gradients need query gradients too (pass queries=...)")
    generator = generator if generator is not None else default_generator()
    dtype = ihvp.dtype
    V = torch.randn(probes, ihvp.dim, generator=generator, dtype=dtype).to(ihvp.device)
    with torch.no_grad():
        probe = _relative(ihvp(V), reference(V))
        query_error = cosine = rank = None
        if queries is not None:
            Q = _as_flat("queries", queries, ihvp).to(dtype)
            T = Q if train is None else _as_flat("train", train, ihvp).to(dtype)
            X, X_ref = ihvp(Q), reference(Q)
            query_error = float(_relative(X, X_ref).mean())
            S, S_ref = X @ T.T, X_ref @ T.T
            cosine = float((S * S_ref).sum() / (S.norm() * S_ref.norm()).clamp_min(torch.finfo(dtype).tiny))
            if S.shape[1] >= 2:
                rank = float(spearman(S, S_ref).nanmean())
    return IHVPError(float(probe.mean()), float(probe.max()), query_error, cosine, rank)
