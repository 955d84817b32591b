"""The output-side directions whose layer gradients make each curvature the Kronecker family can factor.

A Kronecker statistic sums outer products of layer output-gradients ``g = Jᵀ u`` over *directions* ``u`` (cotangents
on the model outputs), so the directions decide which curvature is factored:

* ``"empirical_fisher"``: one direction, the loss itself (data labels).
* ``"fisher"``: ``∂ℓ/∂outputs`` at labels sampled from the model (a likelihood of :mod:`ifunc.likelihood`),
  ``n_samples`` per example. Labels at different positions are drawn independently, so the cross terms between
  positions vanish in expectation: an unbiased estimate of the GGN (= the Fisher for these likelihoods).
* ``"ggn"``: the exact GGN ``G = Σ_p J_pᵀ Λ_p J_p``, ``Λ_p = ∇²_{out_p} ℓ`` the output Hessian of position ``p``.
  With ``C`` outputs per position its directions are the columns of ``Λ_p^{1/2}``, *one position at a time*:
  ``P·C`` backward passes for ``P`` positions per example. (A direction spanning all positions at once would add
  the cross terms ``Λ_p^{1/2} Λ_{p'}^{1/2}`` between positions, which the GGN does not have.)

Outputs ``[b]`` or ``[b, C]`` have one position per example (its full ``C × C`` Hessian is used); outputs
``[b, P_1, ..., C]`` have ``P = P_1·…`` positions with ``C`` outputs each, and the loss on outputs must be a sum
over positions (cross-entropy or squared error per token, as :func:`ifunc.causal_lm_loss`).

The default for an :func:`ifunc.output_loss` (``curvature=None``) is the exact ``"ggn"`` with one position per
example, and the sampled ``"fisher"`` (when the loss has a ``likelihood``) with several: the exact GGN costs
``P·C`` backward passes per chunk (``64 × 50,257`` for a GPT-2 context), the sampled Fisher one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch

from ...curvature import CURVATURES as ALL_CURVATURES
from ...grads import check_scalar
from ...likelihood import OutputLoss, resolve_likelihood, sample_with

__all__ = ["CURVATURES", "resolve", "draws", "positions"]

#: The curvatures the Kronecker family can factor (all but the full Hessian).
CURVATURES = tuple(c for c in ALL_CURVATURES if c != "hessian")

#: Backward passes per chunk above which the exact GGN warns (and names the sampled Fisher).
GGN_PASSES_WARN = 1024


def positions(out: torch.Tensor) -> int:
    """Output positions per example: 1 for ``[b]`` and ``[b, C]``, ``P_1·…`` for ``[b, P_1, ..., C]``."""
    return 1 if out.dim() <= 2 else math.prod(out.shape[1:-1])


def resolve(loss, curvature, sample, *, probe=None):
    """``(curvature, sampler)`` checked; the default of an ``output_loss`` is decided on its outputs' shape.

    ``probe=(params, batch)``: where to evaluate the outputs (without gradients). Without it, the default of an
    ``output_loss`` without ``sample`` stays open: ``(None, None)``.
    """
    if curvature is None:
        if sample is not None:
            curvature = "fisher"
        elif not isinstance(loss, OutputLoss):
            curvature = "empirical_fisher"
        elif probe is None:
            return None, None
        elif loss.likelihood is not None and _probe_positions(loss, *probe) > 1:
            curvature = "fisher"  # several positions: the sampled Fisher (one backward) estimates the GGN unbiasedly
        else:
            curvature = "ggn"
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


def _probe_positions(loss: OutputLoss, params, batch) -> int:
    with torch.no_grad():
        return positions(loss.outputs(params, batch))


def _output_hessian_root(loss: OutputLoss, out: torch.Tensor, batch) -> torch.Tensor:
    """``R [..., C, C]`` with ``R Rᵀ = Λ`` per position (``[b, 1, 1]`` for scalar outputs ``[b]``)."""
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(check_scalar(loss.loss_on_outputs(o, batch)), o, create_graph=True)[0]
        if out.dim() == 1:  # one scalar output per example: Λ is a number per example
            h = torch.autograd.grad(g.sum(), o)[0]
            return h.detach().clamp_min(0).sqrt()[:, None, None]
        C = o.shape[-1]
        cols = [torch.autograd.grad(g[..., c].sum(), o, retain_graph=c < C - 1)[0] for c in range(C)]
    H = torch.stack(cols, dim=-1).detach().to(torch.float64)  # [..., C, C]
    w, Q = torch.linalg.eigh((H + H.transpose(-1, -2)) / 2)
    return ((Q * w.clamp_min(0).sqrt()[..., None, :]) @ Q.transpose(-1, -2)).to(out.dtype)


class _GGNDirections:
    """The exact GGN's directions, made one at a time: column ``c`` of ``Λ_p^{1/2}`` placed at position ``p`` only."""

    def __init__(self, out: torch.Tensor, root: torch.Tensor):
        self.shape, self.root = out.shape, root
        self.P, self.C = positions(out), root.shape[-1]

    def __len__(self) -> int:
        return self.P * self.C

    def __iter__(self) -> Iterator[tuple[torch.Tensor, float]]:
        if len(self.shape) <= 2:  # one position: a column spans the example's outputs
            for c in range(self.C):
                yield self.root[..., :, c].reshape(self.shape), 1.0
            return
        b = self.shape[0]
        root = self.root.reshape(b, self.P, self.C, self.C)
        for p in range(self.P):
            for c in range(self.C):
                u = root.new_zeros(b, self.P, self.C)
                u[:, p] = root[:, p, :, c]
                yield u.reshape(self.shape), 1.0


def draws(loss, p, batch, curvature, sample, n_samples, gen):
    """Root tensor and the directions ``[(cotangent or None, weight)]`` (a sized iterable) giving the curvature."""
    if curvature == "empirical_fisher":
        return check_scalar(loss(p, batch)), [(None, 1.0)]
    out = loss.outputs(p, batch)
    if curvature == "fisher":
        return out, [(sample_with(sample, out, gen), 1.0 / n_samples) for _ in range(n_samples)]
    directions = _GGNDirections(out, _output_hessian_root(loss, out, batch))
    if len(directions) > GGN_PASSES_WARN:
        warnings.warn(
            f'curvature="ggn" is exact: {len(directions)} backward passes per chunk ({directions.P} positions x '
            f"{directions.C} outputs). The sampled Fisher estimates the same curvature with one: "
            'curvature="fisher" (output_loss(..., likelihood="categorical") or sample=...)',
            stacklevel=4,
        )
    return out, directions
