"""LiSSA's scale and depth: how fast the recursion contracts, and how many steps reach a tolerance.

A full-data LiSSA step maps the error ``e`` of ``x`` to ``(I − (H + λI)/s) e``: the eigen-direction of an
eigenvalue ``a`` of ``H + λI`` shrinks by ``|1 − a/s|``. Over ``a ∈ [λ, λ_max + λ]`` (a PSD ``H``) the worst
factor is the contraction ``ρ``; the recursion grows when ``s <= (λ_max + λ)/2`` (``ρ >= 1`` at the top).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._base import ConvergenceError

__all__ = ["MAX_DEFAULT_DEPTH", "LissaDivergenceError", "Schedule", "contraction", "depth_for", "schedule"]

#: The most steps ``depth=None`` may choose; a damping that needs more is refused when the closure is built.
MAX_DEFAULT_DEPTH = 10_000


class LissaDivergenceError(ConvergenceError):
    """The LiSSA recursion grows instead of settling: ``scale`` is below ``(λ_max(H) + λ) / 2``."""


def top_eigenvalue(matvec, d: int, like: torch.Tensor, generator: torch.Generator, iters: int = 30) -> float:
    """``λ_max`` of a PSD operator, estimated by ``iters`` power iterations from a random start ``[1, d]``."""
    v = torch.randn(1, d, generator=generator, dtype=like.dtype).to(like.device)
    v /= v.norm()
    value = 0.0
    for _ in range(iters):
        w = matvec(v)
        value = float(w.norm())
        if value == 0:
            return 0.0
        v = w / value
    return value


def contraction(damping: float, scale: float, top: float) -> float:
    """``ρ = max |1 − a/s|`` over the eigenvalues ``a ∈ [λ, λ_max + λ]`` of ``H + λI`` (PSD ``H``).

    A full-data step multiplies the error (and the residual) of every eigen-direction by ``1 − a/s``, so
    after ``depth`` steps both are at most ``ρ^(depth+1)`` times their starting size.
    """
    return max(abs(1 - damping / scale), abs(1 - (top + damping) / scale))


def depth_for(tol: float, rho: float) -> int:
    """The fewest steps with ``ρ^(depth+1) <= tol`` (at least 1); ``ρ ≈ 1 − λ/s`` gives ``≈ (s/λ) ln(1/tol)``."""
    if rho <= 0:
        return 1
    if rho >= 1:  # 1 − λ/s rounded to 1 (s/λ beyond 1e16): no number of steps is enough
        return 2**62
    return max(1, math.ceil(math.log(tol) / math.log(rho)) - 1)


class Schedule(NamedTuple):
    """The scale ``s``, contraction ``ρ``, steps ``tol`` needs (None without a ``tol``) and steps run."""

    scale: float
    contraction: float
    needed: int | None
    steps: int


def schedule(lam: float, top: float, *, scale: float | None, depth: int | None, tol: float | None, who: str):
    """The :class:`Schedule` at damping ``lam`` and ``λ_max ≈ top``: ``s = scale`` or ``1.5 (top + λ)``, and
    ``depth`` or the fewest steps reaching ``tol`` (``depth`` or ``tol`` must be given).

    Raises:
      LissaDivergenceError: ``s <= (top + λ)/2``: the recursion would grow at every depth.
      ConvergenceError: ``depth=None`` would need more than :data:`MAX_DEFAULT_DEPTH` steps.
    """
    s = 1.5 * (top + lam) if scale is None else float(scale)
    if not s > (top + lam) / 2:  # only a given scale can fail: the default has a factor 3 of margin
        raise LissaDivergenceError(
            f"{who} would have diverged: scale={s:g} is too small for damping {lam:g}: the largest eigenvalue of "
            f"(H + λI)/scale is about {(top + lam) / s:.4g} >= 2 (λ_max(H) ≈ {top:.3e} from 30 power iterations), "
            f"so the recursion grows at every depth; pass scale > (λ_max(H) + λ)/2 ≈ {(top + lam) / 2:.3e}, e.g. "
            f"{1.5 * (top + lam):.3e}, or leave scale=None"
        )
    rho = contraction(lam, s, top)
    needed = depth_for(tol, rho) if tol is not None else None
    steps = depth if depth is not None else needed
    if steps is None:
        raise ValueError(f"{who}: tol=None (no convergence check) needs an explicit depth=; or keep a tol")
    if depth is None and steps > MAX_DEFAULT_DEPTH:
        raise ConvergenceError(
            f"{who}: reaching tol={tol:g} at damping {lam:g} needs about {steps} steps (the flattest direction "
            f"shrinks by 1 − λ/s = {1 - lam / s:.6f} per step, s = {s:.3e}), more than the {MAX_DEFAULT_DEPTH} "
            f"that depth=None allows. Use ihvp_cg (about √(s/λ) iterations instead of s/λ), a larger damping, "
            f"or pass depth={steps} to run them"
        )
    return Schedule(s, rho, needed, steps)
