"""The output-side directions whose layer gradients make each curvature the Kronecker family can factor.

``"empirical_fisher"``: the loss itself (data labels); ``"fisher"``: cotangents ``∂ℓ/∂outputs`` at labels sampled
from the model (a likelihood of :mod:`ifunc.likelihood`); ``"ggn"``: the columns of ``Λ_out^{1/2}`` per position
(``C`` backward passes for ``C`` outputs: exact, costly for large vocabularies).
"""

from __future__ import annotations

import torch

from ...curvature import CURVATURES as ALL_CURVATURES
from ...grads import check_scalar
from ...likelihood import OutputLoss, resolve_likelihood, sample_with

__all__ = ["CURVATURES", "resolve", "draws"]

#: The curvatures the Kronecker family can factor (all but the full Hessian).
CURVATURES = tuple(c for c in ALL_CURVATURES if c != "hessian")


def resolve(loss, curvature, sample):
    if curvature is None:
        curvature = "fisher" if sample is not None else ("ggn" if isinstance(loss, OutputLoss) else "empirical_fisher")
    if curvature not in CURVATURES:
        raise ValueError(
            f"curvature={curvature!r} is not supported by the Kronecker family; choose one of {CURVATURES}"
        )
    if curvature != "empirical_fisher" and not isinstance(loss, OutputLoss):
        raise TypeError(
            f'curvature="{curvature}" needs the model outputs: pass loss=ifunc.output_loss(outputs, '
            'loss_on_outputs), or use curvature="empirical_fisher"'
        )
    if curvature == "fisher":
        if sample is None:
            sample = loss.likelihood  # output_loss(..., likelihood=) says how to sample too
        if sample is None:
            raise ValueError(
                'curvature="fisher" needs sample="categorical", "gaussian" or a callable '
                "sample(outputs, generator) -> dloss/doutputs at a sampled label"
            )
        sample = resolve_likelihood(sample, argument="sample")
    return curvature, sample


def _ggn_cotangents(loss: OutputLoss, out: torch.Tensor, batch) -> list[torch.Tensor]:
    """Columns of ``Λ_out^{1/2}`` per position: ``C`` cotangents with ``Σ_c u_c u_cᵀ = Λ_out``."""
    if out.dim() == 1:  # one scalar output per example: Λ_out is a number per example
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(check_scalar(loss.loss_on_outputs(o, batch)), o, create_graph=True)[0]
            h = torch.autograd.grad(g.sum(), o)[0]
        return [h.detach().clamp_min(0).sqrt()]
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(check_scalar(loss.loss_on_outputs(o, batch)), o, create_graph=True)[0]
        C = o.shape[-1]
        cols = [torch.autograd.grad(g[..., c].sum(), o, retain_graph=c < C - 1)[0] for c in range(C)]
    H = torch.stack(cols, dim=-1).detach().to(torch.float64)  # [..., C, C]
    w, Q = torch.linalg.eigh((H + H.transpose(-1, -2)) / 2)
    root = (Q * w.clamp_min(0).sqrt()[..., None, :]) @ Q.transpose(-1, -2)
    return [root[..., :, c].to(out.dtype) for c in range(C)]


def draws(loss, p, batch, curvature, sample, n_samples, gen):
    """Root tensor and ``[(cotangent or None, weight)]`` whose output-gradients give the curvature."""
    if curvature == "empirical_fisher":
        return check_scalar(loss(p, batch)), [(None, 1.0)]
    out = loss.outputs(p, batch)
    if curvature == "fisher":
        return out, [(sample_with(sample, out, gen), 1.0 / n_samples) for _ in range(n_samples)]
    return out, [(u, 1.0) for u in _ggn_cotangents(loss, out, batch)]
