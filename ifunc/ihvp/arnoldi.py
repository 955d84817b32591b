"""Low-rank iHVP from the top eigenpairs of H found by Lanczos iteration (Schioppa et al. 2022)."""

from __future__ import annotations

import torch

from .._errors import check_count
from .._types import Data, LossFn, Params
from ..likelihood import default_generator
from ._base import IHVP
from ._blocks import Blocks, EigenFactor, eigen_blocks_ihvp, resolve_blocks, restrict
from ._damping import hutchinson_trace, resolve_damping, trace_beyond
from ._operator import data_operator

__all__ = ["ihvp_arnoldi", "lanczos"]


def lanczos(
    matvec, d: int, steps: int, *, dtype=torch.float64, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric operator from ``steps`` Lanczos iterations with full re-orthogonalisation.

    The Krylov basis is kept in float64 and re-orthogonalised twice against all previous vectors at each
    step. When the Krylov space becomes invariant before ``steps`` (β ≈ 0), the iteration restarts from a
    fresh random vector orthogonal to the basis, so ``steps = d`` recovers the full spectrum.

    Args:
      matvec: ``[1, d] -> [1, d]`` product with the symmetric operator (in any float dtype).
      d: dimension. steps: Krylov dimension, an int >= 1 (capped at ``d``).
      generator: for the random starting vectors.

    Returns:
      ``(eigenvalues [steps], eigenvectors [d, steps])`` (Ritz pairs, ascending), float64.

    Raises:
      TypeError, ValueError: ``d`` or ``steps`` not an int >= 1 (a bool or a float included).
    """
    d = check_count(d, "d", "lanczos")
    steps = min(check_count(steps, "steps", "lanczos"), d)
    basis = torch.zeros(steps, d, dtype=torch.float64, device=device)
    alphas = torch.zeros(steps, dtype=torch.float64)
    betas = torch.zeros(steps, dtype=torch.float64)

    def random_orthogonal(j):
        for _ in range(5):
            q = torch.randn(d, generator=generator, dtype=torch.float64).to(device)
            for _ in range(2):
                q -= basis[:j].T @ (basis[:j] @ q)
            norm = q.norm()
            if norm > 1e-8:
                return q / norm
        raise RuntimeError("lanczos: could not draw a vector outside the Krylov space")

    q = random_orthogonal(0)
    for j in range(steps):
        basis[j] = q
        w = matvec(q.to(dtype)[None])[0].to(torch.float64)
        alphas[j] = w @ q
        for _ in range(2):  # full re-orthogonalisation (classical Gram-Schmidt, twice)
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        if j + 1 == steps:
            break
        beta = w.norm()
        scale = max(float(alphas[: j + 1].abs().max()), 1e-30)
        if beta <= 1e-10 * scale:  # invariant subspace: restart orthogonally
            betas[j] = 0.0
            q = random_orthogonal(j + 1)
        else:
            betas[j] = beta
            q = w / beta
    T = torch.diag(alphas) + torch.diag(betas[: steps - 1], 1) + torch.diag(betas[: steps - 1], -1)
    theta, S = torch.linalg.eigh(T)
    return theta, basis.T @ S.to(basis.device)


def ihvp_arnoldi(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    rank: int,
    damping: float | None = None,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    curvature: str | None = None,
    blocks: Blocks = "full",
) -> IHVP:
    """Low-rank ``v -> (H + λI)^{-1} v`` from the top-``rank`` eigenpairs of the mean curvature.

    Runs ``m = min(d, rank + oversample)`` Lanczos steps (one HVP pass over ``data`` each) once, when
    the closure is built, and keeps the ``rank`` Ritz pairs ``(U [d, r], w)`` of largest magnitude. Then

        ``(H + λI)^{-1} v ≈ U diag(1/(w + λ)) Uᵀ v + (v − U Uᵀ v) / λ``,

    i.e. directions outside the top eigenspace see only the damping (``H ≈ 0`` there). With
    ``rank = d`` this is the exact solve. Calls cost ``O(k d r)``; ``with_damping`` is free.
    Memory ``O(d m)`` in float64 during the build, ``O(d r)`` after.

    With ``blocks="layer"`` (or a mapping) Lanczos runs on each diagonal block ``H_bb`` separately
    (cross-block curvature dropped) and keeps ``min(rank, d_b)`` eigenpairs per block.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      rank: eigenpairs kept (1 <= rank <= d).
      damping: λ; must be > 0 when ``rank < d`` (the complement is scaled by ``1/λ``). ``None`` (default):
        ``λ = 0.1 × the mean of all d eigenvalues = 0.1 · tr(H) / d`` (not the mean of the top ``rank``), with
        ``tr(H)`` = the trace on the Krylov space (exact, the sum of its Ritz values) plus a Hutchinson
        estimate on its orthogonal complement (20 Rademacher probes projected out of the Krylov space,
        one more batched product per block; exact when the Krylov space has ``d - 20`` or more dimensions, so at
        ``rank = d``). With ``blocks`` the traces of the blocks add up to ``tr(H)``: one λ for all blocks.
      oversample: extra Krylov steps for accurate Ritz pairs; default ``max(rank, 20)``.
      generator: for the starting vector and the labels of ``curvature="fisher"`` (default seeded with 0;
        the global RNG is never used).
      curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
      blocks: ``"full"`` (default), ``"layer"`` or a mapping ``{parameter name: group}``; ``rank`` is per block.

    Returns:
      :class:`IHVP` closure with ``info["eigenvalues"]`` (``[rank]``, float64); with ``damping=None`` also
      ``info["damping_rule"]``, ``info["damping_trace"]``, ``info["damping_estimator"]``.

    Raises:
      TypeError: ``rank`` or ``oversample`` is not an int (a bool or a float included).
      ValueError: rank out of range, a negative oversample, ``H + λI`` not positive definite on the kept
        eigenpairs, ``damping=None`` with an estimated ``tr(H) <= 0`` (an indefinite Hessian: pass a damping).

    References:
      Schioppa, Zablotskaia, Vilar & Sokolov (2022), "Scaling up influence functions".
    """
    generator = generator if generator is not None else default_generator()
    op = data_operator(loss, params, data, curvature=curvature, generator=generator)
    d = op.flat_params.numel()
    rank = check_count(rank, "rank", "ihvp_arnoldi")
    if rank > d:
        raise ValueError(f"ihvp_arnoldi: rank must be in [1, d={d}] (the number of parameters), got {rank}")
    oversample = (
        max(rank, 20) if oversample is None else check_count(oversample, "oversample", "ihvp_arnoldi", minimum=0)
    )
    groups = resolve_blocks(blocks, op.unflatten, device=op.flat_params.device)
    factors, krylov = [], []
    for block in groups:
        d_b = block.index.numel()
        r = min(rank, d_b)
        matvec = restrict(op.matvec, block.index, d)
        theta, vectors = lanczos(
            matvec, d_b, r + oversample, dtype=op.flat_params.dtype, device=op.flat_params.device, generator=generator
        )
        keep = theta.abs().argsort(descending=True)[:r]
        factors.append(EigenFactor(vectors[:, keep], theta[keep], r < d_b))
        krylov.append((matvec, d_b, float(theta.sum()), vectors))

    def trace() -> tuple[float, str]:  # tr(H_bb) = tr(Qᵀ H_bb Q) (the Ritz values) + tr of the rest
        parts = [
            hutchinson_trace(mv, d_b, like=op.flat_params, generator=generator, basis=Q) for mv, d_b, _, Q in krylov
        ]
        return trace_beyond(sum(t for _, _, t, _ in krylov), parts, "krylov")

    lam, rule = resolve_damping(damping, trace, d, who="ihvp_arnoldi")
    return eigen_blocks_ihvp(
        factors,
        groups,
        lam,
        name="arnoldi",
        unflatten=op.unflatten,
        like=op.flat_params.new_zeros(()),
        info={"rank": rank},
        rule=rule,
    )
