"""The recursion of block conjugate gradients, on the still-active right-hand sides, in place.

:func:`ifunc.cg_solve` runs it, then checks the true residual and restarts from ``x`` where needed.
"""

from __future__ import annotations

import torch

__all__ = ["iterate", "rowdot"]


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[m]``: the inner product ``⟨a_i, b_i⟩`` of each row of ``a, b [m, d]``."""
    return (a * b).sum(dim=1)


def iterate(matvec, M, X, R, threshold, active, iterations, budget: int) -> int:
    """At most ``budget`` steps of (preconditioned) CG for ``A X = B``, in place; returns the steps run.

    Starts from ``X [k, d]`` with residual ``R = B − A X`` and search directions ``P = M R``. Each step updates
    the ``active`` rows (``[k]`` bool) only, with one ``matvec`` of those rows: ``α = ⟨r, z⟩ / ⟨p, A p⟩``,
    ``x += α p``, ``r −= α A p``, ``z = M r``, ``p = z + (⟨r, z⟩_new / ⟨r, z⟩) p``. A row stops when
    ``‖r‖ <= threshold`` (``[k]``) or ``⟨r, z⟩`` underflows to 0; ``iterations`` (``[k]``) counts its steps.

    Raises:
      ValueError: ``⟨p, A p⟩ <= 0`` (``A`` not positive definite along ``p``) or NaN/inf in a product.
    """
    Z = M(R)
    P = Z.clone()
    rz = rowdot(R, Z)
    for step in range(budget):
        if not bool(active.any()):
            return step
        idx = active.nonzero().squeeze(1)
        exact = rz[idx] == 0  # the recursive residual underflowed to zero: nothing left to do for that column
        if bool(exact.any()):
            active[idx[exact]] = False
            idx = idx[~exact]
            if idx.numel() == 0:
                return step
        p = P[idx]
        Ap = matvec(p)
        pAp = rowdot(p, Ap)
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
        rz_new = rowdot(r, z)
        beta = rz_new / rz[idx]
        P[idx] = z + beta[:, None] * p
        rz[idx] = rz_new
        iterations[idx] += 1
        active[idx] = r.norm(dim=1) > threshold[idx]
    return budget
