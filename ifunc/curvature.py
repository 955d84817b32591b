"""Curvature products of the mean training loss: Hessian- and Gauss-Newton-vector products, dense matrices.

Normalisation: with ``loss(params, batch)`` the loss of a batch **summed** over its examples and ``n`` the
total number of examples in ``data``, the curvature is that of the *mean* loss,
``H = (1/n) Σ_batches ∇² loss(θ, batch)``. Several batches are therefore averaged, never inverted one by one.

The Gauss-Newton matrix needs the split "model outputs" / "loss on outputs": give the loss as
``ifunc.output_loss(outputs, loss_on_outputs)``, then ``G = (1/n) Σ Jᵀ Λ J`` with ``J = ∂outputs/∂θ`` and
``Λ = ∇²_out loss_on_outputs`` (PSD for convex losses such as cross-entropy and squared error).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import grad, jvp, vjp, vmap

from ._data import DataSource
from ._types import Batch, Data, LossFn, Params
from .functional import Unflatten, flatten

__all__ = ["output_loss", "OutputLoss", "curvature_operator", "CurvatureOperator", "hvp", "ggn_vp",
           "hessian", "ggn"]

CURVATURES = ("hessian", "ggn")


class OutputLoss:
    """A loss split as ``loss(params, batch) = loss_on_outputs(outputs(params, batch), batch)``.

    It is itself a loss function (callable as ``loss(params, batch)``), so it can be passed anywhere a
    loss is accepted; the split lets the Gauss-Newton curvature (``curvature="ggn"``) be formed.
    """

    def __init__(self, outputs: Callable[[Params, Batch], torch.Tensor],
                 loss_on_outputs: Callable[[torch.Tensor, Batch], torch.Tensor]):
        if not callable(outputs) or not callable(loss_on_outputs):
            raise TypeError("output_loss(outputs, loss_on_outputs) takes two callables")
        self.outputs = outputs
        self.loss_on_outputs = loss_on_outputs

    def __call__(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_on_outputs(self.outputs(params, batch), batch)


def output_loss(outputs: Callable[[Params, Batch], torch.Tensor],
                loss_on_outputs: Callable[[torch.Tensor, Batch], torch.Tensor]) -> OutputLoss:
    """Build a loss that exposes its model outputs, for Gauss-Newton curvature.

    Args:
      outputs: ``outputs(params, batch) -> Tensor`` (e.g. logits ``[b, classes]``).
      loss_on_outputs: ``loss_on_outputs(outputs, batch) -> scalar``, summed over the batch.

    Example:
      >>> loss = output_loss(lambda p, b: ifunc.call(model, p, b[0]),
      ...                    lambda out, b: F.cross_entropy(out, b[1], reduction="sum"))
    """
    return OutputLoss(outputs, loss_on_outputs)


def resolve_curvature(loss: LossFn, curvature: str | None) -> str:
    if curvature is None:
        return "ggn" if isinstance(loss, OutputLoss) else "hessian"
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r} is not supported here; choose one of {CURVATURES}")
    if curvature == "ggn" and not isinstance(loss, OutputLoss):
        raise TypeError(
            'curvature="ggn" needs the split outputs / loss-on-outputs: pass '
            "loss=ifunc.output_loss(outputs, loss_on_outputs) (or use curvature=\"hessian\")"
        )
    return curvature


def check_scalar(value, what: str = "loss(params, batch)") -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() > 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{what} must return a scalar tensor (the loss summed over the batch), got {shape}; "
            "use reduction='sum' or .sum()"
        )
    return value.reshape(())


def _batch_matvec(loss: LossFn, flat: torch.Tensor, unflatten: Unflatten, batch: Batch, curvature: str):
    """``V [k, d] -> M_batch V`` for the summed loss of one batch."""
    if curvature == "hessian":
        g = grad(lambda x: loss(unflatten(x), batch).reshape(()))
        return vmap(lambda v: jvp(g, (flat,), (v,))[1])
    outputs, lo = loss.outputs, loss.loss_on_outputs
    f_out = lambda x: outputs(unflatten(x), batch)  # noqa: E731
    out, vjp_fn = vjp(f_out, flat)
    g_out = grad(lambda o: lo(o, batch).reshape(()))

    def matvec(V):
        jv = vmap(lambda v: jvp(f_out, (flat,), (v,))[1])(V)
        hjv = vmap(lambda u: jvp(g_out, (out,), (u,))[1])(jv)
        return vmap(lambda u: vjp_fn(u)[0])(hjv)

    return matvec


class CurvatureOperator(NamedTuple):
    """The mean curvature of the loss over the data as a linear operator on flat vectors."""

    matvec: Callable[[torch.Tensor], torch.Tensor]  #: ``[k, d] -> [k, d]``
    flat_params: torch.Tensor  #: ``[d]``
    unflatten: Unflatten
    n: int  #: number of examples averaged over
    curvature: str


def curvature_operator(loss: LossFn, params: Params, data: Data, *, curvature: str | None = None,
                       check: bool = True) -> CurvatureOperator:
    """Linear operator ``V [k, d] -> M V`` with ``M`` the mean Hessian or GGN of ``loss`` over ``data``.

    Each call passes over all of ``data`` once (one vmapped forward-over-reverse product per batch).
    """
    curvature = resolve_curvature(loss, curvature)
    flat, unflatten = flatten(params)
    source = DataSource(data, name="data")
    n = len(source)
    if check:
        first = next(iter(source))
        value = check_scalar(loss(unflatten(flat), first))
        if not torch.isfinite(value):
            raise ValueError(f"loss(params, batch) is {value.item()} on the first batch; check inputs and params")

    def matvec(V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for batch in source:
            out += _batch_matvec(loss, flat, unflatten, batch, curvature)(V)
        return out / n

    return CurvatureOperator(matvec, flat, unflatten, n, curvature)


def _apply(op: CurvatureOperator, v):
    if isinstance(v, torch.Tensor) and v.dim() in (1, 2) and v.shape[-1] == op.flat_params.numel():
        V = v.reshape(-1, v.shape[-1]).to(op.flat_params.dtype)
        out = op.matvec(V)
        return out.reshape(v.shape)
    flat_v, batched = op.unflatten.flatten_like(v)
    out = op.matvec(flat_v if batched else flat_v[None])
    return op.unflatten(out if batched else out[0])


def hvp(loss: LossFn, params: Params, data: Data, v, *, curvature: str = "hessian"):
    """Mean-curvature-vector product ``H v`` (or ``G v`` with ``curvature="ggn"``).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader; ``H`` is the Hessian of the mean loss over it.
      v: ``[d]``, ``[k, d]`` or a pytree like ``params`` (optionally with a leading ``k``).

    Returns:
      ``H v`` in the form of ``v``.
    """
    return _apply(curvature_operator(loss, params, data, curvature=curvature), v)


def ggn_vp(loss: OutputLoss, params: Params, data: Data, v):
    """Mean Gauss-Newton-vector product ``G v = (1/n) Σ Jᵀ Λ J v``; ``loss`` from :func:`output_loss`."""
    return hvp(loss, params, data, v, curvature="ggn")


def hessian(loss: LossFn, params: Params, data: Data) -> torch.Tensor:
    """Dense mean Hessian ``[d, d]`` over ``data`` via ``torch.func.hessian`` (small models only)."""
    flat, unflatten = flatten(params)
    source = DataSource(data)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    for batch in source:
        total += torch.func.hessian(lambda x: check_scalar(loss(unflatten(x), batch)))(flat)
    return total / len(source)


def ggn(loss: OutputLoss, params: Params, data: Data) -> torch.Tensor:
    """Dense mean Gauss-Newton matrix ``(1/n) Σ Jᵀ Λ J`` ``[d, d]`` (small models only)."""
    resolve_curvature(loss, "ggn")
    flat, unflatten = flatten(params)
    source = DataSource(data)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    for batch in source:
        out = loss.outputs(unflatten(flat), batch)
        J = torch.func.jacrev(lambda x: loss.outputs(unflatten(x), batch).reshape(-1))(flat)  # [m, d]
        Lam = torch.func.hessian(lambda o: loss.loss_on_outputs(o.reshape(out.shape), batch))(out.reshape(-1))
        total += J.T @ Lam @ J
    return total / len(source)
