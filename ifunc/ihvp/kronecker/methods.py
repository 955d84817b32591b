"""The four Kronecker-family builders: ``ihvp_ekfac``, ``ihvp_kfac``, ``ihvp_diagonal``, ``ihvp_identity``.

Each turns fitted factors (or data, fitted here) into the blocks of a :class:`KroneckerIHVP`: EK-FAC keeps the
eigenbases and the fitted ``Λ``, K-FAC the eigenvalue products ``λ_S λ_Aᵀ``, diagonal the diagonal ``E[DW²]``,
identity zeros (so ``v / λ``); see :mod:`.closure` for the closure itself.
"""

from __future__ import annotations

import optree
import torch
from torch import nn

from ..._types import Data, LossFn, Params
from .._base import IHVP
from .._damping import check_damping
from .blocks import DiagBlock, KronBlock, layout
from .closure import build_closure
from .factors import KroneckerFactors
from .fit import fit_checked, split_excluded
from .layers import dict_parameter_names, find_layers

__all__ = ["ihvp_ekfac", "ihvp_kfac", "ihvp_diagonal", "ihvp_identity"]


def _blocks_info(params, factors: KroneckerFactors, method: str) -> dict[str, tuple[str, str | None]]:
    info = {}
    for s in factors.layers:
        for p in (s.weight, s.bias):
            if p:
                info[p] = (method, s.name)
    for p in factors.fallback:
        info[p] = ("diagonal", p.rsplit(".", 1)[0] if "." in p else "")
    for p in factors.excluded:
        info[p] = ("excluded", None)
    return {p: info[p] for p in dict_parameter_names(params) if p in info}


def _from_factors(method: str, params, factors: KroneckerFactors, model, damping, check=None) -> IHVP:
    if not isinstance(factors, KroneckerFactors):
        raise TypeError(
            f"expected data or KroneckerFactors from ifunc.fit_kronecker_factors, got {type(factors).__name__}"
        )
    lay = layout(params)
    missing = [p for s in factors.layers for p in (s.weight, s.bias) if p and p not in lay]
    missing += [p for p in factors.fallback if p not in lay]
    if missing:
        raise ValueError(f"the factors were fitted for parameters {missing} that are not in params; refit them")
    blocks = []
    for s in factors.layers:
        f = factors.factors[s.name]
        if method == "ekfac":
            if f.ekfac is None:
                raise ValueError("these factors have no EK-FAC eigenvalues: refit with ekfac=True, or use ihvp_kfac")
            blk = (f.Q_S, f.Q_A, f.ekfac)
        elif method == "kfac":
            blk = (f.Q_S, f.Q_A, torch.outer(f.eig_S, f.eig_A))
        else:
            if f.diag is None:
                raise ValueError("these factors have no diagonal: refit with fit_kronecker_factors(..., diagonal=True)")
            blk = (None, None, f.diag)
        blocks.append(KronBlock(s, lay[s.weight], lay[s.bias] if s.bias else None, *blk))
    diags = [
        DiagBlock(p, p.rsplit(".", 1)[0] if "." in p else "", lay[p], v.reshape(-1))
        for p, v in factors.fallback.items()
    ]
    info = {
        "blocks": _blocks_info(params, factors, method),
        "curvature": factors.curvature,
        "n": factors.n,
        "eigen_dtype": factors.eigen_dtype,  # the factors' eigendecompositions' dtype (None: not recorded)
    }
    return build_closure(method, params, blocks, diags, model, damping, info, check=check)


def _factors(loss, params, data_or_factors, model, ekfac, kwargs, diagonal=False):
    """``(factors, the fit's UseCheck of loss or None)``: the given factors, or fitted from data."""
    if isinstance(data_or_factors, KroneckerFactors):
        if kwargs:
            raise TypeError(f"{sorted(kwargs)} configure fitting; they cannot be used with precomputed factors")
        return data_or_factors, None
    if model is None:
        raise TypeError("the Kronecker family needs model= (the nn.Module your loss calls) to capture layers")
    # D = E[DW²] only where it is used; A and S are not kept (the closures use their eigendecompositions)
    kwargs = {"diagonal": diagonal, "keep_covariances": False, **kwargs}
    return fit_checked(loss, params, data_or_factors, model=model, ekfac=ekfac, **kwargs)


