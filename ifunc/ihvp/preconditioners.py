"""CG preconditioners as values: callables ``[k, d] -> [k, d]`` approximating ``(H + λI)^{-1}``.

Pass one to :func:`ifunc.ihvp_cg` (``preconditioner=``) or :func:`ifunc.cg_solve`. Both are built once
from products with the curvature and are then cheap and fixed (a preconditioner must not change between
CG iterations).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._errors import check_count
from ..curvature import CurvatureOperator
from ..likelihood import default_generator
from ._damping import check_damping
from .nystrom import nystrom_sketch

__all__ = ["jacobi_preconditioner", "nystrom_preconditioner", "JacobiPreconditioner", "NystromPreconditioner"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _undamped(who: str):
    return ValueError(
        f"{who} was built with damping=None: pass it to ifunc.ihvp_cg(..., preconditioner=...), which gives it the "
        "damping of the system it solves, or call .with_damping(λ) first"
    )


class JacobiPreconditioner(NamedTuple):
    """``V -> V / (diag(H) + λ)``; the diagonal is kept, so :meth:`with_damping` costs nothing."""

    diagonal: torch.Tensor  #: ``[d]``, the (estimated) ``diag(H)``
    damping: float | None  #: λ, or ``None`` until :func:`ifunc.ihvp_cg` (or :meth:`with_damping`) sets it

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.damping is None:
            raise _undamped("jacobi_preconditioner")
        return v / (self.diagonal.clamp_min(0) + self.damping).to(v.dtype)

    def with_damping(self, damping: float) -> JacobiPreconditioner:
        """The same diagonal with another λ (checked: ``diag(H) + λ`` must be positive)."""
        return _checked_jacobi(self.diagonal, check_damping(damping))


def _checked_jacobi(diagonal: torch.Tensor, lam: float | None) -> JacobiPreconditioner:
    if lam is not None:
        scale = diagonal.clamp_min(0) + lam
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError("jacobi_preconditioner: diag(H) + λ has zero or non-finite entries; use damping > 0")
    return JacobiPreconditioner(diagonal, lam)


class NystromPreconditioner(NamedTuple):
    """``V -> (λ̂_r + λ) U diag(1/(λ̂ + λ)) Uᵀ V + (V − U Uᵀ V)``; the sketch is kept, so re-damping is free."""

    eigenvectors: torch.Tensor  #: ``U [d, r]`` (float64, orthonormal columns)
    eigenvalues: torch.Tensor  #: ``λ̂ [r]`` (float64, descending)
    damping: float | None  #: λ, or ``None`` until :func:`ifunc.ihvp_cg` (or :meth:`with_damping`) sets it

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.damping is None:
            raise _undamped("nystrom_preconditioner")
        U, w, lam = self.eigenvectors, self.eigenvalues, self.damping
        top_scale = (w[-1] + lam) / (w + lam)  # [r]
        v64 = v.to(torch.float64)
        return (v64 + ((v64 @ U) * (top_scale - 1)) @ U.T).to(v.dtype)

    def with_damping(self, damping: float) -> NystromPreconditioner:
        """The same sketch for the system ``H + λI`` with another λ > 0."""
        return self._replace(damping=check_damping(damping, allow_zero=False))


def _operator(
    operator: CurvatureOperator | MatVec, dim: int | None, who: str, dtype=None
) -> tuple[MatVec, int, torch.Tensor]:
    """``(matvec, d, like)`` from a :class:`CurvatureOperator` or a plain ``matvec`` with ``dim``."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be a floating-point torch.dtype (e.g. torch.float64), got {dtype!r}")
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
    damping: float | None,
    probes: int | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 256,
) -> JacobiPreconditioner:
    """Diagonal (Jacobi) preconditioner ``V -> V / (diag(H) + λ)``.

    The diagonal is exact with ``probes=None`` (``d`` products with unit vectors, ``chunk`` at a time:
    small models only) or a Hutchinson estimate with ``probes = m`` Rademacher vectors ``z``:
    ``diag(H) ≈ (1/m) Σ_j z_j ⊙ H z_j`` (unbiased; one batched product of ``m`` vectors). Estimated
    entries <= 0 (noise, for a PSD ``H``) are replaced by the estimated mean diagonal ``tr(H)/d``.

    Args:
      operator: ``ifunc.curvature_operator(loss, params, data, ...)``, or a callable ``[k, d] -> [k, d]``
        with ``dim=d``.
      damping: λ of the system ``H + λI`` that CG solves (> 0 when a diagonal entry can be 0), or ``None``:
        :func:`ifunc.ihvp_cg` then applies it with its own λ (also the λ its ``damping=None`` rule picks).
      probes: number of Hutchinson probes; ``None`` for the exact diagonal.
      dim: ``d`` when ``operator`` is a plain callable.
      dtype: of the vectors passed to a plain callable (default: torch's default dtype).
      generator: draws the probes (default seeded with 0; the global RNG is never used).
      chunk: unit vectors per product for the exact diagonal.

    Returns:
      :class:`JacobiPreconditioner`, a callable ``[k, d] -> [k, d]`` (also ``[d] -> [d]``) with attributes
      ``diagonal`` (``[d]``, the estimated ``diag(H)``), ``damping`` and ``with_damping(λ)`` (free).

    Raises:
      TypeError, ValueError: ``probes`` or ``chunk`` not an int >= 1 (a bool or a float included), or
        ``diag(H) + λ`` has a non-positive entry (raise ``damping``).

    Example:
      >>> op = ifunc.curvature_operator(loss, params, data)
      >>> ihvp = ifunc.ihvp_cg(loss, params, data, damping=1e-3,
      ...                      preconditioner=ifunc.jacobi_preconditioner(op, damping=1e-3, probes=32))

    References:
      Bekas, Kokiopoulou & Saad (2007), "An estimator for the diagonal of a matrix".
    """
    lam = None if damping is None else check_damping(damping)
    probes = None if probes is None else check_count(probes, "probes", "jacobi_preconditioner")
    chunk = check_count(chunk, "chunk", "jacobi_preconditioner")
    matvec, d, like = _operator(operator, dim, "jacobi_preconditioner", dtype)
    if probes is None:
        diagonal = torch.empty(d, dtype=like.dtype, device=like.device)
        for start in range(0, d, chunk):
            stop = min(start + chunk, d)
            E = torch.zeros(stop - start, d, dtype=like.dtype, device=like.device)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1
            diagonal[start:stop] = (matvec(E) * E).sum(1)
    else:
        generator = generator if generator is not None else default_generator()
        Z = (2 * torch.randint(0, 2, (probes, d), generator=generator) - 1).to(like.dtype).to(like.device)
        diagonal = (Z * matvec(Z)).mean(0)
        # a PSD diagonal is >= 0: where noise drove the estimate to <= 0, fall back to the mean diagonal
        # trace / d (which Hutchinson estimates well)
        diagonal = torch.where(diagonal > 0, diagonal, diagonal.mean().clamp_min(0))
    if not bool(torch.isfinite(diagonal).all()):
        raise ValueError("jacobi_preconditioner: diag(H) + λ has zero or non-finite entries; use damping > 0")
    return _checked_jacobi(diagonal, lam)


