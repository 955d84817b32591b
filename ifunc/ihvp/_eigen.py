"""Inverse through an eigendecomposition: shared by the explicit and Arnoldi methods."""

from __future__ import annotations

import torch


def check_positive(eigenvalues: torch.Tensor, damping: float, name: str) -> None:
    smallest = float((eigenvalues + damping).min())
    if not smallest > 0:
        raise ValueError(
            f"{name}: H + λI is not positive definite (smallest eigenvalue of H + λI is {smallest:.3e}); "
            f'raise damping above {-float(eigenvalues.min()):.3e}, or use curvature="ggn" (PSD)'
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
