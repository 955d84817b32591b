"""LiSSA: the stochastic truncated Neumann series for ``(H + λI)^{-1} v`` (Agarwal et al. 2017)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Callable

import torch

from .._data import DataSource, index_batch
from .._data import batch_size as _batch_size
from .._types import Data, LossFn, MatVec, Params
from ..curvature import _batch_matvec, curvature_operator
from ..likelihood import default_generator
from ._base import IHVP, ConvergenceError, check_damping
from ._blocks import block_diagonal, blocks_info, resolve_blocks
from ._damping import hutchinson_trace, resolve_damping
from ._operator import data_operator

__all__ = ["ihvp_lissa", "LissaDivergenceError", "LissaDivergenceWarning", "DEFAULT_BATCH_SIZE"]

#: Examples per LiSSA step when ``batch_size=None`` and ``data`` holds more than this many (else all of it):
#: a step then costs one product on 64 examples, not a pass over the data, so the default ``depth=1000``
#: finishes in about the time of 1000 · 64 / n passes (pyDVL's LiSSA also steps on mini-batches).
DEFAULT_BATCH_SIZE = 64


class LissaDivergenceError(ConvergenceError):
    """The LiSSA recursion grew instead of settling: ``scale`` is below ``(λ_max(H) + λ) / 2``."""


class LissaDivergenceWarning(RuntimeWarning):
    """No longer emitted: a growing recursion raises :class:`LissaDivergenceError` (kept for old imports)."""


def _fresh(state: torch.Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def _child(gen: torch.Generator) -> torch.Generator:
    """A generator seeded from ``gen`` (advancing it), for the labels of one step's true Fisher."""
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))


def _estimate_top_eigenvalue(matvec, d, like, generator, iters: int = 30) -> float:
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


