"""Inverse through an eigendecomposition: shared by the explicit, Arnoldi and Nyström methods.

Whether the damped inverse can be trusted is checked by :func:`ifunc.ihvp._damping.check_conditioning`.
"""

from __future__ import annotations

import torch

__all__ = ["eigen_solve"]


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
