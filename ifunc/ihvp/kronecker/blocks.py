"""The blocks of a Kronecker-family closure and their products on flat vectors.

A layer block holds eigenbases ``Q_S, Q_A`` (each None: the identity; an embedding's ``Q_A`` always is) and
eigenvalues ``Λ [out, in(+1)]``; its damped inverse on the layer's slice ``V`` (as a matrix, bias last column) is
``Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ``.
A diagonal block holds one parameter's curvature diagonal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._types import Params
from ._kernels import damped_div
from .layers import LayerSpec, dict_parameter_names, kind_of

__all__ = [
    "KronBlock",
    "DiagBlock",
    "layout",
    "gather",
    "scatter",
    "to_eigenbasis",
    "from_eigenbasis",
    "precondition_layer",
]


class KronBlock(NamedTuple):
    spec: LayerSpec
    w: slice  #: flat slice of the weight
    b: slice | None  #: flat slice of the bias
    Q_S: torch.Tensor | None  #: None = identity basis
    Q_A: torch.Tensor | None
    eigenvalues: torch.Tensor  #: ``[out, in(+1)]`` the block's eigenvalues Λ in the basis ``Q_S ⊗ Q_A``


class DiagBlock(NamedTuple):
    name: str  #: parameter name
    group: str  #: owning module name
    sl: slice
    diag: torch.Tensor  #: flat ``[numel]``


def layout(params: Params) -> dict[str, slice]:
    """Flat slice of every parameter, in :func:`ifunc.flatten` order."""
    out, start = {}, 0
    for name in dict_parameter_names(params):
        size = params[name].numel()
        out[name] = slice(start, start + size)
        start += size
    return out


def gather(V: torch.Tensor, blk: KronBlock) -> torch.Tensor:
    """Flat ``[k, d]`` -> the layer's matrices ``[k, out, in(+1)]``."""
    k, s = V.shape[0], blk.spec
    W = kind_of(s).to_matrix(V[:, blk.w], s.out_features, s.in_features)
    if blk.b is not None:
        W = torch.cat([W, V[:, blk.b].reshape(k, s.out_features, 1)], dim=2)
    return W


def scatter(out: torch.Tensor, blk: KronBlock, M: torch.Tensor) -> None:
    """Inverse of :func:`gather`: write ``[k, out, in(+1)]`` into the flat ``[k, d]``."""
    s = blk.spec
    out[:, blk.w] = kind_of(s).from_matrix(M[..., : s.in_features])
    if blk.b is not None:
        out[:, blk.b] = M[..., s.in_features]


def to_eigenbasis(blk: KronBlock, M: torch.Tensor) -> torch.Tensor:
    """``Q_Sᵀ M Q_A`` for ``M [k, out, in(+1)]`` (a basis None: the identity)."""
    M = M if blk.Q_S is None else blk.Q_S.T @ M
    return M if blk.Q_A is None else M @ blk.Q_A


def from_eigenbasis(blk: KronBlock, R: torch.Tensor) -> torch.Tensor:
    """``Q_S R Q_Aᵀ``, the inverse of :func:`to_eigenbasis`.

    With the identity ``Q_A`` (an embedding) a zero column of ``R`` stays zero, so ``Q_S`` multiplies only the
    columns some query uses: a query's embedding gradient is non-zero only at its own tokens (GPT-2 small: 64 of
    50,257 columns), which turns ``k·out²·vocab`` into ``k·out²·(its tokens)``.
    """
    if blk.Q_S is None:
        return R if blk.Q_A is None else R @ blk.Q_A.T
    if blk.Q_A is not None:
        return blk.Q_S @ R @ blk.Q_A.T
    used = R.ne(0).any(dim=1).any(dim=0).nonzero().squeeze(1)
    out = torch.zeros_like(R)
    out[:, :, used] = blk.Q_S @ R[:, :, used]
    return out


def precondition_layer(blk: KronBlock, M: torch.Tensor, lam: float) -> torch.Tensor:
    """``Q_S [(Q_Sᵀ M Q_A) / (Λ + λ)] Q_Aᵀ`` for ``M [k, out, in(+1)]``."""
    return from_eigenbasis(blk, damped_div(to_eigenbasis(blk, M), blk.eigenvalues, lam))