def ihvp_lissa(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    damping: float | None = None,
    scale: float | None = None,
    depth: int = 1000,
    repeat: int = 1,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    curvature: str | None = None,
    blocks="full",
) -> IHVP:
    """``v -> (H + λI)^{-1} v`` by the LiSSA recursion.

    With ``x_0 = v`` and ``H_j`` the mean curvature on the ``j``-th sampled mini-batch,
    ``x_j = v + (1 − λ/s) x_{j−1} − H_j x_{j−1} / s``; the estimate is ``x_depth / s``, averaged over
    ``repeat`` independent runs. The recursion converges when every eigenvalue of ``(H + λI)/s`` lies in
    ``(0, 2)``, i.e. ``s > (λ_max(H) + λ)/2``, and the truncation error decays like ``(1 − λ_min/s)^depth``.
    With full-data steps (the default on at most 64 examples, or ``batch_size=n``) the result is exactly the
    truncated Neumann sum ``(1/s) Σ_{j<=depth} (I − (H + λI)/s)^j v``.

    With ``blocks="layer"`` (or a mapping) every ``H_j`` is replaced by its block diagonal
    ``Σ_b P_b H_j P_b`` (cross-block curvature dropped): the recursion then runs independently in each
    block on shared mini-batches, with one batched product per step.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader. Mini-batches are drawn uniformly with
        replacement from in-memory data with ``generator``; a DataLoader is cycled through in its order.
      damping: λ > 0 (keyword-only, like every argument here), or ``None`` (default) for
        ``λ = 0.1 × the mean eigenvalue = 0.1 · tr(H) / d`` of the mean curvature over all of ``data``, with
        ``tr(H)`` from a Hutchinson estimate: 20 Rademacher probes in one batched product at build time
        (exact when ``d <= 20``), drawn from a generator seeded from ``generator`` without advancing it.
        Relative error at most ``sqrt(2 / (20 r))`` (one standard deviation) for a PSD curvature of
        effective rank ``r = tr(H)² / ‖H‖_F²``. With ``blocks`` the same λ. The λ used is ``ihvp.damping``.
      scale: s; default ``1.5 (λ_max + λ)`` with ``λ_max`` from 30 power iterations on all of ``data``: a
        mini-batch curvature may exceed ``λ_max`` by up to 2x before the recursion grows (64-example batches
        of the MLPs in ``benchmarks/exact_fast.py`` stayed within 1.25x).
      depth: recursion steps. repeat: independent runs averaged.
      batch_size: examples per step (in-memory data; a DataLoader is stepped through batch by batch). ``None``
        (default) = :data:`DEFAULT_BATCH_SIZE` (64) when ``data`` holds more examples than that, else all of
        ``data`` every step (then the result is exactly the truncated Neumann sum). Pass ``batch_size=n``
        for full-data steps on larger data (``depth`` passes over it per call).
      generator: drives mini-batch sampling and the power iteration; its state at build time is replayed
        on every call, so the closure is deterministic. ``None`` = a generator seeded with 0. The global
        RNG is never used.
      curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"`` (the true Fisher's labels
        are drawn from ``generator`` too).
      blocks: ``"full"`` (default), ``"layer"`` or a mapping ``{parameter name: group}``.

    Returns:
      :class:`IHVP` closure (deterministic: two calls give the same answer).

    Raises:
      ValueError: damping <= 0, depth/repeat < 1, the recursion produced NaN/inf, or ``damping=None`` with an
        estimated ``tr(H) <= 0`` (an indefinite Hessian: pass a damping).

    Warns:
      LissaDivergenceWarning: the iterates grew (scale too small for the curvature).

    References:
      Agarwal, Bullins & Hazan (2017); Koh & Liang (2017).
    """
    if damping is not None:
        check_damping(damping, allow_zero=False)
    if depth < 1 or repeat < 1:
        raise ValueError(f"depth and repeat must be >= 1, got depth={depth}, repeat={repeat}")
    state = (generator if generator is not None else default_generator()).get_state()
    full = data_operator(loss, params, data, curvature=curvature, generator=_fresh(state))
    source = DataSource(data)
    like = full.flat_params
    d = like.numel()
    groups = resolve_blocks(blocks, full.unflatten, device=like.device)
    lam, rule = resolve_damping(
        damping,
        lambda: hutchinson_trace(full.matvec, d, like=like, generator=generator),
        d,
        who="ihvp_lissa",
        allow_zero=False,
    )

    def block_op(matvec):
        return block_diagonal(matvec, groups, d)

    def labels(gen):  # only the true Fisher draws from gen here, so other curvatures keep their streams
        return _child(gen) if full.curvature == "fisher" else None

    top = None  # the spectral bound the default scale is built on, reported when the recursion grows
    if scale is None:
        top = _estimate_top_eigenvalue(block_op(full.matvec), d, like, _fresh(state))
        scale = 1.5 * (top + lam)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    s = float(scale)

    # the curvature of each recursion step: all of the data, sampled mini-batches, or the loader's batches
    step_operator: Callable[[torch.Generator], Iterator[MatVec]]
    if batch_size is None and full.n > DEFAULT_BATCH_SIZE:
        batch_size = DEFAULT_BATCH_SIZE
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"ihvp_lissa: batch_size must be a positive integer or None, got {batch_size!r}")
    if batch_size is None:

        def full_steps(gen):
            while True:
                yield block_op(full.matvec)

        step_operator = full_steps
    else:
        pool = source.in_memory()
        if pool is not None:
            n = _batch_size(pool)

            def sampled_steps(gen):
                while True:
                    idx = torch.randint(n, (batch_size,), generator=gen)
                    # the batch product itself: no per-step flattening of params or data wrapping
                    product = _batch_matvec(
                        loss, like, full.unflatten, index_batch(pool, idx), full.curvature, labels(gen)
                    )
                    yield block_op(lambda V, product=product: product(V) / batch_size)

            step_operator = sampled_steps
        else:

            def cycled_steps(gen):
                for batch in itertools.cycle(source):
                    yield block_op(
                        curvature_operator(
                            loss, params, batch, curvature=full.curvature, generator=labels(gen), check=False
                        ).matvec
                    )

            step_operator = cycled_steps

    def solve(V: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(V)
        gen = _fresh(state)  # every call replays the same draws: the closure is deterministic
        for _ in range(repeat):
            ops = step_operator(gen)
            x = V.clone()
            first_step = None
            for _j in range(depth):
                new = V + (1 - lam / s) * x - next(ops)(x) / s
                step = float((new - x).norm())
                x = new
                if not torch.isfinite(x).all():
                    raise ValueError(
                        f"ihvp_lissa diverged to NaN/inf (scale={s:g}); use a larger scale (> (λ_max + λ)/2)"
                    )
                first_step = step if first_step is None else first_step
            assert first_step is not None  # depth >= 1 (checked above): the loop ran at least once
            if depth > 1 and step > 10 * max(first_step, 1e-30):
                bound = "" if top is None else f" (the default scale used the estimate λ_max(H) ≈ {top:.3e})"
                raise LissaDivergenceError(
                    f"ihvp_lissa diverged: the recursion is growing (last step {step:.3e} vs first "
                    f"{first_step:.3e}); scale={s:g} is too small{bound}: use scale > (λ_max(H) + λ)/2"
                )
            total += x / s
        return total / repeat

    return IHVP(
        solve,
        name="lissa",
        damping=lam,
        unflatten=full.unflatten,
        like=like.new_zeros(()),
        rebuild=lambda new: ihvp_lissa(
            loss,
            params,
            data,
            damping=new,
            scale=s,
            depth=depth,
            repeat=repeat,
            batch_size=batch_size,
            generator=generator,
            curvature=full.curvature,
            blocks=blocks,
        ),
        info={
            "scale": s,
            "depth": depth,
            "repeat": repeat,
            "batch_size": batch_size,  # the one used: None = all of the data every step
            "blocks": blocks_info("lissa", groups),
            **(rule.info() if rule is not None else {}),
        },
    )
