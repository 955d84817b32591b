"""Randomized Nyström approximation of the curvature, inverted by Woodbury (Frangella, Tropp & Udell 2023)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._errors import check_count
from .._types import Data, LossFn, Params
from ..likelihood import default_generator
from ._base import IHVP
from ._blocks import Blocks, EigenFactor, eigen_blocks_ihvp, resolve_blocks, restrict
from ._damping import hutchinson_trace, resolve_damping, trace_beyond
from ._operator import data_operator
from ._scorer import solve_dtype

__all__ = ["ihvp_nystrom", "nystrom_sketch"]


class Sketch(NamedTuple):
    """The Nyström factors ``(U, λ̂)`` with the orthonormal test matrix ``Ω [d, r]`` and ``tr(Ωᵀ H Ω)``."""

    U: torch.Tensor
    eigenvalues: torch.Tensor
    omega: torch.Tensor
    trace: float


def nystrom_sketch(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    rank: int,
    *,
    generator: torch.Generator,
    dtype=torch.float64,
    device=None,
    name: str = "nystrom",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-form ``Ĥ = U diag(λ̂) Uᵀ`` of the rank-``rank`` Nyström approximation of a PSD operator.

    With an orthonormal Gaussian test matrix ``Ω [d, r]`` and ``Y = H Ω`` (one batched product of ``r``
    vectors), the Nyström approximation is ``Ĥ = Y (Ωᵀ Y)^{-1} Yᵀ``, the best PSD approximation of ``H``
    whose range contains ``range(Y)``. It is formed stably with a small shift ``ν`` (Frangella et al.
    2023, Alg. 2.1): ``Y_ν = Y + ν Ω``, ``Ωᵀ Y_ν = C Cᵀ`` (Cholesky), ``B = Y_ν C^{-T}``,
    ``B = U Σ Vᵀ`` (thin SVD), ``λ̂ = max(Σ² − ν, 0)``, with ``ν = √d · eps · ‖Y‖₂``.
    With ``rank = d`` (and ``H`` PSD) ``Ĥ = H`` up to rounding. For one generator seed the sketches are
    nested (rank ``r + 1`` adds a column to the ``Ω`` of rank ``r``), so ``H − Ĥ`` shrinks as the rank grows.

    Args:
      matvec: ``[k, d] -> [k, d]``, the product with a symmetric PSD operator.
      d: dimension. rank: sketch size ``r`` (1 <= r <= d).
      generator: draws ``Ω`` (required: the sketch is random).
      dtype, device: of the vectors passed to ``matvec``. The factorisation runs in float64.

    Returns:
      ``(U [d, r], λ̂ [r])`` in float64, ``U`` with orthonormal columns, ``λ̂ >= 0`` descending.

    Raises:
      ValueError: the operator is not PSD on the sketch (the Cholesky factorisation fails).

    References:
      Tropp, Yurtsever, Udell & Cevher (2017), "Fixed-rank approximation of a positive-semidefinite matrix
      from streaming data"; Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning".
    """
    sketch = _sketch(matvec, d, rank, generator=generator, dtype=dtype, device=device, name=name)
    return sketch.U, sketch.eigenvalues


