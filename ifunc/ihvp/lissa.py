"""LiSSA: the truncated Neumann series for ``(H + λI)^{-1} v`` (Agarwal et al. 2017), checked for convergence.

The scale and depth come from :mod:`._lissa_schedule`, the curvature of each step from :mod:`._lissa_steps`.
"""

from __future__ import annotations

import math

import torch

from .._errors import check_count
from .._types import Data, LossFn, Params
from ..likelihood import default_generator
from ._base import IHVP, ConvergenceError
from ._blocks import Blocks, block_diagonal, blocks_info, resolve_blocks
from ._damping import check_damping, hutchinson_trace, resolve_damping
from ._lissa_schedule import MAX_DEFAULT_DEPTH, LissaDivergenceError, schedule, top_eigenvalue
from ._lissa_steps import fresh, step_operators
from ._operator import data_operator, data_signature
from ._scorer import solve_dtype

__all__ = ["ihvp_lissa", "LissaDivergenceError", "DEFAULT_TOL", "MAX_DEFAULT_DEPTH"]

#: Default ``tol``: the relative residual ``‖(H + λI)x − v‖ / ‖v‖`` every call must reach (else it raises).
DEFAULT_TOL = 1e-2


def ihvp_lissa(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    damping: float | None = None,
    scale: float | None = None,
    depth: int | None = None,
    tol: float | None = DEFAULT_TOL,
    repeat: int = 1,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    curvature: str | None = None,
    blocks: Blocks = "full",
) -> IHVP:
    """``v -> (H + λI)^{-1} v`` by the LiSSA recursion, with a convergence check on every call.

    With ``x_0 = v`` and ``H_j`` the mean curvature of the ``j``-th step (all of ``data`` by default),
    ``x_j = v + (1 − λ/s) x_{j−1} − H_j x_{j−1} / s``; the estimate is ``x_depth / s``, averaged over ``repeat``
    runs. With full-data steps it is the truncated Neumann sum ``(1/s) Σ_{j<=depth} (I − (H + λI)/s)^j v``,
    whose residual is exactly ``(I − (H + λI)/s)^(depth+1) v``: every eigen-direction of error and residual
    shrinks by ``1 − a/s`` per step (``a`` an eigenvalue of ``H + λI``), so both are at most
    ``ρ^(depth+1)`` of their start with ``ρ = max(1 − λ/s, (λ_max + λ)/s − 1)``; the flattest direction sets
    the pace, ``depth ≈ (s/λ) ln(1/tol)`` steps. The recursion grows when ``s <= (λ_max + λ)/2``.

    What is checked, so that a call returns an answer within ``tol`` or raises:

    - at build time (and by ``with_damping``): ``λ_max`` is estimated (30 power iterations on all of ``data``)
      and a ``scale`` at or below ``(λ_max + λ)/2`` raises :class:`LissaDivergenceError` at any ``depth``;
      ``depth=None`` is the fewest steps with ``ρ^(depth+1) <= tol``, refused (``ConvergenceError``) above
      :data:`MAX_DEFAULT_DEPTH` (10,000) steps, naming the depth it needs.
    - on every call: NaN/inf or growing iterates raise :class:`LissaDivergenceError` (with full-data steps
      ``‖x_j − x_{j−1}‖ = ‖M^j v‖`` is log-convex in ``j``, so a last update larger than the first, or than
      ``‖v‖`` at ``depth=1``, proves growth); then the relative residual ``‖(H + λI)x − v‖ / ‖v‖`` of every
      right-hand side is measured on all of ``data`` (one more curvature product of the ``[k, d]`` block) and
      above ``tol`` raises ``ConvergenceError`` with the residual reached and what to change. ``tol=None``
      skips this check (a fixed-``depth`` estimate, no extra product; ``depth`` is then required).

    Mini-batch steps (``batch_size``) make each step cheaper but leave noise that the recursion does not
    average out, of order ``‖H_j − H‖ ‖x‖ / s``: their residual rarely reaches ``1e-2`` at small damping, so
    they usually need ``tol=None`` (an unchecked stochastic estimate) or a larger ``repeat``/``batch_size``.

    With ``blocks="layer"`` (or a mapping) every ``H_j`` is replaced by its block diagonal
    ``Σ_b P_b H_j P_b`` (cross-block curvature dropped): the recursion runs in each block on shared steps,
    ``λ_max`` and the residual are those of the block diagonal.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader; ``H`` is the curvature of the mean loss over it.
      damping: λ > 0 (keyword-only, like every argument here), or ``None`` (default) for
        ``λ = 0.1 × the mean eigenvalue = 0.1 · tr(H) / d``, with ``tr(H)`` from a Hutchinson estimate (20
        Rademacher probes in one batched product, exact when ``d <= 20``) drawn from a generator seeded from
        ``generator`` without advancing it. The λ used is ``ihvp.damping``.
      scale: s > (λ_max + λ)/2; default ``1.5 (λ_max + λ)`` (then ``ρ = 1 − λ/s``), re-derived by ``with_damping``.
      depth: recursion steps, an int >= 1; default ``None`` = the fewest that reach ``tol`` (see above),
        re-derived by ``with_damping``. ``info["depth"]`` holds the one used.
      tol: the relative residual every right-hand side must reach, in (0, 1); default :data:`DEFAULT_TOL`
        (1e-2, the level at which CG keeps rankings, see :func:`ifunc.ihvp_cg`). ``None``: no check. A
        half-precision model (its curvature products rounded to bfloat16 / float16, the recursion in float32) meets
        any ``tol`` at ``4 ε`` of its dtype (bfloat16: 0.031, float16: 0.0039), the residual its products can show.
        It bounds the RESIDUAL ``‖(H + λI)x − v‖/‖v‖`` (as for CG), not the error of ``x``: that can be larger by
        up to the condition number of ``H + λI`` (a ``v`` with a small part along the flat directions). With
        ``curvature="hessian"`` the default ``depth`` assumes the smallest eigenvalue of ``H + λI`` is about λ
        (a PSD ``H``); negative curvature makes it smaller and the residual check is what catches the difference.
      repeat: runs averaged, an int >= 1; only mini-batch runs differ, so with all of the data every step
        ``repeat > 1`` is refused (``ValueError``). From a DataLoader or Dataset, run ``r`` starts at batch
        ``⌊r c / repeat⌋`` of the ``c = ⌈n / b⌉`` consecutive batches, and ``repeat > c`` is refused.
      batch_size: ``None`` (default): all of ``data`` every step. An int ``b < n``: ``b`` examples per step,
        drawn uniformly with replacement with ``generator`` from in-memory data (a batch or a list of batches);
        from a DataLoader or Dataset, its examples in order are re-cut into consecutive batches of ``b``
        examples (whatever the loader's own batch size), cycled (a shuffling DataLoader is refused: the
        closure would change on every call). ``b >= n`` means all of the data.
      generator: drives mini-batches, the power iteration and true-Fisher labels; its state at build time is
        replayed on every call, so the closure is deterministic. ``None`` = seeded with 0; the global RNG is
        never used.
      curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
      blocks: ``"full"`` (default), ``"layer"`` or a mapping ``{parameter name: group}``.

    Returns:
      :class:`IHVP` closure with ``info["scale"]``, ``info["depth"]``, ``info["tol"]``, ``info["lambda_max"]``
      (the estimate) and ``info["contraction"]`` (ρ).

    Raises:
      LissaDivergenceError: (build or call) the scale is too small, or the iterates grew or became NaN/inf.
      ConvergenceError: (call) a residual above ``tol``; (build) ``depth=None`` would need more than
        :data:`MAX_DEFAULT_DEPTH` steps.
      TypeError, ValueError: a damping <= 0, a scale <= 0, ``depth``/``repeat``/``batch_size`` not an int >= 1
        (a bool or a float included), ``tol`` outside (0, 1), ``tol=None`` without ``depth``, ``damping=None``
        with an estimated ``tr(H) <= 0`` (an indefinite Hessian: pass a damping), ``repeat > 1`` with full-data
        steps or more runs than a streamed data set has distinct ones, or mini-batch steps from a shuffling
        DataLoader.

    Example:
      >>> ihvp = ifunc.ihvp_lissa(loss, params, train, damping=0.1)   # depth chosen for tol=1e-2
      >>> x = ihvp(v)                                                   # or ConvergenceError, never silently off

    References:
      Agarwal, Bullins & Hazan (2017); Koh & Liang (2017).
    """
    who = "ihvp_lissa"
    if damping is not None:
        check_damping(damping, allow_zero=False)
    if scale is not None:
        try:
            value = float(scale) if not isinstance(scale, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{who}: scale must be a finite number > 0 (or None for 1.5 (λ_max + λ)), got {scale!r}")
        scale = value
    depth = None if depth is None else check_count(depth, "depth", who)
    repeat = check_count(repeat, "repeat", who)
    batch_size = None if batch_size is None else check_count(batch_size, "batch_size", who)
    if tol is None and depth is None:
        raise ValueError(f"{who}: tol=None (no convergence check) needs an explicit depth=; or keep a tol")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"{who}: tol must be in (0, 1) (a relative residual), or None for no check; got {tol!r}")
    state = (generator if generator is not None else default_generator()).get_state()
    full = data_operator(loss, params, data, curvature=curvature, generator=fresh(state))
    signature = data_signature(data)  # recorded by score stores: LiSSA keeps nothing computed from its data
    like = full.flat_params
    d = like.numel()
    groups = resolve_blocks(blocks, full.unflatten, device=like.device)
    lam0, rule0 = resolve_damping(
        damping, lambda: hutchinson_trace(full.matvec, d, like=like, generator=generator), d, who=who, allow_zero=False
    )

    def block_op(matvec):
        return block_diagonal(matvec, groups, d)

    operator = block_op(full.matvec)  # the curvature the residual is measured on
    top = top_eigenvalue(operator, d, like, fresh(state))
    full_steps, step_operator = step_operators(
        loss, data, full, operator, block_op, batch_size=batch_size, repeat=repeat, who=who
    )

    # a half-precision model's curvature products are rounded to its dtype, coarser than the float32 solve: the
    # residual they measure cannot fall below a few of its units, so a tol below 4 ε of the model's dtype is met there
    products_eps = torch.finfo(like.dtype).eps
    floor = 4 * products_eps if products_eps > torch.finfo(solve_dtype(like.dtype)).eps else 0.0

    def build(lam: float, rule=None) -> IHVP:
        lam = check_damping(lam, allow_zero=False)
        reach = None if tol is None else max(tol, floor)  # the depth to reach what the products can show
        s, rho, needed, steps = schedule(lam, top, scale=scale, depth=depth, tol=reach, who=who)
        # full-data updates ‖M^j v‖ are log-convex in j (1.01: rounding); mini-batch ones are noisy (a heuristic)
        growth = 1.01 if full_steps else 10.0
        scale_is = f"scale={s:g}" if scale is not None else f"the default scale 1.5 (λ_max + λ) = {s:.3e}"

        def diverged(detail: str) -> LissaDivergenceError:
            cure = "a larger scale=" if full_steps else "a larger scale= or batch_size= (a mini-batch can curve more)"
            indefinite = (
                ", or H + λI is not positive definite (a Hessian with negative curvature: a larger damping, or "
                'curvature="ggn")'
                if full.curvature == "hessian"
                else ""
            )
            return LissaDivergenceError(
                f"{who} diverged: {detail}; {scale_is} is too small for the curvature met by the steps "
                f"(λ_max(H) ≈ {top:.3e}, damping {lam:g}){indefinite}: use {cure}, or ihvp_cg"
            )

        watch = full_steps or tol is None  # stop a growing recursion early (with mini-batches and a tol: at the end)

        def run(V: torch.Tensor, gen: torch.Generator, index: int) -> tuple[torch.Tensor, float]:
            ops = step_operator(gen, index)
            eps, tiny = 100 * max(torch.finfo(V.dtype).eps, products_eps), torch.finfo(V.dtype).tiny
            x, first, ratio = V.clone(), V.norm(dim=1), 0.0
            for j in range(steps):
                new = V + (1 - lam / s) * x - next(ops)(x) / s
                update = (new - x).norm(dim=1)
                x = new
                if not torch.isfinite(x).all():
                    raise diverged(f"the iterates reached NaN/inf after {j + 1} steps")
                if j == 0 and steps > 1:
                    first = update  # later updates are compared with M v (with v itself at depth 1)
                    continue
                above_rounding = update > eps * x.norm(dim=1)
                ratio = float(torch.where(above_rounding, update / first.clamp_min(tiny), 0).max())
                if watch and ratio > growth:
                    raise diverged(f"after {j + 1} steps the last update is {ratio:.3g} times the first (growing)")
            return x, ratio

        def solve(V: torch.Tensor) -> torch.Tensor:
            if V.shape[0] == 0:
                return V.clone()
            total = torch.zeros_like(V)
            gen = fresh(state)  # every call replays the same draws: the closure is deterministic
            ratio = 0.0
            for index in range(repeat):
                x, r = run(V, gen, index)
                ratio = max(ratio, r)
                total += x / s
            X = total / repeat
            if tol is None:
                return X
            residual = (V - operator(X) - lam * X).norm(dim=1) / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
            worst = float(residual.max())
            if worst <= max(tol, floor):
                return X
            if ratio > growth or (full_steps and worst > 1):
                raise diverged(f"relative residual {worst:.3e} after {steps} steps, growing")
            failed = int((residual > tol).sum())
            raise ConvergenceError(f"{who} did not converge: " + advice(worst, failed, V.shape[0]))

        def advice(worst: float, failed: int, k: int) -> str:
            head = (
                f"{failed} of {k} right-hand sides have relative residual ‖(H + λI)x − v‖/‖v‖ up to "
                f"{worst:.3e} > tol={tol:g} after {steps} steps (damping {lam:g}, {scale_is}). "
            )
            if not full_steps:
                return head + (
                    f"The steps use mini-batches of {batch_size} examples, whose noise the recursion keeps: use "
                    "batch_size=None (all the data every step: the exact truncated Neumann sum), a larger batch_size "
                    "or repeat, a larger damping, or tol=None to accept the stochastic estimate; or use ihvp_cg"
                )
            if needed is not None and steps < needed:
                return head + (
                    f"The flattest direction shrinks by 1 − λ/s = {1 - lam / s:.6f} per step: pass depth >= {needed} "
                    "(or leave depth=None), a larger damping, or use ihvp_cg (about √(s/λ) iterations)"
                )
            return head + (
                "More steps were run than a PSD curvature needs: H + λI is likely not positive definite (a Hessian "
                'with negative curvature: use curvature="ggn" or a larger damping), λ_max was underestimated '
                f"(pass a larger scale=), or tol is below the rounding of {like.dtype} (use float64 or a larger tol); "
                "or use ihvp_cg"
            )

        return IHVP.make(
            solve,
            name="lissa",
            damping=lam,
            unflatten=full.unflatten,
            like=like,
            rebuild=build,
            info={
                "scale": s,
                "depth": steps,
                "tol": tol,
                "repeat": repeat,
                "batch_size": None if full_steps else batch_size,  # the one used: None = all of the data
                "lambda_max": top,
                "contraction": rho,
                "curvature": full.curvature,
                "data": signature,
                "blocks": blocks_info("lissa", groups),
            },
            rule=rule,
        )

    return build(lam0, rule0)
