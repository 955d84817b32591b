"""Exact iHVP from the dense curvature matrix (small models; the reference for every other method)."""

from __future__ import annotations

import torch

from .._data import DataSource
from .._types import Data, LossFn, Params
from ..curvature import resolve_curvature
from ..functional import flatten
from ._base import IHVP
from ._blocks import Blocks, blocks_info, resolve_blocks
from ._damping import resolve_damping
from ._dense import dense_curvature
from ._dense_solve import DenseSolver, dense_ihvp
from ._operator import data_operator

__all__ = ["ihvp_explicit", "ihvp_from_matrix"]


def ihvp_from_matrix(matrix: torch.Tensor, params: Params, *, damping: float | None = None) -> IHVP:
    """iHVP closure of a given symmetric ``[d, d]`` matrix ``M``: ``v -> (M + λI)^{-1} v``.

    ``M + λI = L Lᵀ`` is factorised once in float64 (Cholesky, ``d³/3`` flops); each call costs ``O(k d²)``.
    :meth:`IHVP.with_damping` factorises again, and from the third damping on eigendecomposes ``M`` once, after
    which every damping is free. ``info["eigenvalues"]`` is computed when first read. ``damping=None``
    (default): ``λ = 0.1 · mean eigenvalue = 0.1 · tr(M) / d`` (exact from the diagonal). The conditioning check
    is that of an eigendecomposition, decided from cheap bounds where they suffice (see
    :mod:`ifunc.ihvp._dense_solve`).

    Args:
      matrix: ``[d, d]``, symmetric (it is symmetrised as ``(M + Mᵀ) / 2``), finite.
      params: pytree or flat vector ``[d]`` giving the layout, dtype and device of the closure.
      damping: λ >= 0, or ``None`` for the rule above.

    Returns:
      :class:`IHVP` closure with ``info["eigenvalues"]`` (float64, ascending).

    Raises:
      ValueError: ``M`` is not ``[d, d]`` for the ``d`` of ``params``, is not finite, ``M + λI`` is
        not positive definite, or ``M`` is numerically singular at ``damping=0``.

    Warns:
      UserWarning: the damped condition number is beyond what the parameters' dtype solves accurately.

    Example:
      >>> ihvp = ifunc.ihvp_from_matrix(H, params, damping=1e-3)
      >>> x = ihvp(v)                        # (H + 1e-3 I)^{-1} v
    """
    flat, unflatten = flatten(params)
    d = flat.numel()
    if matrix.shape != (d, d):
        raise ValueError(f"matrix must be [{d}, {d}] to match params, got {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("the curvature matrix contains NaN/inf: check the loss and the data")
    M = matrix.detach().to(torch.float64)
    solver = DenseSolver([(M + M.T) / 2], psd=False, dtype=flat.dtype, who="ihvp_explicit")
    lam, rule = resolve_damping(damping, lambda: (solver.trace(), "exact"), d, who="ihvp_from_matrix")
    groups = resolve_blocks("full", unflatten, device=flat.device)
    like = flat.new_zeros(())  # the closure keeps the parameters' dtype and device, not their values
    return dense_ihvp(solver, groups, lam, name="explicit", unflatten=unflatten, like=like, info={}, rule=rule)


def ihvp_explicit(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    damping: float | None = None,
    curvature: str | None = None,
    blocks: Blocks = "full",
    generator: torch.Generator | None = None,
) -> IHVP:
    """Exact ``v -> (H + λI)^{-1} v`` from the dense mean curvature matrix.

    ``H = (1/n) Σ_i ∇² ℓ_i`` over the ``n`` examples of ``data`` (the Hessian, or the Gauss-Newton matrix
    with ``curvature="ggn"``, or a Fisher, see :func:`ifunc.curvature_operator`), ``O(d²)`` memory, formed the
    fastest exact way the curvature allows (:mod:`ifunc.ihvp._dense`): ``Gᵀ G / n`` from per-example gradients
    ``G [n, d]`` for the Fishers (``n d²`` flops); ``Jᵀ (Λ J) / n`` from per-example output Jacobians ``J_i [m, d]``
    and output Hessians ``Λ_i [m, m]`` for the GGN (``n m d²`` flops, at the matrix-product rate); ``d`` batched
    curvature products otherwise (the Hessian, a loss without the output split, more than ``d / 8`` outputs per
    example). The same matrix either way, to rounding.

    The solve (:mod:`ifunc.ihvp._dense_solve`, float64; the closure holds ``H`` and the factor, ``2 d²`` floats): a
    Cholesky factorisation of ``H + λI`` (``d³/3`` flops); each call then costs ``O(k d²)``. ``with_damping``
    factorises again, and from the third damping on the closure eigendecomposes ``H`` once, after which every
    damping is free. ``info["eigenvalues"]`` is computed when first read (``ihvp.info`` is a read-only mapping).
    The conditioning is checked as an eigendecomposition would check it, from cheap bounds where they prove the
    solve accurate and from the eigenvalues otherwise.

    With ``blocks="layer"`` (or a mapping parameter name -> group) only the diagonal blocks ``H_bb`` are
    formed (``O(Σ_b d_b²)`` memory) and each is inverted on its own: the cross-block curvature is dropped,
    ``[(H + λI)^{-1} v]_b ≈ (H_bb + λI)^{-1} v_b``.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch (or an :func:`ifunc.output_loss`).
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      damping: λ >= 0, or ``None`` (default) for ``λ = 0.1 × the mean eigenvalue = 0.1 · tr(H) / d``, exact from
        the diagonal (with ``blocks``: of the block diagonal, whose trace is ``tr(H)``, so one λ for all
        blocks). The λ used is ``ihvp.damping``.
      curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``; default ``"ggn"`` for an
        ``output_loss``, else ``"hessian"``.
      blocks: ``"full"`` (default), ``"layer"`` (group by module prefix: the name up to its last ``"."``)
        or a mapping ``{parameter name: group}``.
      generator: label sampling for ``curvature="fisher"`` (default seeded with 0).

    Returns:
      :class:`IHVP` closure ``[d] -> [d]``, ``[k, d] -> [k, d]``, pytree -> pytree, with
      ``info["eigenvalues"]`` (float64; concatenated over blocks); with ``damping=None`` also
      ``info["damping_rule"]``, ``info["damping_trace"]`` and ``info["damping_estimator"]``.

    Raises:
      ValueError: non-scalar or non-finite loss, negative damping, ``H + λI`` not positive definite (or ``H``
        numerically singular at ``damping=0``), ``blocks`` not covering the parameters, ``damping=None`` with
        ``tr(H) <= 0`` (an indefinite Hessian).

    Warns:
      UserWarning: the damped condition number is beyond what the parameters' dtype solves accurately.

    Example:
      >>> ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=1e-3)
      >>> x = ihvp(v)                      # (H + 1e-3 I)^{-1} v
      >>> ihvp.with_damping(1e-2)(v)       # a new Cholesky factorisation of the same H
    """
    curvature = resolve_curvature(loss, curvature)
    flat, unflatten = flatten(params)
    groups = resolve_blocks(blocks, unflatten, device=flat.device)
    op = data_operator(loss, params, data, curvature=curvature, generator=generator)  # checks the loss and data
    source = DataSource(data, name="data", ordered=curvature == "fisher")
    matrices, _, psd = dense_curvature(loss, op, source, groups, generator=generator)
    solver = DenseSolver(matrices, psd=psd, dtype=flat.dtype, who="ihvp_explicit")
    d = flat.numel()
    lam, rule = resolve_damping(damping, lambda: (solver.trace(), "exact"), d, who="ihvp_explicit")
    return dense_ihvp(
        solver,
        groups,
        lam,
        name="explicit",
        unflatten=unflatten,
        like=flat.new_zeros(()),
        info={"blocks": blocks_info("explicit", groups), "curvature": curvature},
        rule=rule,
    )
