"""Kronecker-family iHVPs: EK-FAC, K-FAC, diagonal and identity, block-diagonal over layers.

Every method approximates the curvature block of a tracked layer (weight matrix ``[out, in]``, a tracked
bias as an extra column) in an eigenbasis ``Q_S ⊗ Q_A`` with eigenvalues ``Λ [out, in(+1)]``:

* EK-FAC: ``Q_A, Q_S`` eigenvectors of ``A = E[a aᵀ]`` and ``S = E[g gᵀ]``, ``Λ = E[(Q_Sᵀ DW Q_A)²]``;
* K-FAC: the same bases, ``Λ = λ_S λ_Aᵀ`` (so ``G ≈ A ⊗ S``);
* diagonal: identity bases, ``Λ = E[DW²]`` (the diagonal of the curvature);
* identity: ``Λ = 0``, so the closure is ``v / λ``.

The damped inverse is ``(Q_S ⊗ Q_A)(Λ + λ)^{-1}(Q_S ⊗ Q_A)ᵀ``, applied to a layer's slice ``V`` as
``Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ``. Parameters no supported layer covers (LayerNorm, embeddings, other
biases) get a diagonal block ``1 / (E[(∂ℓ/∂θ)²] + λ)``; excluded parameters get a zero block (no
influence). ``ihvp.info["blocks"]`` maps each parameter name to ``(method, module)``.
``damping=None`` uses ``λ_l = 0.1 × mean(Λ_l)`` per layer (and per diagonal block); ``with_damping(λ)``
re-damps every block with one λ without refitting. Normalisation of ``A, S, Λ``: per example, see
:mod:`ifunc.ihvp.kronecker.fit`.
"""

from __future__ import annotations

import warnings

import optree
import torch

from ..._types import Params
from ...functional import structure
from .._base import IHVP, check_damping
from ._kernels import damped_div
from .blocks import DiagBlock, KronBlock, gather, precondition_layer, scatter

__all__ = ["KroneckerIHVP", "build_closure"]


def _check_conditioning(name: str, what: str, eigenvalues: torch.Tensor, lam: float, dtype: torch.dtype) -> None:
    """Refuse a block whose damped inverse does not exist; warn when ``dtype`` cannot solve it accurately.

    With ``c = (λ_max + λ) / (λ_min + λ)``: ``λ_min + λ <= 0`` or ``c >= 1 / (100 eps)`` with ``λ = 0`` raises
    (the inverse is dominated by rounding: values of order ``1 / eps``); ``c >= 1 / (100 eps)`` with ``λ > 0``
    warns (only about two digits survive).
    """
    if not eigenvalues.numel():
        return
    low, high = float(eigenvalues.min()) + lam, float(eigenvalues.max()) + lam
    limit = 1.0 / (100 * torch.finfo(dtype).eps)
    if not low > 0 or (lam == 0 and high / low >= limit):
        raise ValueError(
            f"{name}: {what} is singular at damping {lam:g} (smallest eigenvalue {low - lam:.3e}, largest "
            f"{high - lam:.3e}); its inverse does not exist in {dtype}: use damping > 0 (damping=None picks 0.1 × "
            "the mean eigenvalue per block)"
        )
    if high / low >= limit:
        warnings.warn(
            f"{name}: {what} has damped condition number {high / low:.3e}, beyond what {dtype} solves accurately; "
            "use float64 or raise damping",
            stacklevel=4,
        )


def _auto(values: torch.Tensor, damping, what: str) -> float:
    if damping is not None:
        return check_damping(damping)
    lam = 0.1 * float(values.mean()) if values.numel() else 0.0
    if not lam > 0:
        raise ValueError(
            f"damping=None: the mean eigenvalue of {what} is {lam * 10:.3e}, so the 0.1 × mean "
            "heuristic gives no damping; pass damping= explicitly"
        )
    return lam