def nystrom_preconditioner(
    operator: CurvatureOperator | MatVec,
    *,
    rank: int,
    damping: float | None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> NystromPreconditioner:
    """Randomized Nyström preconditioner for ``H + λI`` (Frangella, Tropp & Udell 2023).

    From the rank-``r`` Nyström approximation ``Ĥ = U diag(λ̂) Uᵀ`` (:func:`ifunc.nystrom_sketch`, one
    batched product of ``r`` vectors),

        ``P^{-1} v = (λ̂_r + λ) U diag(1/(λ̂ + λ)) Uᵀ v + (v − U Uᵀ v)``,

    which maps the top-``r`` eigen-directions of ``H + λI`` to roughly ``λ̂_r + λ`` and leaves the rest
    alone; with ``λ̂_r`` near the ``r``-th eigenvalue of ``H`` the preconditioned system has condition
    number about ``(λ_{r+1} + λ)/λ``. Choose ``r`` a little above the number of eigenvalues of ``H``
    larger than ``λ``. Costs ``O(k d r)`` per application.

    With ``k`` query gradients, a sketch of ``r ≈ k/2 .. k`` vectors costs less than one CG iteration on the
    ``[k, d]`` block; with a looser ``tol`` it is the fast setting for attribution (the documentation's
    benchmarks measure it)::

        op = ifunc.curvature_operator(loss, params, train)
        ihvp = ifunc.ihvp_cg(loss, params, train, tol=1e-2,
                             preconditioner=ifunc.nystrom_preconditioner(op, rank=100, damping=None))

    Args:
      operator: ``ifunc.curvature_operator(loss, params, data, ...)`` (PSD curvature), or a callable
        ``[k, d] -> [k, d]`` with ``dim=d``.
      rank: sketch size (1 <= rank <= d).
      damping: λ > 0 of the system ``H + λI`` that CG solves, or ``None``: :func:`ifunc.ihvp_cg` then
        applies it with its own λ (also the λ of its ``damping=None`` rule, and after ``with_damping``).
      dim: ``d`` when ``operator`` is a plain callable.
      dtype: of the vectors passed to a plain callable (default: torch's default dtype).
      generator: draws the sketch (default seeded with 0; the global RNG is never used).

    Returns:
      :class:`NystromPreconditioner`, a callable ``[k, d] -> [k, d]`` (also ``[d] -> [d]``), with attributes
      ``eigenvalues`` (``λ̂``), ``eigenvectors`` (``U``), ``damping`` and ``with_damping(λ)`` (free: the
      sketch is kept).

    Raises:
      TypeError, ValueError: ``rank`` not an int in [1, d] (a bool or a float included), damping <= 0, or the
        operator is not PSD.

    References:
      Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl.
    """
    lam = None if damping is None else check_damping(damping, allow_zero=False)
    matvec, d, like = _operator(operator, dim, "nystrom_preconditioner", dtype)
    rank = check_count(rank, "rank", "nystrom_preconditioner")
    if rank > d:
        raise ValueError(f"nystrom_preconditioner: rank must be an integer in [1, d={d}], got {rank!r}")
    generator = generator if generator is not None else default_generator()
    U, w = nystrom_sketch(
        matvec, d, rank, generator=generator, dtype=like.dtype, device=like.device, name="nystrom_preconditioner"
    )
    return NystromPreconditioner(U, w, lam)