def _sketch(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    rank: int,
    *,
    generator: torch.Generator,
    dtype,
    device,
    name: str,
    products: torch.dtype | None = None,
) -> Sketch:
    """The sketch of :func:`nystrom_sketch`; ``products``: the dtype the operator's products are rounded to when
    coarser than ``dtype`` (a half-precision model's, None: ``dtype``): the level of the rounding the Cholesky
    retry may shift past, while the stabilising shift ``ν`` keeps ``dtype``'s ε (a shift of ``√d ε‖Y‖`` at
    bfloat16's ε would swamp every eigenvalue below a few percent of the largest)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name}: dtype must be a floating-point torch.dtype (e.g. torch.float64), got {dtype!r}")
    rank = check_count(rank, "rank", name)
    if rank > d:
        raise ValueError(f"{name}: rank must be an int in [1, d={d}] (the sketch has at most d columns), got {rank}")
    # rows drawn one probe at a time, so a larger rank extends the same sketch (nested ranges)
    omega = torch.stack([torch.randn(d, generator=generator, dtype=torch.float64) for _ in range(rank)], 1)
    omega = omega.to(device)
    omega, _ = torch.linalg.qr(omega)
    Y = matvec(omega.T.to(dtype)).T.to(torch.float64)  # [d, r] = H Ω
    if not torch.isfinite(Y).all():
        raise ValueError(f"{name}: the curvature products contain NaN/inf; check the loss and the data")
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
    nu = d**0.5 * eps * float(torch.linalg.matrix_norm(Y, ord=2))
    nu = max(nu, torch.finfo(torch.float64).tiny)
    core = omega.T @ Y
    core = (core + core.T) / 2
    trace = float(core.trace())  # tr(Ωᵀ H Ω): the curvature's trace on range(Ω), exact
    chol, info = torch.linalg.cholesky_ex(core + nu * torch.eye(rank, dtype=core.dtype, device=core.device))
    if int(info) != 0:
        # A singular PSD curvature (every cross-entropy GGN: shifting all logits changes nothing) can show
        # eigenvalues of Ωᵀ H Ω just below 0 from the rounding of the products: shift past them, and only
        # call the operator indefinite when its negative part is above that rounding level.
        lowest = float(torch.linalg.eigvalsh(core)[0])
        coarse = max(eps, torch.finfo(products).eps) if products is not None else eps
        rounding = d * coarse * float(torch.linalg.matrix_norm(Y, ord=2))
        if -lowest <= 100 * rounding:
            nu = nu + 2 * max(-lowest, 0.0)
            chol, info = torch.linalg.cholesky_ex(core + nu * torch.eye(rank, dtype=core.dtype, device=core.device))
    Y_nu = Y + nu * omega
    if int(info) != 0:
        raise ValueError(
            f"{name}: the curvature is not positive semi-definite on the sketch (Cholesky of Ωᵀ H Ω failed), "
            'so the Nyström approximation does not exist; use a PSD curvature ("ggn", "fisher", '
            '"empirical_fisher") or ihvp_arnoldi for an indefinite Hessian'
        )
    B = torch.linalg.solve_triangular(chol, Y_nu.T, upper=False).T  # Y_ν C^{-T}
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return Sketch(U, (S**2 - nu).clamp_min(0.0), omega, trace)


def ihvp_nystrom(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    rank: int,
    damping: float | None = None,
    generator: torch.Generator | None = None,
    curvature: str | None = None,
    blocks: Blocks = "full",
) -> IHVP:
    """Low-rank ``v -> (Ĥ + λI)^{-1} v`` from a randomized Nyström sketch of the mean curvature.

    Once, at build time: ``rank`` curvature products in one batched pass over ``data``, then the
    stable Nyström factorisation ``Ĥ = U diag(λ̂) Uᵀ`` (see :func:`nystrom_sketch`). The inverse follows
    from Woodbury,

        ``(U Λ̂ Uᵀ + λI)^{-1} v = U diag(1/(λ̂ + λ)) Uᵀ v + (v − U Uᵀ v) / λ``,

    so directions outside the sketch see only the damping. Calls cost ``O(k d r)``; ``with_damping`` is
    free. ``rank = d`` gives the exact solve. Compared with :func:`ihvp_arnoldi`: one data pass with
    ``rank`` vectors instead of ``2·rank`` sequential passes, at somewhat lower accuracy for the same
    rank when the spectrum decays slowly; it needs a PSD curvature.

    With ``blocks="layer"`` (or a mapping) each diagonal block ``H_bb`` is sketched on its own with rank
    ``min(rank, d_b)`` (cross-block curvature dropped).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader; ``H`` is the curvature of the mean loss.
      rank: sketch size (1 <= rank <= d), per block with ``blocks``.
      damping: λ; must be > 0 when ``rank`` is smaller than a block. ``None`` (default):
        ``λ = 0.1 × the mean of all d eigenvalues = 0.1 · tr(H) / d`` (not the mean of ``λ̂``), with ``tr(H)`` =
        ``tr(Ωᵀ H Ω)`` on the sketch (exact, from the products already made) plus a Hutchinson estimate on
        its orthogonal complement (20 Rademacher probes projected out of ``range(Ω)``, one more batched
        product per block; exact when ``rank >= d - 20``). With ``blocks`` one λ for all blocks.
      generator: draws the sketch (and the labels of ``curvature="fisher"``); default seeded with 0,
        the global RNG is never used.
      curvature: ``"ggn"`` (default for an :func:`ifunc.output_loss`), ``"hessian"`` (only if PSD),
        ``"fisher"`` or ``"empirical_fisher"``.
      blocks: ``"full"`` (default), ``"layer"`` or a mapping ``{parameter name: group}``.

    Returns:
      :class:`IHVP` closure with ``info["eigenvalues"]`` (``λ̂``, float64) and ``info["rank"]``; with
      ``damping=None`` also ``info["damping_rule"]``, ``info["damping_trace"]``, ``info["damping_estimator"]``.

    Raises:
      TypeError: ``rank`` is not an int (a bool or a float included).
      ValueError: rank out of range, damping <= 0 with a low rank, or the curvature is not PSD (also a
        non-positive trace with ``damping=None``).

    Example:
      >>> ihvp = ifunc.ihvp_nystrom(loss, params, (x, y), rank=50, damping=1e-3)
      >>> ihvp.with_damping(1e-2)(v)       # no new curvature products

    References:
      Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl.
    """
    generator = generator if generator is not None else default_generator()
    op = data_operator(loss, params, data, curvature=curvature, generator=generator)
    d = op.flat_params.numel()
    rank = check_count(rank, "rank", "ihvp_nystrom")
    if rank > d:
        raise ValueError(f"ihvp_nystrom: rank must be an int in [1, d={d}] (the number of parameters), got {rank}")
    groups = resolve_blocks(blocks, op.unflatten, device=op.flat_params.device)
    factors, sketches = [], []
    for block in groups:
        d_b = block.index.numel()
        r = min(rank, d_b)
        matvec = restrict(op.matvec, block.index, d)
        sketch = _sketch(
            matvec,
            d_b,
            r,
            generator=generator,
            dtype=solve_dtype(op.flat_params.dtype),  # a half-precision model's sketch vectors in float32
            device=op.flat_params.device,
            name="ihvp_nystrom",
            products=op.flat_params.dtype,
        )
        factors.append(EigenFactor(sketch.U, sketch.eigenvalues, r < d_b))
        sketches.append((matvec, d_b, sketch))

    def trace() -> tuple[float, str]:  # tr(H_bb) = tr(Ωᵀ H_bb Ω) + the Hutchinson estimate of the rest
        parts = [
            hutchinson_trace(mv, d_b, like=op.flat_params, generator=generator, basis=sk.omega)
            for mv, d_b, sk in sketches
        ]
        return trace_beyond(sum(sk.trace for _, _, sk in sketches), parts, "sketch")

    lam, rule = resolve_damping(damping, trace, d, who="ihvp_nystrom")
    return eigen_blocks_ihvp(
        factors,
        groups,
        lam,
        name="nystrom",
        unflatten=op.unflatten,
        like=op.flat_params.new_zeros(()),
        info={"rank": rank, "curvature": op.curvature},
        rule=rule,
    )
