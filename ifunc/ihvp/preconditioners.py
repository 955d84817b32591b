"""CG preconditioners as values: callables ``[k, d] -> [k, d]`` approximating ``(H + λI)^{-1}``.

Pass one to :func:`ifunc.ihvp_cg` (``preconditioner=``) or :func:`ifunc.cg_solve`. Both are built once
from products with the curvature and are then cheap and fixed (a preconditioner must not change between
CG iterations).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..curvature import CurvatureOperator
from ..likelihood import default_generator
from ._base import check_damping
from .nystrom import nystrom_sketch

__all__ = ["jacobi_preconditioner", "nystrom_preconditioner"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _operator(
    operator: CurvatureOperator | MatVec, dim: int | None, who: str, dtype=None
) -> tuple[MatVec, int, torch.Tensor]:
    """``(matvec, d, like)`` from a :class:`CurvatureOperator` or a plain ``matvec`` with ``dim``."""
    if isinstance(operator, CurvatureOperator):
        return operator.matvec, operator.flat_params.numel(), operator.flat_params
    if not callable(operator):
        raise TypeError(
            f"{who}: operator must be an ifunc.curvature_operator(...) or a callable "
            f"[k, d] -> [k, d], got {type(operator).__name__}"
        )
    if dim is None or int(dim) < 1:
        raise ValueError(f"{who}: a plain matvec needs dim=d (the number of parameters), got dim={dim}")
    return operator, int(dim), torch.zeros((), dtype=dtype or torch.get_default_dtype())


def jacobi_preconditioner(
    operator: CurvatureOperator | MatVec,
    *,
    damping: float,
    probes: int | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 256,
) -> MatVec:
    """Diagonal (Jacobi) preconditioner ``V -> V / (diag(H) + λ)``.

    The diagonal is exact with ``probes=None`` (``d`` products with unit vectors, ``chunk`` at a time:
    small models only) or a Hutchinson estimate with ``probes = m`` Rademacher vectors ``z``:
    ``diag(H) ≈ (1/m) Σ_j z_j ⊙ H z_j`` (unbiased; one batched product of ``m`` vectors). Estimated
    entries <= 0 (noise, for a PSD ``H``) are replaced by the estimated mean diagonal ``tr(H)/d``.

    Args:
      operator: ``ifunc.curvature_operator(loss, params, data, ...)``, or a callable ``[k, d] -> [k, d]``
        with ``dim=d``.
      damping: λ of the system ``H + λI`` that CG solves (> 0 when a diagonal entry can be 0).
      probes: number of Hutchinson probes; ``None`` for the exact diagonal.
      dim: ``d`` when ``operator`` is a plain callable.
      dtype: of the vectors passed to a plain callable (default: torch's default dtype).
      generator: draws the probes (default seeded with 0; the global RNG is never used).
      chunk: unit vectors per product for the exact diagonal.

    Returns:
      A callable ``[k, d] -> [k, d]`` (also ``[d] -> [d]``) with attribute ``diagonal`` (``[d]``, the
      estimated ``diag(H)``).

    Raises:
      ValueError: ``probes < 1``, or ``diag(H) + λ`` has a non-positive entry (raise ``damping``).

    Example:
      >>> op = ifunc.curvature_operator(loss, params, data)
      >>> ihvp = ifunc.ihvp_cg(loss, params, data, damping=1e-3,
      ...                      preconditioner=ifunc.jacobi_preconditioner(op, damping=1e-3, probes=32))

    References:
      Bekas, Kokiopoulou & Saad (2007), "An estimator for the diagonal of a matrix".
    """
    lam = check_damping(damping)
    matvec, d, like = _operator(operator, dim, "jacobi_preconditioner", dtype)
    if probes is None:
        diagonal = torch.empty(d, dtype=like.dtype, device=like.device)
        for start in range(0, d, chunk):
            stop = min(start + chunk, d)
            E = torch.zeros(stop - start, d, dtype=like.dtype, device=like.device)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1
            diagonal[start:stop] = (matvec(E) * E).sum(1)
    else:
        if int(probes) < 1:
            raise ValueError(f"jacobi_preconditioner: probes must be >= 1 (or None for exact), got {probes}")
        generator = generator if generator is not None else default_generator()
        Z = (2 * torch.randint(0, 2, (int(probes), d), generator=generator) - 1).to(like.dtype).to(like.device)
        diagonal = (Z * matvec(Z)).mean(0)
        # a PSD diagonal is >= 0: where noise drove the estimate to <= 0, fall back to the mean diagonal
        # trace / d (which Hutchinson estimates well)
        diagonal = torch.where(diagonal > 0, diagonal, diagonal.mean().clamp_min(0))
    scale = diagonal.clamp_min(0) + lam
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise ValueError("jacobi_preconditioner: diag(H) + λ has zero or non-finite entries; use damping > 0")
    inverse = 1.0 / scale

    def precondition(V: torch.Tensor) -> torch.Tensor:
        return V * inverse.to(V.dtype)

    precondition.diagonal = diagonal
    return precondition


def nystrom_preconditioner(
    operator: CurvatureOperator | MatVec,
    *,
    rank: int,
    damping: float,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> MatVec:
    """Randomized Nyström preconditioner for ``H + λI`` (Frangella, Tropp & Udell 2023).

    From the rank-``r`` Nyström approximation ``Ĥ = U diag(λ̂) Uᵀ`` (:func:`ifunc.nystrom_sketch`, one
    batched product of ``r`` vectors),

        ``P^{-1} v = (λ̂_r + λ) U diag(1/(λ̂ + λ)) Uᵀ v + (v − U Uᵀ v)``,

    which maps the top-``r`` eigen-directions of ``H + λI`` to roughly ``λ̂_r + λ`` and leaves the rest
    alone; with ``λ̂_r`` near the ``r``-th eigenvalue of ``H`` the preconditioned system has condition
    number about ``(λ_{r+1} + λ)/λ``. Choose ``r`` a little above the number of eigenvalues of ``H``
    larger than ``λ``. Costs ``O(k d r)`` per application.

    Args:
      operator: ``ifunc.curvature_operator(loss, params, data, ...)`` (PSD curvature), or a callable
        ``[k, d] -> [k, d]`` with ``dim=d``.
      rank: sketch size (1 <= rank <= d).
      damping: λ > 0 of the system ``H + λI`` that CG solves.
      dim: ``d`` when ``operator`` is a plain callable.
      dtype: of the vectors passed to a plain callable (default: torch's default dtype).
      generator: draws the sketch (default seeded with 0; the global RNG is never used).

    Returns:
      A callable ``[k, d] -> [k, d]`` (also ``[d] -> [d]``), with attributes ``eigenvalues`` (``λ̂``) and
      ``eigenvectors`` (``U``).

    Raises:
      ValueError: rank out of range, damping <= 0, or the operator is not PSD.

    References:
      Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl.
    """
    lam = check_damping(damping, allow_zero=False)
    matvec, d, like = _operator(operator, dim, "nystrom_preconditioner", dtype)
    if not isinstance(rank, int) or not 1 <= rank <= d:
        raise ValueError(f"nystrom_preconditioner: rank must be an integer in [1, d={d}], got {rank!r}")
    generator = generator if generator is not None else default_generator()
    U, w = nystrom_sketch(
        matvec, d, rank, generator=generator, dtype=like.dtype, device=like.device, name="nystrom_preconditioner"
    )
    top_scale = (w[-1] + lam) / (w + lam)  # [r]

    def precondition(V: torch.Tensor) -> torch.Tensor:
        V64 = V.to(torch.float64)
        coeff = V64 @ U
        return (V64 + (coeff * (top_scale - 1)) @ U.T).to(V.dtype)

    precondition.eigenvalues = w
    precondition.eigenvectors = U
    return precondition
