"""Kronecker-family iHVPs: EK-FAC, K-FAC, diagonal and identity, block-diagonal over layers.

Every method approximates the curvature block of a tracked layer (weight matrix ``[out, in]``, a tracked
bias as an extra column) in an eigenbasis ``Q_S ⊗ Q_A`` with eigenvalues ``Λ [out, in(+1)]``:

* EK-FAC: ``Q_A, Q_S`` eigenvectors of ``A = E[a aᵀ]`` and ``S = E[g gᵀ]``, ``Λ = E[(Q_Sᵀ DW Q_A)²]``;
* K-FAC: the same bases, ``Λ = λ_S λ_Aᵀ`` (so ``G ≈ A ⊗ S``);
* diagonal: identity bases, ``Λ = E[DW²]`` (the diagonal of the curvature);
* identity: ``Λ = 0``, so the closure is ``v / λ``.

The damped inverse is ``(Q_S ⊗ Q_A)(Λ + λ)^{-1}(Q_S ⊗ Q_A)ᵀ``, applied to a layer's slice ``V`` as
``Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` (an ``nn.Embedding`` named in ``modules=``: ``Q_A`` the identity, ``A`` its
token frequencies). Parameters no supported layer covers (LayerNorm, embeddings not named, other
biases) get a diagonal block ``1 / (E[(∂ℓ/∂θ)²] + λ)``; excluded parameters get a zero block (no
influence). ``ihvp.info["blocks"]`` maps each parameter name to ``(method, module)``.
``damping=None`` uses the one damping rule per block, ``λ_l = 0.1 × mean(Λ_l)`` per layer (and per diagonal
block, :func:`~ifunc.ihvp._damping.block_damping`), and every block passes the one conditioning check
(:func:`~ifunc.ihvp._damping.check_conditioning`); ``with_damping(λ)`` re-damps every block with one λ without
refitting. Normalisation of ``A, S, Λ``: per example, see
:mod:`ifunc.ihvp.kronecker.fit`.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from ..._types import Params
from ...functional import structure
from .._base import IHVP, summary
from .._damping import block_damping, check_conditioning, check_damping
from .._scorer import solve_dtype
from ._kernels import damped_div
from .blocks import DiagBlock, KronBlock, gather, precondition_layer, scatter
from .scorer import KroneckerScorer

__all__ = ["KroneckerIHVP", "build_closure"]


class KroneckerIHVP(IHVP):
    """The closure of the Kronecker family: block-diagonal, one block per layer and per other parameter.

    Besides being an :class:`IHVP`, it exposes what the fast scorers of :func:`ifunc.attribute` need:
    ``model`` (None: no captured scoring), ``blocks`` (layer blocks, :class:`KronBlock`), ``diags``
    (diagonal blocks, :class:`DiagBlock`), ``block_damping`` / ``diag_damping`` (λ of each), ``modules``
    (group names in ``per_module`` order), ``dtype`` and ``device``. ``damping`` is the one λ of every
    block, or a mapping block name -> λ when ``damping=None`` chose one per block.
    """

    FIELDS = ("model", "blocks", "diags", "block_damping", "diag_damping", "modules", "probe")
    model: Any
    blocks: tuple[KronBlock, ...]
    diags: tuple[DiagBlock, ...]
    block_damping: tuple[float, ...]
    diag_damping: tuple[float, ...]
    modules: tuple[str, ...]
    #: ``id(callable) -> UseCheck``: what :func:`~ifunc.ihvp.kronecker.capture.probe_layers` found of each loss or
    #: measurement's use of the layers (example dims, weight uses), from the fit or from the first capture of that
    #: callable for scoring; shared by the closures ``with_damping`` makes
    probe: dict

    def _curvature_summary(self) -> dict[str, list]:
        """The base summaries, then ``"layer {name}"`` of each layer block's eigenvalues ``Λ`` and ``"diagonal
        {name}"`` of each diagonal block."""
        out = super()._curvature_summary()
        out.update({f"layer {b.spec.name}": summary(b.eigenvalues) for b in self.blocks})
        out.update({f"diagonal {d.name}": summary(d.diag) for d in self.diags})
        return out

    def describe(self) -> dict[str, Any]:
        """:meth:`IHVP.describe`, with ``"damping"`` the λ of every block, ``{block name: λ}`` (also after
        ``with_damping`` gave them one λ) and the layer and diagonal blocks in ``"curvature"``.

        ``eigen_dtype`` is recorded only when it is not float64: factors that do not record it were decomposed in
        float64 (the default before the params' precision was), so a store written from them resumes with float64
        factors, and one written with float32 bases is told apart."""
        per_block = self.info["damping"]
        out = {**super().describe(), "damping": {k: float(v) for k, v in per_block.items()}}
        if out["method_info"].get("eigen_dtype") in (None, "float64"):
            out["method_info"].pop("eigen_dtype", None)
        return out

    def scorer(self, loss, params, options):
        """The captured-contraction scorer (:class:`KroneckerScorer`) with a ``model``, else the generic one."""
        if self.model is None:
            return super().scorer(loss, params, options)
        return KroneckerScorer(self, loss, params, options)

    def __repr__(self) -> str:
        lam = "per-layer" if isinstance(self.damping, dict) else f"{self.damping:g}"
        return f"IHVP({self.name}, d={self.dim}, damping={lam})"


def build_closure(name: str, params: Params, blocks, diags, model, damping, extra_info, *, check=None) -> KroneckerIHVP:
    """The closure over ``blocks`` and ``diags``; ``check``: the fit's :class:`~.capture.UseCheck` of its loss."""
    unflatten = structure(params)  # no copy of the parameters: the closure keeps only their layout, dtype, device
    first = optree.tree_leaves(params, namespace="ifunc")[0]
    dtype = solve_dtype(first.dtype)  # of the factors and the solve: float32 for a half-precision model
    like = first.new_zeros((), dtype=dtype)
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
        layers = [(b.eigenvalues, f"the block of layer {b.spec.name!r}") for b in blocks]
        others = [(d.diag, f"the block of parameter {d.name!r}") for d in diags]
        bl = tuple(block_damping(values, lam, what, who=name) for values, what in layers)
        dl = tuple(block_damping(values, lam, what, who=name) for values, what in others)
        diagonal = [b.Q_S is None and b.Q_A is None for b in blocks] + [True] * len(diags)  # v / (w + λ), exact
        for (values, what), l_, plain in zip(layers + others, bl + dl, diagonal):
            check_conditioning(values, l_, dtype, who=name, what=what, elementwise=plain)

        def solve(V: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(V)
            for blk, lam_l in zip(blocks, bl):
                scatter(out, blk, precondition_layer(blk, gather(V, blk), lam_l))
            for d, lam_d in zip(diags, dl):
                out[:, d.sl] = damped_div(V[:, d.sl], d.diag, lam_d)
            return out

        per_block = {**{b.spec.name: l_ for b, l_ in zip(blocks, bl)}, **{d.name: l_ for d, l_ in zip(diags, dl)}}
        info = dict(extra_info, modules=groups, damping=per_block)
        return KroneckerIHVP.make(
            solve,
            name=name,
            damping=check_damping(lam) if lam is not None else per_block,  # a float, as for every method
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