_FIT_DOC = """
    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch, running ``model`` via :func:`ifunc.call`
        (an :func:`ifunc.output_loss` for ``curvature="ggn"`` / ``"fisher"``).
      params: dict from :func:`ifunc.params_of` (names map parameters to layers).
      data: batch, list of batches, Dataset or DataLoader — or :class:`KroneckerFactors` from
        :func:`ifunc.fit_kronecker_factors` (no refit).
      model: the ``nn.Module`` the loss calls (hooks attached during fitting, always removed); also
        enables the fast Kronecker scoring in :func:`ifunc.attribute`.
      damping: λ >= 0 for every block, or ``None`` for ``0.1 × mean eigenvalue`` per block.
      **fit_kwargs: ``modules``, ``exclude``, ``curvature``, ``sample``, ``n_samples``, ``generator``,
        ``fallback``, ``chunk_size``, ``eigen_dtype`` of :func:`ifunc.fit_kronecker_factors`.

    Returns:
      :class:`IHVP` closure (flat ``[d]``, ``[k, d]`` or pytree); ``info["blocks"]`` says which block handles
      each parameter, ``info["damping"]`` the λ of each block, ``info["eigen_dtype"]`` the dtype the factors'
      eigendecompositions ran in (``"float32"`` / ``"float64"``; None: factors that do not record it).
"""


def _fit_doc(f):
    """Insert the shared Args/Returns section at the ``{FIT_ARGS}`` line of ``f``'s docstring."""
    f.__doc__ = f.__doc__.replace("    {FIT_ARGS}\n", _FIT_DOC + "\n")
    return f


@_fit_doc
def ihvp_ekfac(
    loss: LossFn,
    params: Params,
    data: Data | KroneckerFactors,
    *,
    model: nn.Module | None = None,
    damping: float | None = None,
    **fit_kwargs,
) -> IHVP:
    """EK-FAC: ``v -> (G + λI)^{-1} v`` with ``G`` block-diagonal, each layer ``(Q_S ⊗ Q_A) Λ (Q_S ⊗ Q_A)ᵀ``.

    ``Λ = E[(Q_Sᵀ DW Q_A)²]`` is the best diagonal in the K-FAC eigenbasis (George et al. 2018), so the
    layer block is never farther from the true one (Frobenius) than K-FAC's. Fit: two passes over the
    data, eigendecompositions of ``A [in, in]`` and ``S [out, out]``; each call costs
    ``O(k (out² in + out in²))`` per layer.
    {FIT_ARGS}
    Example:
      >>> ihvp = ifunc.ihvp_ekfac(loss, params, loader, model=model, curvature="empirical_fisher")
      >>> scores = ifunc.attribute(loss, params, ihvp, train, query)   # fast Kronecker scoring

    References:
      George et al. (2018), "Fast approximate natural gradient descent in a Kronecker-factored eigenbasis";
      Grosse et al. (2023), "Studying large language model generalization with influence functions".
    """
    fitted, check = _factors(loss, params, data, model, True, fit_kwargs)
    return _from_factors("ekfac", params, fitted, model, damping, check)


@_fit_doc
def ihvp_kfac(
    loss: LossFn,
    params: Params,
    data: Data | KroneckerFactors,
    *,
    model: nn.Module | None = None,
    damping: float | None = None,
    **fit_kwargs,
) -> IHVP:
    """K-FAC: ``v -> (A ⊗ S + λI)^{-1} v`` per layer, via the eigenbases of ``A`` and ``S``.

    ``(A ⊗ S + λI)^{-1} vec(V) = vec(Q_S [(Q_Sᵀ V Q_A) / (λ_S λ_Aᵀ + λ)] Q_Aᵀ)``; one pass over the data.
    {FIT_ARGS}
    Example:
      >>> ihvp = ifunc.ihvp_kfac(loss, params, loader, model=model, sample="categorical")

    References:
      Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored approximate curvature";
      Grosse & Martens (2016) for convolutions.
    """
    fitted, check = _factors(loss, params, data, model, False, fit_kwargs)
    return _from_factors("kfac", params, fitted, model, damping, check)


