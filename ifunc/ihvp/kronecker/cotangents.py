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

#: With a ``likelihood=``, the default is the exact GGN only up to this many outputs per example (one position).
DEFAULT_GGN_OUTPUTS = 128


def positions(out: torch.Tensor) -> int:
    """Output positions per example: 1 for ``[b]`` and ``[b, C]``, ``P_1·…`` for ``[b, P_1, ..., C]``."""
    return 1 if out.dim() <= 2 else math.prod(out.shape[1:-1])


def resolve(loss, curvature, sample, *, probe=None):
    """``(curvature, sampler)`` checked; the default of an ``output_loss`` is decided on its outputs.

    ``probe=(params, batch)``: where to evaluate the outputs. Without it, the default of an ``output_loss``
    without ``sample`` stays open: ``(None, None)``. The default is the sampled ``"fisher"`` when the loss has a
    ``likelihood``, sums over positions, and has several positions or more than :data:`DEFAULT_GGN_OUTPUTS`
    outputs per example; otherwise the exact ``"ggn"``.
    """
    if curvature is None:
        if sample is not None:
            curvature = "fisher"
        elif not isinstance(loss, OutputLoss):
            curvature = "empirical_fisher"
        elif probe is None:
            return None, None
        else:
            curvature = "fisher" if loss.likelihood is not None and _sampling_is_cheaper(loss, *probe) else "ggn"
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


def _sampling_is_cheaper(loss: OutputLoss, params, batch) -> bool:
    """Several positions (of a loss summed over them) or many outputs: the exact GGN would cost ``P·C`` passes."""
    with torch.no_grad():
        out = loss.outputs(params, batch)
    P = positions(out)
    if P > 1:  # a likelihood per position only matches a loss that is a sum over positions
        return not coupled(coupling(loss, out, batch), out.dtype)
    return out.dim() == 2 and out.shape[-1] > DEFAULT_GGN_OUTPUTS


def coupling(loss: OutputLoss, out: torch.Tensor, batch) -> float:
    """How much the loss on outputs couples the positions of an example: 0 for a sum over positions.

    One Hessian-vector product: ``u = H (r ⊙ 1_S)`` for a random ``r`` and a random half ``S`` of the positions
    (seeded, the global RNG untouched); a block-diagonal ``H`` leaves ``u`` zero outside ``S``. Returns
    ``‖u outside S‖ / ‖u‖`` (0 for one position).
    """
    if positions(out) == 1:
        return 0.0
    b, C = out.shape[0], out.shape[-1]
    gen = torch.Generator(device=out.device).manual_seed(0)
    r = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    half = (torch.rand(out.shape[:-1], generator=gen, device=out.device) < 0.5).to(out.dtype)[..., None]
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(check_scalar(loss.loss_on_outputs(o, batch)), o, create_graph=True)[0]
        u = torch.autograd.grad((g * r * half).sum(), o, allow_unused=True)[0]
    if u is None:
        return 0.0
    total = float(u.norm())
    return 0.0 if total == 0.0 else float((u * (1 - half)).reshape(b, -1, C).norm()) / total


def coupled(mixed: float, dtype: torch.dtype) -> bool:
    """A :func:`coupling` beyond rounding."""
    return mixed > 100 * torch.finfo(dtype).eps


def _hessian_root(loss: OutputLoss, out: torch.Tensor, batch, *, full: bool) -> torch.Tensor:
    """``R`` with ``R Rᵀ = Λ``: per position ``[b, P, C, C]``, or per example ``[b, M, M]`` (``full``, ``M = P·C``)."""
    b = out.shape[0]
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(check_scalar(loss.loss_on_outputs(o, batch)), o, create_graph=True)[0]
        if out.dim() == 1:  # one scalar output per example: Λ is a number per example
            h = torch.autograd.grad(g.sum(), o)[0]
            return h.detach().clamp_min(0).sqrt()[:, None, None]
        if full or out.dim() == 2:  # columns of the example's whole output Hessian
            flat = g.reshape(b, -1)
            M = flat.shape[1]
            cols = [torch.autograd.grad(flat[:, m].sum(), o, retain_graph=m < M - 1)[0].reshape(b, M) for m in range(M)]
        else:  # a sum over positions: one C x C block per position
            C = o.shape[-1]
            cols = [torch.autograd.grad(g[..., c].sum(), o, retain_graph=c < C - 1)[0] for c in range(C)]
            cols = [c.reshape(b, -1, C) for c in cols]
    H = torch.stack(cols, dim=-1).detach().to(torch.float64)  # [b, M, M] or [b, P, C, C]
    w, Q = torch.linalg.eigh((H + H.transpose(-1, -2)) / 2)
    return ((Q * w.clamp_min(0).sqrt()[..., None, :]) @ Q.transpose(-1, -2)).to(out.dtype)


class _GGNDirections:
    """The exact GGN's directions, made one at a time: a column of the output Hessian's root, per example
    (``root [b, M, M]``) or per position (``root [b, P, C, C]``: column ``c`` of ``Λ_p^{1/2}`` at ``p`` only)."""

    def __init__(self, shape: torch.Size, root: torch.Tensor):
        self.shape, self.root = shape, root
        self.per_position = root.dim() == 4
        self.count = root.shape[1] * root.shape[2] if self.per_position else root.shape[-1]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, float]]:
        root = self.root
        if not self.per_position:
            for m in range(root.shape[-1]):
                yield root[..., m].reshape(self.shape), 1.0
            return
        b, P, C = root.shape[:3]
        for p in range(P):
            for c in range(C):
                u = root.new_zeros(b, P, C)
                u[:, p] = root[:, p, :, c]
                yield u.reshape(self.shape), 1.0


def _ggn_directions(loss: OutputLoss, out: torch.Tensor, batch) -> _GGNDirections:
    """The exact GGN's directions for one chunk (a warning first when they are many)."""
    P, C = positions(out), (out.shape[-1] if out.dim() > 1 else 1)
    if P * C > GGN_PASSES_WARN:
        warnings.warn(
            f'curvature="ggn" is exact: {P * C} backward passes per chunk ({P} positions x {C} outputs). The sampled '
            'Fisher estimates the same curvature with one: curvature="fisher" (output_loss(..., likelihood=...) '
            "or sample=...)",
            stacklevel=5,
        )
    mixed = coupling(loss, out, batch)
    if coupled(mixed, out.dtype) and P * C > GGN_PASSES_WARN:
        raise ValueError(
            f'curvature="ggn": the loss on outputs couples the {P} positions of an example (its output Hessian is not '
            f"block-diagonal over positions: {mixed:.1%} of a product lands on other positions), so the exact GGN "
            f"needs the whole {P * C} x {P * C} output Hessian of every example. Write the loss as a sum over "
            'positions, reshape the outputs to [b, P*C] if P*C is small, or use curvature="empirical_fisher"'
        )
    return _GGNDirections(out.shape, _hessian_root(loss, out, batch, full=coupled(mixed, out.dtype)))


def draws(loss, p, batch, curvature, sample, n_samples, gen):
    """Root tensor and the directions ``[(cotangent or None, weight)]`` (a sized iterable) giving the curvature."""
    if curvature == "empirical_fisher":
        return check_scalar(loss(p, batch)), [(None, 1.0)]
    out = loss.outputs(p, batch)
    if curvature == "fisher":
        return out, [(sample_with(sample, out, gen), 1.0 / n_samples) for _ in range(n_samples)]
    return out, _ggn_directions(loss, out, batch)
