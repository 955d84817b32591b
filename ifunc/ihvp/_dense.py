"""The dense mean curvature of the explicit method, formed the fastest exact way the loss allows.

Three ways to the same matrix ``H = (1/n) Σ_i C_i`` (``C_i`` the curvature of example ``i``), chosen in this order:

- ``"gradients"`` (``curvature="empirical_fisher"`` or ``"fisher"``): ``C_i = g_i g_iᵀ`` with ``g_i`` the per-example
  gradient (the sampled-label gradient ``J_iᵀ u_i`` for the true Fisher), so ``H = Gᵀ G / n`` with ``G [n, d]``:
  one product per chunk of examples, ``n d²`` flops;
- ``"jacobians"`` (``curvature="ggn"``, an :func:`ifunc.output_loss` whose ``m`` outputs per example fit the byte
  budget and are at most ``d / JACOBIAN_OUTPUTS_PER_PARAMETER``; past that the ``[m, m]`` Hessians and the
  ``n m d²`` product cost more than the columns, measured on MLPs of d ≈ 1,600 with 10 to 256 outputs):
  ``C_i = J_iᵀ Λ_i J_i`` with ``J_i [m, d]`` the per-example output Jacobian (``vmap(jacrev)``) and ``Λ_i [m, m]``
  the Hessian of the loss in that example's outputs, so ``H = Jᵀ (Λ J) / n`` with ``J`` stacked to ``[n m, d]``:
  ``n m d²`` flops at the matrix-product rate (the GGN of a sequence model sums its positions inside ``Λ_i``, which
  is block-diagonal over them);
- ``"products"`` (anything else: the Hessian, a loss without the output split, outputs too large, a half-precision
  model, whose curvature stays what its own rounded products make of it): ``d`` batched curvature products with
  unit vectors (:func:`operator_matrix`), at about a third of that rate.

The Gram products ``Aᵀ B`` of the first two are known to be symmetric, so only the panels on and above the diagonal
are multiplied (:func:`symmetric_product`: about 60 % of the flops). Under ``torchrun`` each rank forms its share of
the batches and the sums are all-reduced, as the curvature products are.
"""

from __future__ import annotations

from typing import Callable

import optree
import torch
from torch.func import hessian, jacrev, vmap

from .._batches import batch_size, slice_batch
from .._errors import explained
from .._types import Batch, LossFn
from ..curvature import CurvatureOperator, example_gradients
from ..functional import Unflatten
from ..grads import check_finite, chunk_size_for
from ..likelihood import OutputLoss, replayable, sampled_output_gradients
from ._blocks import Block
from ._operator import rank_partition
from ._scorer import solve_dtype

__all__ = ["dense_curvature", "operator_matrix", "symmetric_product", "PANEL"]

#: columns per panel of :func:`symmetric_product` (narrower panels multiply below the matrix-product rate)
PANEL = 384
#: rows ``c·m`` of the Jacobian chunk at most (measured: 128 examples × 10 outputs of a 2,410-parameter MLP form the
#: GGN 20 % faster than 409, whose ``[c m, d]`` blocks fall out of cache in the ``Λ J`` product; 32 are slower again)
ROWS = 2048
#: outputs per example up to which Λ_i is checked to be PSD (larger: the solve estimates the conditioning instead)
PSD_CHECK_OUTPUTS = 128
#: the Jacobian path needs ``m * JACOBIAN_OUTPUTS_PER_PARAMETER <= d`` (measured at n = 500, d ≈ 1,600: m = 10 is
#: 5.5x faster than the columns, m = 128 even, m = 256 slower; m = 3,000 outputs with d = 450 is 2x slower)
JACOBIAN_OUTPUTS_PER_PARAMETER = 8


