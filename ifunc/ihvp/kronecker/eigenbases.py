"""The eigendecompositions of the Kronecker factors: from each layer's summed statistics to its eigenbases.

After the first pass over the data (:mod:`ifunc.ihvp.kronecker.fit`), the sums of ``A``, ``S`` (and ``D``) become
means in place, and every layer's covariances are decomposed, ``A = Q_A diag(λ_A) Q_Aᵀ`` and
``S = Q_S diag(λ_S) Q_Sᵀ`` (an embedding's ``A`` is diagonal, a vector ``[vocab]``: ``λ_A = A``, ``Q_A`` the identity,
kept as None), in ``eigen_dtype`` one layer at a time (on one thread: the float64 copies of a large
layer are freed as soon as it is decomposed). Under ``torchrun`` layer ``l`` is decomposed on rank ``owners[l]``
and shared (:func:`ifunc.distributed.owner_map`: the others add zeros, so every rank holds the owner's bits).
Eigenvalues below 0 (round-off of a positive semi-definite matrix) are clamped to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import distributed
from ..._progress import progress_bar
from ._kernels import one_thread
from .factors import LayerFactors
from .layers import LayerSpec, kind_of

__all__ = ["layer_eigenbases"]


def layer_eigenbases(
    acc: dict[str, dict[str, torch.Tensor | float]],
    layers: Sequence[LayerSpec],
    n: int,
    owners: Sequence[int],
    *,
    diagonal: bool,
    dtype: torch.dtype,
    eigen_dtype: torch.dtype,
    keep_covariances: bool,
    progress: bool | None,
) -> dict[str, LayerFactors]:
    """Every layer's means ``A = ΣA / n``, ``S = ΣS / n``, ``D = ΣD / n`` and the eigendecompositions of ``A``, ``S``.

    Args:
      acc: layer name -> the sums over the data (``"A"`` ``[in, in]`` and ``"S"`` ``[out, out]`` in the
        covariances' dtype, ``"D"`` ``[out, in]`` in ``eigen_dtype`` when ``diagonal``), all-reduced over the ranks;
        ``A`` and ``S`` are divided by ``n`` in place and their entries reset to ``0.0`` (one copy alive).
      layers: the tracked layers, in order; ``owners[l]`` is the rank that decomposes layer ``l``.
      n: the number of examples the sums ran over.
      diagonal: ``acc`` holds ``D`` sums.
      dtype: the params' dtype, of the returned covariances and bases.
      eigen_dtype: dtype of the eigendecompositions and the returned eigenvalues.
      keep_covariances: return ``A`` and ``S`` too (else None: freed once decomposed).
      progress: a bar over the layers (``None``: only on a terminal).

    Returns:
      layer name -> :class:`LayerFactors` ``(A, S, λ_A, Q_A, λ_S, Q_S, D, None)`` (no EK-FAC eigenvalues yet),
      ``λ ≥ 0`` clamped, the same bits on every rank.

    Raises:
      ValueError: a mean ``A`` or ``S`` has NaN/inf, naming the layer.
    """
    stats = {}
    for s in layers:
        st = acc[s.name]
        A, S = st["A"], st["S"]
        st["A"] = st["S"] = 0.0  # the sums become the means in place: one copy of the covariances is alive
        for what, M in (("A", A), ("S", S)):
            assert isinstance(M, torch.Tensor)  # the data is not empty (check_summed read a batch): every layer added
            M.div_(n)
            if not torch.isfinite(M).all():
                raise ValueError(f"the {what} factor of layer {s.name!r} has NaN/inf: check the loss and the data")
        stats[s.name] = (A, S, st["D"] / n if diagonal else None)

    bar = progress_bar(total=len(layers), desc="ifunc eigendecompositions", progress=progress)

    kinds = {s.name: kind_of(s) for s in layers}

    def eig(name):
        A, S, D = stats[name]
        with one_thread():  # one layer's covariances in eigen_dtype at a time
            eA, QA = kinds[name].input_eig(A, eigen_dtype)
            eS, QS = torch.linalg.eigh((S.to(eigen_dtype) + S.T) / 2)
        # kept in the params' dtype (where the closures and the Λ pass use them), or not at all: the float64 copies
        # of a large layer's covariances and bases are freed as soon as they are decomposed
        stats[name] = (A.to(dtype), S.to(dtype), D) if keep_covariances else (None, None, D)
        bar.update(1)
        # an identity basis travels as an empty tensor (owner_map shares tensors only)
        return eA, A.new_zeros(0, dtype=dtype) if QA is None else QA.to(dtype), eS, QS.to(dtype)

    def zeros(name):
        A, S, D = stats[name]
        QA = torch.zeros_like(A, dtype=dtype) if kinds[name].input_basis else A.new_zeros(0, dtype=dtype)
        QS = torch.zeros_like(S, dtype=dtype)
        eA, eS = A.new_zeros(len(A), dtype=eigen_dtype), S.new_zeros(len(S), dtype=eigen_dtype)  # as eig's
        if not keep_covariances:  # another rank decomposes this layer: its covariances are not needed here
            stats[name] = (None, None, D)
        return eA, QA, eS, QS

    factors = {}
    for s, (eA, QA, eS, QS) in zip(layers, distributed.owner_map([s.name for s in layers], eig, zeros, owners)):
        A, S, D = stats.pop(s.name)
        if A is not None:
            A, S = A.to(dtype), S.to(dtype)
        QA = QA if kinds[s.name].input_basis else None
        factors[s.name] = LayerFactors(A, S, eA.clamp_min(0), QA, eS.clamp_min(0), QS, D, None)
    bar.close()
    return factors
