"""The eigendecompositions of the Kronecker factors: from each layer's summed statistics to its eigenbases.

After the first pass over the data (:mod:`ifunc.ihvp.kronecker.fit`), the sums of ``A``, ``S`` (and ``D``) become
means in place, and every layer's covariances are decomposed, ``A = Q_A diag(λ_A) Q_Aᵀ`` and
``S = Q_S diag(λ_S) Q_Sᵀ`` (an embedding's ``A`` is diagonal, a vector ``[vocab]``: ``λ_A = A``, ``Q_A`` the identity,
kept as None), in ``eigen_dtype`` one layer at a time (the ``eigen_dtype`` copies of a large layer are freed as
soon as it is decomposed). Under ``torchrun`` layer ``l`` is decomposed on rank ``owners[l]`` and shared
(:func:`ifunc.distributed.owner_map`: the others add zeros, so every rank holds the owner's bits). Eigenvalues below
0 (round-off of a positive semi-definite matrix) are clamped to 0.

Where the time goes: a ``3072²`` ``eigh`` (GPT-2 small's MLP factors) takes 7.4 s in float64 on one thread, 3.8 s
on two, 1.8 s in float32 on two (measured on this project's 2-core machine). So

- a factor of at least :data:`THREADED_EIGH` rows is decomposed on all of torch's threads; a smaller one on one
  thread (LAPACK's threads cost more than they give below that, many times more on shared cores);
- layers whose input covariances are equal, bit for bit (the query, key and value projections of one attention
  block read the same input), share one decomposition of ``A``: each distinct ``A`` is decomposed once;
- a float32 ``eigh`` that fails (LAPACK's ``LinAlgError``: no convergence) is redone in float64 for that factor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ... import distributed
from ..._progress import progress_bar
from ._kernels import one_thread
from .factors import LayerFactors
from .layers import LayerSpec, kind_of

#: ``torch.linalg.LinAlgError`` (a ``RuntimeError``; not in the type stubs): a factorisation that failed to converge
LinAlgError: type[RuntimeError] = getattr(torch.linalg, "LinAlgError", RuntimeError)

__all__ = ["layer_eigenbases", "symmetric_eig", "shared_inputs", "THREADED_EIGH"]

THREADED_EIGH = 1024  #: rows from which a factor's ``eigh`` runs on all threads (1.7-2.1x faster there on 2 cores)


def symmetric_eig(M: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, Q)`` with ``(M + Mᵀ)/2 = Q diag(w) Qᵀ``, in ``dtype``; a float32 ``eigh`` that fails is redone in float64.

    Runs on one thread below :data:`THREADED_EIGH` rows, on all of torch's threads from there.
    """
    M = M.to(dtype)
    threads = one_thread() if len(M) < THREADED_EIGH else contextlib.nullcontext()
    with threads:
        try:
            return torch.linalg.eigh((M + M.T) / 2)
        except LinAlgError:  # float32's iterations may stall on a badly scaled matrix; float64 converges
            if dtype == torch.float64:
                raise
            w, Q = torch.linalg.eigh((M.double() + M.double().T) / 2)
            return w.to(dtype), Q.to(dtype)


def shared_inputs(covariances: dict[str, torch.Tensor | None]) -> dict[str, str]:
    """layer name -> the first earlier layer whose input covariance ``A`` is equal to its own, bit for bit.

    Candidates are found by a fingerprint (shape, sum, trace) and confirmed by ``torch.equal``, so the cost is one
    pass over each ``A`` plus one comparison per true match. Layers absent from the result have a distinct ``A``.
    """
    seen: dict[tuple, list[str]] = {}
    same = {}
    for name, A in covariances.items():
        if A is None:
            continue
        key = (A.dtype, tuple(A.shape), float(A.sum()), float(A.diagonal().sum()) if A.dim() == 2 else 0.0)
        for earlier in seen.get(key, []):
            if torch.equal(covariances[earlier], A):  # type: ignore[arg-type]
                same[name] = earlier
                break
        else:
            seen.setdefault(key, []).append(name)
    return same


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
    # a layer whose A equals an earlier layer's takes that layer's (λ_A, Q_A): its own A is not decomposed (the
    # same bits on every rank: the sums were all-reduced, so every rank finds the same pairs)
    same_input = shared_inputs({s.name: stats[s.name][0] for s in layers if kinds[s.name].input_basis})

    def input_eig(name, A):
        if name in same_input:  # decomposed with the earlier layer: empty stand-ins, filled in below
            return A.new_zeros(0, dtype=eigen_dtype), A.new_zeros(0, dtype=dtype)
        if not kinds[name].input_basis:  # a diagonal A (an embedding): λ_A = A, Q_A the identity (an empty tensor)
            eA, _ = kinds[name].input_eig(A, eigen_dtype)
            return eA, A.new_zeros(0, dtype=dtype)
        eA, QA = symmetric_eig(A, eigen_dtype)
        return eA, QA.to(dtype)

    def eig(name):
        A, S, D = stats[name]
        try:
            eA, QA = input_eig(name, A)
            eS, QS = symmetric_eig(S, eigen_dtype)
        except LinAlgError as err:  # in float64 too: name the layer (its factors are finite: checked above)
            raise ValueError(
                f"the eigendecomposition of a factor of layer {name!r} failed in float64 too ({err}); its covariances "
                "are finite but too badly scaled: check the layer's inputs and output-gradients for huge values"
            ) from err
        # kept in the params' dtype (where the closures and the Λ pass use them), or not at all: the eigen_dtype
        # copies of a large layer are freed as soon as they are decomposed
        stats[name] = (A.to(dtype), S.to(dtype), D) if keep_covariances else (None, None, D)
        bar.update(1)
        return eA, QA, eS, QS.to(dtype)  # an identity or shared basis travels as an empty tensor

    def zeros(name):
        A, S, D = stats[name]
        shared = name in same_input
        eA = A.new_zeros(0 if shared else len(A), dtype=eigen_dtype)  # shaped and typed as eig's
        QA = torch.zeros_like(A, dtype=dtype) if kinds[name].input_basis and not shared else A.new_zeros(0, dtype=dtype)
        QS, eS = torch.zeros_like(S, dtype=dtype), S.new_zeros(len(S), dtype=eigen_dtype)
        if not keep_covariances:  # another rank decomposes this layer: its covariances are not needed here
            stats[name] = (None, None, D)
        return eA, QA, eS, QS

    factors = {}
    for s, (eA, QA, eS, QS) in zip(layers, distributed.owner_map([s.name for s in layers], eig, zeros, owners)):
        A, S, D = stats.pop(s.name)
        if A is not None:
            A, S = A.to(dtype), S.to(dtype)
        if s.name in same_input:  # the earlier layer's decomposition (already built: that layer comes first)
            first = factors[same_input[s.name]]
            eA, QA = first.eig_A, first.Q_A
        QA = QA if kinds[s.name].input_basis else None
        factors[s.name] = LayerFactors(A, S, eA.clamp_min(0), QA, eS.clamp_min(0), QS, D, None)
    bar.close()
    return factors
