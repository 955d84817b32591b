"""Inverse through an eigendecomposition: shared by the explicit and Arnoldi methods."""

from __future__ import annotations

import warnings

import torch


def check_positive(eigenvalues: torch.Tensor, damping: float, name: str) -> None:
    smallest = float((eigenvalues + damping).min())
    if not smallest > 0:
        raise ValueError(
            f"{name}: H + λI is not positive definite (smallest eigenvalue of H + λI is {smallest:.3e}); "
            f'raise damping above {-float(eigenvalues.min()):.3e}, or use curvature="ggn" (PSD)'
        )


def check_conditioning(eigenvalues: torch.Tensor, damping: float, name: str, dtype: torch.dtype) -> None:
    """Refuse ``damping = 0`` on a numerically singular curvature, warn when ``dtype`` cannot solve it accurately.

    ``c = (λ_max + λ) / (λ_min + λ)`` against ``1 / (100 eps)`` of the parameters' dtype (the precision the
    curvature products were computed in): beyond it the inverse is dominated by rounding.
    """
    if not eigenvalues.numel():
        return
    low, high = float(eigenvalues.min()) + damping, float(eigenvalues.max()) + damping
    limit = 1.0 / (100 * torch.finfo(dtype).eps)
    if low > 0 and high / low < limit:
        return
    if damping == 0:
        raise ValueError(
            f"{name}: the curvature is numerically singular at damping 0 (eigenvalues from {low:.3e} to {high:.3e} "
            f"in {dtype}): its inverse is rounding noise; use damping > 0 (damping=None picks 0.1 × the mean "
            "eigenvalue)"
        )
    warnings.warn(
        f"{name}: damped condition number {high / max(low, 1e-300):.3e} is beyond what {dtype} solves accurately; "
        "use float64 or raise damping",
        stacklevel=4,
    )


def eigen_solve(
    Q: torch.Tensor, w: torch.Tensor, damping: float, V: torch.Tensor, complement: bool = False
) -> torch.Tensor:
    """``(Q diag(w) Qᵀ + λI)^{-1} V`` for ``Q [d, r]`` orthonormal columns; ``V [k, d]``.

    With ``complement=True`` (r < d) directions orthogonal to ``Q`` are scaled by ``1/λ``.
    """
    V64 = V.to(Q.dtype)
    coeff = V64 @ Q  # [k, r]
    out = (coeff / (w + damping)) @ Q.T
    if complement:
        out = out + (V64 - coeff @ Q.T) / damping
    return out.to(V.dtype)
