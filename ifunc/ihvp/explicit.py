"""Exact iHVP from the dense curvature matrix (small models; the reference for every other method)."""
from __future__ import annotations

import torch

from .._types import Data, LossFn, Params
from ..curvature import ggn, hessian, resolve_curvature
from ..functional import flatten
from ._base import IHVP
from ._eigen import eigen_solve, validated_damping

__all__ = ["ihvp_explicit", "ihvp_from_matrix"]


def ihvp_from_matrix(matrix: torch.Tensor, params: Params, *, damping: float = 0.0) -> IHVP:
    """iHVP closure of a given symmetric ``[d, d]`` matrix ``M``: ``v -> (M + λI)^{-1} v``.

    The eigendecomposition ``M = Q diag(w) Qᵀ`` runs once in float64; each call costs ``O(k d²)`` and
    :meth:`IHVP.with_damping` reuses it.

    Raises:
      ValueError: ``M`` is not ``[d, d]`` for the ``d`` of ``params``, is not finite, or ``M + λI`` is
        not positive definite.
    """
    flat, unflatten = flatten(params)
    d = flat.numel()
    if matrix.shape != (d, d):
        raise ValueError(f"matrix must be [{d}, {d}] to match params, got {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("the curvature matrix contains NaN/inf: check the loss and the data")
    M = matrix.detach().to(torch.float64)
    w, Q = torch.linalg.eigh((M + M.T) / 2)

    def build(lam: float) -> IHVP:
        lam = validated_damping(lam, w, "ihvp_explicit")
        return IHVP(lambda V: eigen_solve(Q, w, lam, V), name="explicit", damping=lam,
                    unflatten=unflatten, like=flat.new_zeros(()), rebuild=build,
                    info={"eigenvalues": w})

    return build(damping)


def ihvp_explicit(loss: LossFn, params: Params, data: Data, *, damping: float = 0.0,
                  curvature: str | None = None) -> IHVP:
    """Exact ``v -> (H + λI)^{-1} v`` from the dense mean curvature matrix.

    ``H = (1/n) Σ_i ∇² ℓ_i`` over the ``n`` examples of ``data`` (the Hessian, or the Gauss-Newton matrix
    with ``curvature="ggn"``). Forms ``H`` (``d`` HVP-columns, ``O(d²)`` memory), eigendecomposes it in
    float64 once; each call then costs ``O(k d²)``. Changing the damping is free (``with_damping``).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch (or an :func:`ifunc.output_loss`).
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      damping: λ >= 0.
      curvature: ``"hessian"`` or ``"ggn"``; default ``"ggn"`` for an ``output_loss``, else ``"hessian"``.

    Returns:
      :class:`IHVP` closure ``[d] -> [d]``, ``[k, d] -> [k, d]``, pytree -> pytree.

    Raises:
      ValueError: non-scalar or non-finite loss, negative damping, ``H + λI`` not positive definite.

    Example:
      >>> ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=1e-3)
      >>> x = ihvp(v)                      # (H + 1e-3 I)^{-1} v
      >>> ihvp.with_damping(1e-2)(v)       # no recomputation
    """
    curvature = resolve_curvature(loss, curvature)
    matrix = hessian(loss, params, data) if curvature == "hessian" else ggn(loss, params, data)
    return ihvp_from_matrix(matrix, params, damping=damping)