class KroneckerIHVP(IHVP):
    """The closure of the Kronecker family: block-diagonal, one block per layer and per other parameter.

    Besides being an :class:`IHVP`, it exposes what the fast scorers of :func:`ifunc.attribute` need:
    ``model`` (None: no captured scoring), ``blocks`` (layer blocks, :class:`KronBlock`), ``diags``
    (diagonal blocks, :class:`DiagBlock`), ``block_damping`` / ``diag_damping`` (λ of each), ``modules``
    (group names in ``per_module`` order), ``dtype`` and ``device``. ``damping`` is the one λ of every
    block, or a mapping block name -> λ when ``damping=None`` chose one per block.
    """

    def __init__(
        self,
        solve,
        *,
        name,
        damping,
        unflatten,
        like,
        rebuild,
        info,
        model,
        blocks,
        diags,
        block_damping,
        diag_damping,
        modules,
        probe,
    ):
        super().__init__(solve, name=name, damping=damping, unflatten=unflatten, like=like, rebuild=rebuild, info=info)
        self.model = model
        self.blocks: tuple[KronBlock, ...] = blocks
        self.diags: tuple[DiagBlock, ...] = diags
        self.block_damping: tuple[float, ...] = block_damping
        self.diag_damping: tuple[float, ...] = diag_damping
        self.modules: tuple[str, ...] = modules
        #: ``id(callable) -> UseCheck``: what :func:`~ifunc.ihvp.kronecker.capture.probe_layers` found of each loss or
        #: measurement's use of the layers (example dims, weight uses), from the fit or from the first capture of that
        #: callable for scoring; shared by the closures ``with_damping`` makes
        self.probe: dict = probe

    def __repr__(self) -> str:
        lam = "per-layer" if isinstance(self.damping, dict) else f"{self.damping:g}"
        return f"IHVP({self.name}, d={self.dim}, damping={lam})"


def build_closure(name: str, params: Params, blocks, diags, model, damping, extra_info, *, check=None) -> KroneckerIHVP:
    """The closure over ``blocks`` and ``diags``; ``check``: the fit's :class:`~.capture.UseCheck` of its loss."""
    unflatten = structure(params)  # no copy of the parameters: the closure keeps only their layout, dtype, device
    first = optree.tree_leaves(params, namespace="ifunc")[0]
    dtype, like = first.dtype, first.new_zeros(())
    blocks = tuple(
        b._replace(
            Q_S=None if b.Q_S is None else b.Q_S.to(dtype),
            Q_A=None if b.Q_A is None else b.Q_A.to(dtype),
            eigenvalues=b.eigenvalues.to(dtype),
        )
        for b in blocks
    )
    diags = tuple(d._replace(diag=d.diag.to(dtype)) for d in diags)
    groups = tuple(dict.fromkeys([b.spec.name for b in blocks] + [d.group for d in diags]))
    probe = {} if check is None else {id(check.func): check}

    def rebuild(lam) -> KroneckerIHVP:
        bl = tuple(_auto(b.eigenvalues, lam, f"layer {b.spec.name!r}") for b in blocks)
        dl = tuple(_auto(d.diag, lam, f"parameter {d.name!r}") for d in diags)
        for blk, l_ in zip(blocks, bl):
            _check_conditioning(name, f"layer {blk.spec.name!r}", blk.eigenvalues, l_, dtype)
        for d, l_ in zip(diags, dl):
            _check_conditioning(name, f"parameter {d.name!r}", d.diag, l_, dtype)

        def solve(V: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(V)
            for blk, lam_l in zip(blocks, bl):
                scatter(out, blk, precondition_layer(blk, gather(V, blk), lam_l))
            for d, lam_d in zip(diags, dl):
                out[:, d.sl] = damped_div(V[:, d.sl], d.diag, lam_d)
            return out

        per_block = {**{b.spec.name: l_ for b, l_ in zip(blocks, bl)}, **{d.name: l_ for d, l_ in zip(diags, dl)}}
        info = dict(extra_info, modules=groups, damping=per_block)
        return KroneckerIHVP(
            solve,
            name=name,
            damping=lam if lam is not None else per_block,
            unflatten=unflatten,
            like=like,
            rebuild=rebuild,
            info=info,
            model=model,
            blocks=blocks,
            diags=diags,
            block_damping=bl,
            diag_damping=dl,
            modules=groups,
            probe=probe,
        )

    return rebuild(damping)
