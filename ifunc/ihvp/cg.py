"""Conjugate gradients on ``H + λI``: exact up to a tolerance, HVPs only."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._errors import check_count
from .._types import Data, LossFn, Params, Preconditioner
from ._base import IHVP, ConvergenceError
from ._blocks import Blocks, block_diagonal, blocks_info, resolve_blocks
from ._cg_loop import iterate
from ._damping import check_damping, hutchinson_trace, resolve_damping
from ._operator import data_operator, data_signature

__all__ = ["ihvp_cg", "cg_solve", "CGResult", "DEFAULT_TOL"]

#: :func:`ihvp_cg` accepts a ``tol`` below the rounding of the dtype (``tol=1e-12`` in float32) as met when the
#: true relative residual stalls at or below ``FLOOR_EPS · ε`` (ε the dtype's machine epsilon: 4.8e-7 in float32,
#: 8.9e-16 in float64, 3.1e-2 in bfloat16): no solve in that dtype does better. A half-precision model solves in
#: float32 but its curvature products carry its own rounding: ε is then the model's (bfloat16, float16).
FLOOR_EPS = 4

#: The default relative tolerance of :func:`cg_solve` and :func:`ihvp_cg`: stop a right-hand side ``b``
#: when ``‖b − A x‖ <= max(DEFAULT_TOL · ‖b‖, atol)``. SciPy's and JAX's ``cg`` default; rankings of
#: training examples settle long before, so a looser ``tol`` is often enough and costs fewer iterations.
DEFAULT_TOL = 1e-5


class CGResult(NamedTuple):
    """Result of :func:`cg_solve` for ``k`` right-hand sides."""

    x: torch.Tensor  #: ``[k, d]`` solutions
    iterations: torch.Tensor  #: ``[k]`` iterations each right-hand side took (restarts included)
    residual: torch.Tensor  #: ``[k]`` final TRUE residual norms ``‖b − A x‖`` (recomputed, not recursive)
    converged: torch.Tensor  #: ``[k]`` bool: the true residual meets ``‖b_i − A x_i‖ <= max(tol ‖b_i‖, atol)``
    #: ``[k]`` bool: stopped above the tolerance before ``maxiter`` because a restart no longer halved the true
    #: residual: the rounding floor of the dtype (a looser ``tol``, more damping or float64 is needed)
    stalled: torch.Tensor | None = None


def cg_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    B: torch.Tensor,
    *,
    tol: float = DEFAULT_TOL,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Preconditioner | None = None,
) -> CGResult:
    """Solve ``A X = B`` for SPD ``A`` by (preconditioned) conjugate gradients, ``k`` systems at once.

    The ``k`` recurrences run in lockstep so that each iteration costs one batched ``matvec`` on the
    still-active columns; a column stops as soon as its recursive residual ``r`` has ``‖r‖ <= max(tol·‖b‖, atol)``.
    Starts from ``X = 0``.

    **The true residual is checked.** In finite precision the recursive residual drifts away from
    ``b − A x`` (by about ``ε ‖A‖ ‖x‖``, ε the dtype's rounding), so after the iterations stop the true residual
    ``b − A x`` of the columns that ran is recomputed (one block ``matvec``). A column above the tolerance restarts
    CG from its ``x`` with that true residual, sharing the ``maxiter`` budget, as long as each restart at
    least halves its true residual; when a restart does not, the column is at the rounding floor of the dtype and
    is reported ``stalled``. ``residual`` and ``converged`` always describe the true residual.

    Args:
      matvec: ``[m, d] -> [m, d]``, the product with ``A``.
      B: right-hand sides ``[k, d]`` (or ``[d]``).
      tol, atol: relative and absolute residual tolerances (``tol`` default :data:`DEFAULT_TOL` = 1e-5).
      maxiter: iteration cap, an int >= 1 (default ``min(10 d, 1000)``), restarts included.
      preconditioner: ``[m, d] -> [m, d]`` approximating ``A^{-1}`` (SPD).

    Returns:
      :class:`CGResult` (``x [k, d]``, or ``[d]`` for a ``[d]`` input; ``iterations``, ``residual``,
      ``converged`` and ``stalled`` are ``[k]`` either way); never raises on non-convergence:
      ``bool(res.converged.all())`` says whether every right-hand side converged.

    Raises:
      TypeError, ValueError: ``maxiter`` not an int >= 1 (a bool or a float included).
      ValueError: ``A`` is not positive definite along a search direction, or NaN appeared.
    """
    single = B.dim() == 1
    B = B.reshape(-1, B.shape[-1]) if single else B
    k, d = B.shape
    maxiter = min(10 * d, 1000) if maxiter is None else check_count(maxiter, "maxiter", "cg_solve")
    M = preconditioner if preconditioner is not None else (lambda r: r)
    X = torch.zeros_like(B)
    R = B.clone()
    threshold = torch.clamp(tol * B.norm(dim=1), min=atol)
    iterations = torch.zeros(k, dtype=torch.long)
    stalled = torch.zeros(k, dtype=torch.bool)
    # the recursion stops at 1% of the dtype's rounding at the latest: below it the products underflow to noise
    stop = torch.maximum(threshold, 0.01 * torch.finfo(B.dtype).eps * B.norm(dim=1))
    residual = R.norm(dim=1)
    todo = residual > threshold
    budget = maxiter
    while bool(todo.any()) and budget > 0:
        ran = todo.clone()
        budget -= iterate(matvec, M, X, R, stop, todo, iterations, budget)
        idx = ran.nonzero().squeeze(1)
        stopped = ~todo[idx]  # stopped on the recursive residual, not on the iteration cap
        R[idx] = B[idx] - matvec(X[idx])  # the true residual of the columns that ran
        true = R[idx].norm(dim=1)
        progress = true <= 0.5 * residual[idx]
        residual[idx] = true
        above = true > threshold[idx]
        stalled[idx] = above & ~progress & stopped
        todo = torch.zeros_like(todo)
        todo[idx] = above & progress
    if single:
        X = X[0]
    return CGResult(X, iterations, residual, residual <= threshold, stalled)


def ihvp_cg(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    damping: float | None = None,
    tol: float = DEFAULT_TOL,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Preconditioner | None = None,
    curvature: str | None = None,
    blocks: Blocks = "full",
    generator: torch.Generator | None = None,
) -> IHVP:
    """``v -> (H + λI)^{-1} v`` by conjugate gradients on the mean curvature over ``data``.

    ``H = (1/n) Σ_i ∇² ℓ_i`` (Hessian, or Gauss-Newton with ``curvature="ggn"``). Nothing is precomputed:
    each call runs CG, every iteration one pass over ``data`` with a vmapped HVP for all ``k`` active
    right-hand sides (``[k, d]`` input is solved together). Memory ``O(k d)``.

    The default ``tol`` is :data:`DEFAULT_TOL` (1e-5 relative residual, shared with :func:`cg_solve`);
    rankings of training examples settle long before the residual does. Use :func:`cg_solve` for
    diagnostics (iterations, residuals).

    **Preconditioned.** Each iteration costs one curvature product of the whole ``[k, d]`` block, so time is
    iterations × block. A Nyström preconditioner of rank ``r`` costs one product of ``r`` vectors, once, and
    takes the top ``r`` eigenvalues out of the condition number that sets the number of iterations; with a
    looser ``tol`` it is the fast setting for attribution (the documentation's benchmarks measure it)::

        op = ifunc.curvature_operator(loss, params, train)
        ihvp = ifunc.ihvp_cg(loss, params, train, tol=1e-2,
                             preconditioner=ifunc.nystrom_preconditioner(op, rank=100, damping=None))

    With ``blocks="layer"`` (or a mapping) CG runs on the block diagonal ``D = Σ_b P_b H P_b`` of the
    curvature (cross-block curvature dropped), whose inverse solves every block on its own,
    ``(H_bb + λI)^{-1} v_b``; all blocks share each data pass (``m·k`` vectors for ``m`` blocks).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch (or an :func:`ifunc.output_loss`).
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      damping: λ >= 0, or ``None`` (default) for ``λ = 0.1 × the mean eigenvalue = 0.1 · tr(H) / d`` with
        ``tr(H)`` from a Hutchinson estimate: 20 Rademacher probes in one batched curvature product at build
        time (exact when ``d <= 20``), drawn from a generator seeded from ``generator`` (default seed 0)
        without advancing it. Relative error of the estimate at most ``sqrt(2 / (20 r))`` (one standard
        deviation) for a PSD curvature of effective rank ``r = tr(H)² / ‖H‖_F²``: 32 % for ``r = 1``, 3 %
        for ``r = 100``. With ``blocks`` the same λ (the block diagonal has the trace of ``H``). The λ used
        is ``ihvp.damping``; ``info["damping_trace"]`` holds the estimate.
      tol, atol: stop when ``‖(H + λI)x − v‖ <= max(tol‖v‖, atol)`` for every right-hand side (the true residual,
        checked after the iterations; a ``tol`` below the dtype's rounding counts as met at ``4 ε``, see
        :data:`FLOOR_EPS`; a half-precision model iterates in float32 on products rounded to its own dtype, whose
        ε counts). This bounds the residual, not the error of ``x``, which can be larger by
        up to the condition number of ``H + λI``.
      maxiter: iteration cap, an int >= 1, default ``min(10 d, 1000)`` (restarts included).
      preconditioner: callable ``[k, d] -> [k, d]`` approximating ``(H + λI)^{-1}`` (e.g. another iHVP,
        :func:`ifunc.jacobi_preconditioner` or :func:`ifunc.nystrom_preconditioner`). One built with
        ``damping=None`` is applied with this closure's λ (the rule's λ with ``damping=None``, and the new λ
        after ``with_damping``, at no cost: its sketch or diagonal is kept).
      curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
      blocks: ``"full"`` (default), ``"layer"`` or a mapping ``{parameter name: group}``.
      generator: label sampling for ``curvature="fisher"`` (default seeded with 0).

    Returns:
      :class:`IHVP` closure.

    Raises:
      ConvergenceError: (at call time) the tolerance was not met within ``maxiter`` for some right-hand
        sides; the message says how many of the ``k`` and the largest relative residual reached. The residual is
        the true one, ``(H + λI)x − v`` recomputed after the iterations (one more curvature product; CG restarts
        from ``x`` while that halves it, see :func:`cg_solve`): in float32 or bfloat16 the recursive residual
        can fall below ``tol`` while the true one cannot, and then the error names the dtype's floor and the fix
        (a looser ``tol``, more damping, or float64).
      ValueError: ``H + λI`` not positive definite, non-scalar loss, negative damping, ``damping=None`` with
        an estimated ``tr(H) <= 0`` (an indefinite Hessian: pass a damping).

    Example:
      >>> ihvp = ifunc.ihvp_cg(loss, params, loader, tol=1e-6)   # λ = 0.1 × mean eigenvalue
      >>> ihvp.damping                         # the λ it chose, a number
      >>> x = ihvp(torch.randn(8, ihvp.dim))   # 8 systems solved together

    References:
      Hestenes & Stiefel (1952); Martens (2010); Koh & Liang (2017).
    """
    maxiter = None if maxiter is None else check_count(maxiter, "maxiter", "ihvp_cg")
    op = data_operator(loss, params, data, curvature=curvature, generator=generator)
    signature = data_signature(data)  # CG keeps nothing computed from its data: a store records what it solves on
    if tol < 0 or atol < 0:
        raise ValueError(f"tol and atol must be >= 0, got tol={tol}, atol={atol}")
    groups = resolve_blocks(blocks, op.unflatten, device=op.flat_params.device)
    d = op.flat_params.numel()
    matvec = block_diagonal(op.matvec, groups, d)
    lam, rule = resolve_damping(
        damping, lambda: hutchinson_trace(op.matvec, d, like=op.flat_params, generator=generator), d, who="ihvp_cg"
    )

    def build(lam: float, rule=None) -> IHVP:
        lam = check_damping(lam)
        M = preconditioner
        redamp = getattr(M, "with_damping", None)
        if redamp is not None and getattr(M, "damping", 0.0) is None:
            M = redamp(lam)  # a preconditioner built with damping=None gets the λ of this system

        def solve(V: torch.Tensor) -> torch.Tensor:
            try:
                res = cg_solve(lambda P: matvec(P) + lam * P, V, tol=tol, atol=atol, maxiter=maxiter, preconditioner=M)
            except ValueError as err:
                if "not positive definite" not in str(err) or op.curvature == "hessian":
                    raise
                raise ValueError(  # a PSD curvature: the negative curvature is rounding, not the model's
                    f"ihvp_cg: the {op.curvature} curvature is PSD, but with damping {lam:g} a search direction met "
                    f"non-positive curvature ({err}) ({V.dtype}): H + λI is singular or lost to "
                    "rounding; use damping > 0 (or more), or compute in float64"
                ) from None
            rels = res.residual / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
            # a tol below the dtype's rounding is met by a column whose restarts stalled within FLOOR_EPS ε of it;
            # the rounding is the coarser of the solve's and the curvature products' (a half-precision model's)
            rounding = max((V.dtype, op.flat_params.dtype), key=lambda t: torch.finfo(t).eps)
            at_floor = (
                res.stalled & (rels <= FLOOR_EPS * torch.finfo(rounding).eps) if res.stalled is not None else False
            )
            ok = res.converged | at_floor
            if not bool(ok.all()):
                failed = int((~ok).sum())
                rel = rels[~ok].max()
                if res.stalled is not None and bool(res.stalled.any()):
                    raise ConvergenceError(
                        f"ihvp_cg: {failed} of {V.shape[0]} right-hand sides did not converge: the true relative "
                        f"residual ‖(H + λI)x − v‖/‖v‖ stalls at {float(rel):.3e} > tol={tol:g} (restarting CG from x "
                        f"no longer reduces it): {rounding} rounding cannot reach tol={tol:g} on this problem "
                        f"(damping {lam:g}). Use a looser tol (>= {2 * float(rel):.1e}), more damping, or float64 "
                        "(model.double() and float64 data)"
                    )
                raise ConvergenceError(
                    f"ihvp_cg: {failed} of {V.shape[0]} right-hand sides did not converge in "
                    f"{int(res.iterations.max())} iterations: relative residual {float(rel):.3e} > tol={tol:g}. "
                    f"Increase damping (now {lam:g}), maxiter, or tol, or pass a preconditioner"
                )
            return res.x

        return IHVP.make(
            solve,
            name="cg",
            damping=lam,
            unflatten=op.unflatten,
            like=op.flat_params,
            rebuild=build,
            info={
                "tol": tol,
                "atol": atol,
                "maxiter": maxiter,
                "curvature": op.curvature,
                "data": signature,
                "blocks": blocks_info("cg", groups),
            },
            rule=rule,
        )

    return build(lam, rule)