@_fit_doc
def ihvp_diagonal(
    loss: LossFn,
    params: Params,
    data: Data | KroneckerFactors,
    *,
    model: nn.Module | None = None,
    damping: float | None = None,
    **fit_kwargs,
) -> IHVP:
    """Diagonal: ``v -> v / (diag(F) + λ)`` with ``diag(F) = E[(∂ℓ/∂θ)²]`` per parameter.

    ``F`` is the curvature chosen by ``curvature=`` (default the empirical Fisher for a plain loss, the
    GGN diagonal for an ``output_loss``); layer weights use captured ``E[(Σ_t g_t a_tᵀ)²]``, other
    parameters per-example gradients.
    {FIT_ARGS}
    Example:
      >>> ihvp = ifunc.ihvp_diagonal(loss, params, loader, model=model, curvature="empirical_fisher")
    """
    fitted, check = _factors(loss, params, data, model, False, fit_kwargs, True)
    return _from_factors("diagonal", params, fitted, model, damping, check)


def ihvp_identity(
    params: Params, *, model: nn.Module | None = None, modules=None, damping: float | None = None, exclude=()
) -> IHVP:
    """Identity curvature: ``v -> v / λ`` (``damping=None`` means λ = 1: plain gradient dot products).

    With ``model`` the blocks follow its supported layers (``modules=`` chooses them; other parameters
    form diagonal blocks), which enables fast Kronecker scoring and ``per_module=True`` in
    :func:`ifunc.attribute`; scores are then ``∇f(z_q)ᵀ ∇ℓ(z_i) / λ``. ``exclude=`` names parameters (or
    modules) to leave out: zero block, no influence (as in :func:`ihvp_ekfac`). With no data at build, the layers'
    example dimensions and the uses of their weights are checked on the first batch the scoring captures
    (:func:`~ifunc.ihvp.kronecker.capture.probe_layers`), as for closures built from saved factors.

    Example:
      >>> ihvp = ifunc.ihvp_identity(params)          # TracIn-style dot products, one checkpoint
    """
    lam = 1.0 if damping is None else check_damping(damping, allow_zero=False)
    lay = layout(params)
    names, excl, kept = split_excluded(params, exclude)
    if model is None:
        if modules is not None:
            raise ValueError("ihvp_identity: modules= chooses layers of model=; pass model= too, or drop modules=")
        layers, uncovered = [], [p for p in names if p not in excl]
    else:
        layers, uncovered = find_layers(model, kept, modules=modules)
    zero = optree.tree_leaves(params, namespace="ifunc")[0].new_zeros(())  # dtype and device of the zero blocks
    # the blocks' zero curvature is one 0 broadcast (stride 0): a closure kept for its layer specs (a gradient
    # index's query capture) holds no parameter-sized tensors
    blocks = [
        KronBlock(
            s,
            lay[s.weight],
            lay[s.bias] if s.bias else None,
            None,
            None,
            zero.expand(s.out_features, s.in_features + (s.bias is not None)),
        )
        for s in layers
    ]
    diags = [
        DiagBlock(p, p.rsplit(".", 1)[0] if "." in p else "", lay[p], zero.expand(params[p].numel())) for p in uncovered
    ]
    fallback = {d.name: d.diag.view(params[d.name].shape) for d in diags}  # zero curvature, parameter's shape
    factors = KroneckerFactors(tuple(layers), {}, fallback, excl, 0, "identity")
    info = {"blocks": _blocks_info(params, factors, "identity"), "curvature": "identity"}
    out = build_closure("identity", params, blocks, diags, model if layers else None, lam, info)
    return out
