"""DataInf: per-block average of Sherman–Morrison inverses of rank-one curvatures (Kwon et al. 2023)."""

from __future__ import annotations

import torch

from .._chunks import iter_chunks
from .._data import DataSource
from .._errors import check_count
from .._types import Data, LossFn, Params
from ..curvature import CURVATURES, example_gradients, resolve_curvature
from ..functional import flatten
from ..grads import check_scalar, check_summed
from ..likelihood import replayable
from ._base import IHVP
from ._blocks import blocks_info, resolve_blocks
from ._damping import check_damping, resolve_damping
from ._scorer import solve_dtype

__all__ = ["ihvp_datainf"]

#: The curvatures that are sums of per-example rank-one terms.
GRADIENT_CURVATURES = tuple(c for c in CURVATURES if c in ("empirical_fisher", "fisher"))


def ihvp_datainf(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    damping: float | None = None,
    blocks="layer",
    curvature: str = "empirical_fisher",
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> IHVP:
    """DataInf ``v -> (1/n) Σ_i (g_i g_iᵀ + λI)^{-1} v``, block by block, in closed form.

    Within each block ``b`` of parameters (default: each layer) the damped curvature is the mean of
    rank-one terms, ``G_b + λI = (1/n) Σ_i (g_ib g_ibᵀ + λI)``, with ``g_ib`` the block of example ``i``'s
    gradient. DataInf swaps the inverse and the mean and inverts each term by Sherman–Morrison:

        ``[ihvp(v)]_b = (1/n) Σ_i (g_ib g_ibᵀ + λI)^{-1} v_b
                     = (1/λ) (v_b − (1/n) Σ_i g_ib (g_ibᵀ v_b) / (λ + ‖g_ib‖²))``.

    What it approximates: the block-diagonal (per-layer) empirical Fisher (or, with
    ``curvature="fisher"``, the sampled true Fisher), with the inverse of the mean replaced by the mean
    of the inverses. This is exact for a single example per block (``n = 1``) and when all examples'
    block gradients are equal; otherwise, since matrix inversion is operator convex, the result is
    never smaller than the exact block solve in the quadratic form, ``vᵀ ihvp(v) >= vᵀ(G_b + λI)^{-1}v``
    (it under-estimates the curvature). The gap grows with ``‖g‖²/λ`` and with the block size, so
    DataInf suits small blocks (LoRA adapters) and large damping.

    Cost: per-example gradients once at build (``n`` vmapped gradients, stored: ``O(n d)`` memory); each
    call ``O(k n d)``; ``with_damping`` is free.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader (``n`` examples).
      damping: λ > 0, or ``None`` (default) for ``λ = 0.1 × the mean eigenvalue = 0.1 · tr(F) / d`` of the
        Fisher ``F = (1/n) Σ_i g_i g_iᵀ`` it approximates, exact and free: ``tr(F) = (1/n) Σ_i ‖g_i‖²``. One
        λ for all blocks (the block diagonal has the trace of ``F``). The λ used is ``ihvp.damping``.
      blocks: ``"layer"`` (default: group by module prefix), ``"full"`` or a mapping ``{name: group}``.
      curvature: ``"empirical_fisher"`` (default: gradients with the data's labels) or ``"fisher"``
        (gradients at labels sampled from the model; needs ``output_loss(..., likelihood=...)``).
      generator: label sampling for ``"fisher"`` (default seeded with 0).
      chunk_size: examples per vmapped gradient call.

    Returns:
      :class:`IHVP` closure with ``info["blocks"]`` and ``info["n"]``.

    Raises:
      TypeError: ``chunk_size`` is not an int (a bool or a float included).
      ValueError: damping <= 0; ``chunk_size < 1``; a curvature other than the two Fishers (DataInf needs rank-one
        per-example terms); a non-finite gradient (naming the example); ``damping=None`` with every
        gradient zero.

    Example:
      >>> ihvp = ifunc.ihvp_datainf(loss, params, train_batch, damping=0.1)
      >>> scores = ifunc.attribute(loss, params, ihvp, train_batch, query_batch)

    References:
      Kwon, Wu, Wu & Zou (2024), "DataInf: Efficiently estimating data influence in LoRA-tuned LLMs and
      diffusion models", ICLR.
    """
    if damping is not None:
        check_damping(damping, allow_zero=False)
    chunk_size = check_count(chunk_size, "chunk_size", "ihvp_datainf")
    if curvature not in GRADIENT_CURVATURES:
        raise ValueError(
            f"ihvp_datainf: curvature={curvature!r} cannot be used; DataInf inverts per-example rank-one "
            f"terms g gᵀ, so it needs one of {GRADIENT_CURVATURES}. For the Hessian or GGN per layer use "
            'ihvp_explicit / ihvp_cg / ihvp_nystrom with blocks="layer"'
        )
    curvature = resolve_curvature(loss, curvature)
    flat, unflatten = flatten(params)
    groups = resolve_blocks(blocks, unflatten, device=flat.device)
    source = DataSource(data, name="data", ordered=curvature == "fisher")  # labels are drawn in data order
    gen = replayable(generator, flat.device)() if curvature == "fisher" else None
    parts = []
    for index, offset, chunk, _ in iter_chunks(source, chunk_size):
        if index == 0:
            check_scalar(loss(unflatten(flat), chunk))
            check_summed(lambda x, b: loss(unflatten(x), b), flat, source)
        G = example_gradients(loss, flat, unflatten, chunk, curvature=curvature, generator=gen, offset=offset)
        parts.append(G.detach().to(solve_dtype(G.dtype)))  # a half-precision model's gradients held in float32
    S = torch.cat(parts)  # [n, d]
    n = S.shape[0]
    pieces = [(block.index, S[:, block.index], (S[:, block.index] ** 2).sum(1)) for block in groups]
    trace = lambda: (float(S.to(torch.float64).square().sum()) / n, "exact")  # noqa: E731
    lam, rule = resolve_damping(damping, trace, S.shape[1], who="ihvp_datainf", allow_zero=False)
    like = flat.new_zeros(())  # the closure keeps the parameters' dtype and device, not their values

    def build(lam: float, rule=None) -> IHVP:
        lam = check_damping(lam, allow_zero=False)

        def solve(V: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(V)
            for index, Sb, norms in pieces:
                Vb = V[:, index]
                coeff = (Vb @ Sb.T) / (lam + norms)  # [k, n]: g_iᵀ v / (λ + ‖g_i‖²)
                out[:, index] = (Vb - coeff @ Sb / n) / lam
            return out

        return IHVP.make(
            solve,
            name="datainf",
            damping=lam,
            unflatten=unflatten,
            like=like,
            rebuild=build,
            info={"blocks": blocks_info("datainf", groups), "n": n, "curvature": curvature},
            rule=rule,
        )

    return build(lam, rule)
