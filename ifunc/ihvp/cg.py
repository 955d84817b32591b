"""Conjugate gradients on ``H + λI``: exact up to a tolerance, HVPs only."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._types import Data, LossFn, Params, Preconditioner
from ._base import IHVP, ConvergenceError, check_damping
from ._blocks import block_diagonal, blocks_info, resolve_blocks
from ._operator import data_operator

__all__ = ["ihvp_cg", "cg_solve", "CGResult"]


class CGResult(NamedTuple):
    """Result of :func:`cg_solve` for ``k`` right-hand sides."""

    x: torch.Tensor  #: ``[k, d]`` solutions
    iterations: torch.Tensor  #: ``[k]`` iterations each right-hand side took
    residual: torch.Tensor  #: ``[k]`` final residual norms ``‖b − A x‖``
    converged: bool  #: every right-hand side met ``‖r‖ <= max(tol ‖b‖, atol)``


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def cg_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    B: torch.Tensor,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Preconditioner | None = None,
) -> CGResult:
    """Solve ``A X = B`` for SPD ``A`` by (preconditioned) conjugate gradients, ``k`` systems at once.

    The ``k`` recurrences run in lockstep so that each iteration costs one batched ``matvec`` on the
    still-active columns; a column stops as soon as ``‖r‖ <= max(tol·‖b‖, atol)``. Starts from ``X = 0``.

    Args:
      matvec: ``[m, d] -> [m, d]``, the product with ``A``.
      B: right-hand sides ``[k, d]`` (or ``[d]``).
      tol, atol: relative and absolute residual tolerances.
      maxiter: iteration cap (default ``min(10 d, 1000)``).
      preconditioner: ``[m, d] -> [m, d]`` approximating ``A^{-1}`` (SPD).

    Returns:
      :class:`CGResult`; never raises on non-convergence (see ``converged``).

    Raises:
      ValueError: ``A`` is not positive definite along a search direction, or NaN appeared.
    """
    single = B.dim() == 1
    B = B.reshape(-1, B.shape[-1]) if single else B
    k, d = B.shape
    maxiter = min(10 * d, 1000) if maxiter is None else int(maxiter)
    M = preconditioner if preconditioner is not None else (lambda r: r)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = M(R)
    P = Z.clone()
    rz = _rowdot(R, Z)
    threshold = torch.clamp(tol * B.norm(dim=1), min=atol)
    iterations = torch.zeros(k, dtype=torch.long)
    active = R.norm(dim=1) > threshold
    for _ in range(maxiter):
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        p = P[idx]
        Ap = matvec(p)
        pAp = _rowdot(p, Ap)
        if not torch.isfinite(pAp).all():
            raise ValueError("cg_solve: NaN/inf in the matrix-vector product; check the loss and params")
        if (pAp <= 0).any():
            raise ValueError(
                f"cg_solve: the operator is not positive definite (pᵀAp = {float(pAp.min()):.3e}); increase "
                'damping, or use a PSD curvature ("ggn", "fisher", "empirical_fisher") if it is the Hessian'
            )
        alpha = rz[idx] / pAp
        X[idx] += alpha[:, None] * p
        r = R[idx] - alpha[:, None] * Ap
        R[idx] = r
        z = M(r)
        rz_new = _rowdot(r, z)
        beta = rz_new / rz[idx]
        P[idx] = z + beta[:, None] * p
        rz[idx] = rz_new
        iterations[idx] += 1
        active[idx] = r.norm(dim=1) > threshold[idx]
    residual = R.norm(dim=1)
    converged = bool((residual <= threshold).all())
    if single:
        X = X[0]
    return CGResult(X, iterations, residual, converged)


def ihvp_cg(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    damping: float = 0.0,
    tol: float = 1e-4,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Preconditioner | None = None,
    curvature: str | None = None,
    blocks="full",
    generator: torch.Generator | None = None,
) -> IHVP:
    """``v -> (H + λI)^{-1} v`` by conjugate gradients on the mean curvature over ``data``.

    ``H = (1/n) Σ_i ∇² ℓ_i`` (Hessian, or Gauss-Newton with ``curvature="ggn"``). Nothing is precomputed:
    each call runs CG, every iteration one pass over ``data`` with a vmapped HVP for all ``k`` active
    right-hand sides (``[k, d]`` input is solved together). Memory ``O(k d)``.

    The default ``tol=1e-4`` (relative residual) is loose on purpose: rankings of training examples
    settle long before the residual does. Use :func:`cg_solve` for diagnostics (iterations, residuals).

    With ``blocks="layer"`` (or a mapping) CG runs on the block diagonal ``D = Σ_b P_b H P_b`` of the
    curvature (cross-block curvature dropped), whose inverse solves every block on its own,
    ``(H_bb + λI)^{-1} v_b``; all blocks share each data pass (``m·k`` vectors for ``m`` blocks).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch (or an :func:`ifunc.output_loss`).
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      damping: λ >= 0.
      tol, atol: stop when ``‖(H + λI)x − v‖ <= max(tol‖v‖, atol)`` for every right-hand side.
      maxiter: iteration cap, default ``min(10 d, 1000)``.
      preconditioner: callable ``[k, d] -> [k, d]`` approximating ``(H + λI)^{-1}`` (e.g. another iHVP,
        :func:`ifunc.jacobi_preconditioner` or :func:`ifunc.nystrom_preconditioner`).
      curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
      blocks: ``"full"`` (default), ``"layer"`` or a mapping ``{parameter name: group}``.
      generator: label sampling for ``curvature="fisher"`` (default seeded with 0).

    Returns:
      :class:`IHVP` closure.

    Raises:
      ConvergenceError: (at call time) the tolerance was not met within ``maxiter``; the message gives the
        residual reached.
      ValueError: ``H + λI`` not positive definite, non-scalar loss, negative damping.

    Example:
      >>> ihvp = ifunc.ihvp_cg(loss, params, loader, damping=1e-3, tol=1e-6)
      >>> x = ihvp(torch.randn(8, ihvp.dim))   # 8 systems solved together

    References:
      Hestenes & Stiefel (1952); Martens (2010); Koh & Liang (2017).
    """
    op = data_operator(loss, params, data, curvature=curvature, generator=generator)
    if tol < 0 or atol < 0:
        raise ValueError(f"tol and atol must be >= 0, got tol={tol}, atol={atol}")
    groups = resolve_blocks(blocks, op.unflatten, device=op.flat_params.device)
    matvec = block_diagonal(op.matvec, groups, op.flat_params.numel())

    def build(lam: float) -> IHVP:
        lam = check_damping(lam)

        def solve(V: torch.Tensor) -> torch.Tensor:
            try:
                res = cg_solve(
                    lambda P: matvec(P) + lam * P, V, tol=tol, atol=atol, maxiter=maxiter, preconditioner=preconditioner
                )
            except ValueError as err:
                if "not positive definite" not in str(err) or op.curvature == "hessian":
                    raise
                raise ValueError(  # a PSD curvature: the negative curvature is rounding, not the model's
                    f"ihvp_cg: the {op.curvature} curvature is PSD, but with damping {lam:g} a search direction met "
                    f"non-positive curvature ({err}) ({V.dtype}): H + λI is singular or lost to "
                    "rounding; use damping > 0 (or more), or compute in float64"
                ) from None
            if not res.converged:
                rel = (res.residual / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)).max()
                raise ConvergenceError(
                    f"ihvp_cg did not converge in {int(res.iterations.max())} iterations: relative residual "
                    f"{float(rel):.3e} > tol={tol:g}. Increase damping (now {lam:g}), maxiter, or tol, or "
                    "pass a preconditioner"
                )
            return res.x

        return IHVP(
            solve,
            name="cg",
            damping=lam,
            unflatten=op.unflatten,
            like=op.flat_params.new_zeros(()),
            rebuild=build,
            info={
                "tol": tol,
                "atol": atol,
                "maxiter": maxiter,
                "curvature": op.curvature,
                "blocks": blocks_info("cg", groups),
            },
        )

    return build(damping)