def operator_matrix(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    *,
    like: torch.Tensor,
    index: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Dense ``M[index][:, index]`` (default all of ``M``) from products with unit vectors, ``chunk`` at a time.

    Memory ``O(chunk·d + |index|²)``; ``|index|`` operator products in total. The matrix is returned in
    ``like``'s dtype, at least float32 (the products of a half-precision model are rounded to its precision).
    """
    index = torch.arange(d, device=like.device) if index is None else index
    m = index.numel()
    out = torch.empty(m, m, dtype=solve_dtype(like.dtype), device=like.device)  # half-precision columns: float32
    for start in range(0, m, chunk):
        cols = index[start : start + chunk]
        E = torch.zeros(cols.numel(), d, dtype=like.dtype, device=like.device)
        E[torch.arange(cols.numel()), cols] = 1
        out[start : start + cols.numel()] = matvec(E)[:, index]
    return (out + out.T) / 2


def symmetric_product(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor, panel: int = PANEL) -> None:
    """``out += Aᵀ B`` for ``A, B [r, d]`` whose product is symmetric: panels on and above the diagonal, mirrored.

    With ``p = ⌈d / panel⌉`` panels this multiplies ``(p + 1) / (2p)`` of the full product's ``2 r d²`` flops, and
    the result is exactly symmetric. ``out [d, d]`` may have a wider dtype than ``A`` and ``B``.
    """
    d = A.shape[1]
    for start in range(0, d, panel):
        rows = slice(start, min(start + panel, d))
        part = (A[:, rows].T @ B[:, start:]).to(out.dtype)  # [panel, d - start]
        width = part.shape[0]
        out[rows, rows] += (part[:, :width] + part[:, :width].T) / 2
        out[rows, start + width :] += part[:, width:]
        out[start + width :, rows] += part[:, width:].T


def _one(t):
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


def _jacobian_rows(loss: OutputLoss, flat: torch.Tensor, unflatten: Unflatten, chunk: Batch, offset: int):
    """``(J [c m, d], Λ J [c m, d], Λ_i PSD?)`` of a chunk: per-example output Jacobians and their Λ-products."""

    def outputs(x, example):
        return loss.outputs(unflatten(x), optree.tree_map(_one, example, namespace="ifunc")).reshape(-1)

    def loss_on(o, example):
        one = optree.tree_map(_one, example, namespace="ifunc")
        return loss.loss_on_outputs(o.reshape(shape), one).reshape(())

    with explained("per-example output Jacobians (the dense GGN)"):
        shape = loss.outputs(unflatten(flat), slice_batch(chunk, 0, 1)).shape
        J = vmap(jacrev(outputs), in_dims=(None, 0))(flat, chunk)  # [c, m, d]
        out = vmap(outputs, in_dims=(None, 0))(flat, chunk)  # [c, m]
        Lam = vmap(hessian(loss_on))(out, chunk)  # [c, m, m]
    check_finite(J, "the", offset)  # "... for example i of the data"
    c, m, d = J.shape
    # a softmax Λ_i is singular: its rounding puts eigenvalues at -u·‖Λ_i‖ (float32: ~1e-8), which is still PSD
    floor = -100 * torch.finfo(Lam.dtype).eps * Lam.abs().amax(dim=(-2, -1), keepdim=True).squeeze(-1).to(torch.float64)
    psd = m <= PSD_CHECK_OUTPUTS and bool((torch.linalg.eigvalsh(Lam.to(torch.float64)) >= floor).all())
    rows = solve_dtype(flat.dtype)
    J = J.to(rows)
    return J.reshape(c * m, d), (Lam.to(rows) @ J).reshape(c * m, d), psd


def _jacobian_chunk(loss: OutputLoss, flat: torch.Tensor, unflatten: Unflatten, source, *, auto: bool) -> int:
    """Examples per Jacobian chunk: the per-example-gradient chunk of the budget over ``m`` outputs (0: none fit, or,
    when the way is chosen (``auto``), more than ``d / JACOBIAN_OUTPUTS_PER_PARAMETER`` outputs)."""
    first = source.first()
    m = loss.outputs(unflatten(flat), slice_batch(first, 0, 1)).numel()
    try:
        per_gradient = chunk_size_for(loss, unflatten(flat), source, name="data")
    except MemoryError:
        return 0
    if per_gradient < m:  # one example's m gradient rows exceed the budget: the products path needs less
        return 0
    if auto and m * JACOBIAN_OUTPUTS_PER_PARAMETER > flat.numel():  # many outputs per parameter: columns are cheaper
        return 0
    return max(1, min(per_gradient // m, ROWS // m))


def dense_curvature(
    loss: LossFn,
    op: CurvatureOperator,
    source,
    groups: list[Block],
    *,
    generator: torch.Generator | None = None,
    way: str | None = None,
) -> tuple[list[torch.Tensor], str, bool]:
    """The diagonal blocks ``H_bb`` (float64) of the mean curvature of ``op``, and how they were formed.

    Args:
      loss: the loss ``op`` was built from. op: the curvature operator over the data (its checks have run).
      source: the data as a :class:`ifunc._data.DataSource`. groups: the blocks (one for the full matrix).
      generator: label sampling of ``curvature="fisher"`` (the operator's draws are replayed exactly).
      way: force ``"gradients"``, ``"jacobians"`` or ``"products"`` (default: the fastest that applies).

    Returns:
      ``(blocks, way, psd)``: ``psd`` is True when every block is a Gram matrix or a GGN with PSD ``Λ_i``.

    Raises:
      ValueError: a forced ``way`` that does not apply to the curvature, or a non-finite curvature.
    """
    curvature, flat, unflatten = op.curvature, op.flat_params, op.unflatten
    # a half-precision model keeps its products: its curvature is what its own rounded products make of it
    exact_rows = flat.dtype.itemsize >= 4
    possible = {"gradients": exact_rows and curvature in ("empirical_fisher", "fisher"), "products": True}
    split = loss if isinstance(loss, OutputLoss) else None  # the GGN needs the outputs / loss-on-outputs split
    chunk = 0
    if exact_rows and split is not None and curvature == "ggn" and way in (None, "jacobians"):
        chunk = _jacobian_chunk(split, flat, unflatten, source, auto=way is None)
    possible["jacobians"] = chunk > 0
    if way is None:
        way = next(w for w in ("gradients", "jacobians", "products") if possible[w])
    if way not in possible or not possible[way]:
        raise ValueError(
            f"way={way!r} does not form the {curvature!r} curvature; use one of {[w for w in possible if possible[w]]}"
        )
    if way == "products":
        mats = [operator_matrix(op.matvec, flat.numel(), like=flat, index=b.index) for b in groups]
        return _finished(mats), way, curvature in ("empirical_fisher", "fisher")
    mats = [torch.zeros(b.index.numel(), b.index.numel(), dtype=torch.float64, device=flat.device) for b in groups]
    part = rank_partition()
    psd = True
    fresh = replayable(generator, flat.device)
    gen = fresh() if curvature == "fisher" else None
    batches = source.pieces(part.count) if curvature != "fisher" else source
    if way == "gradients":  # the Fisher takes whole batches: its labels are drawn per batch, as the products draw them
        chunk = chunk_size_for(loss, unflatten(flat), source, name="data") if curvature != "fisher" else 0
    offset = 0
    for index, batch in enumerate(batches):
        size = batch_size(batch)
        if not part.owns(index):
            if gen is not None:  # another rank's batch: draw its labels anyway, to keep the generator in step
                assert isinstance(loss, OutputLoss)
                sampled_output_gradients(loss, loss.outputs(unflatten(flat), batch), batch, gen)
            offset += size
            continue
        step = chunk or size
        for start in range(0, size, step):
            piece = slice_batch(batch, start, min(start + step, size))
            if way == "gradients":
                G = example_gradients(loss, flat, unflatten, piece, curvature=curvature, generator=gen, offset=offset)
                A = B = G.to(solve_dtype(flat.dtype))
            else:
                assert split is not None  # "jacobians" is possible only with the split
                A, B, ok = _jacobian_rows(split, flat, unflatten, piece, offset + start)
                psd = psd and ok
            for M, block in zip(mats, groups):
                full = block.index.numel() == flat.numel()
                symmetric_product(A if full else A[:, block.index], B if full else B[:, block.index], M)
        offset += size
    return _finished([part.reduce(M).div_(op.n) for M in mats]), way, psd


def _finished(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [M.to(torch.float64) for M in mats]
    # a NaN/inf anywhere makes the sum non-finite: the elementwise pass runs only then (or when the sum overflowed)
    if not all(bool(torch.isfinite(M.sum())) or bool(torch.isfinite(M).all()) for M in out):
        raise ValueError("the curvature matrix contains NaN/inf: check the loss and the data")
    return out
