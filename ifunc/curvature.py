"""Curvature products of the mean training loss: Hessian, Gauss-Newton and Fisher products, dense matrices.

Normalisation: with ``loss(params, batch)`` the loss of a batch **summed** over its examples and ``n`` the
total number of examples in ``data``, the curvature is that of the *mean* loss,
``H = (1/n) Σ_batches ∇² loss(θ, batch)``. Several batches are therefore averaged, never inverted one by one.

The Gauss-Newton matrix needs the split "model outputs" / "loss on outputs": give the loss as
``ifunc.output_loss(outputs, loss_on_outputs)``, then ``G = (1/n) Σ Jᵀ Λ J`` with ``J = ∂outputs/∂θ`` and
``Λ = ∇²_out loss_on_outputs`` (PSD for convex losses such as cross-entropy and squared error); the split,
the likelihoods and their label samplers live in :mod:`ifunc.likelihood`.

Two more PSD curvatures are built from per-example gradients:

- ``"empirical_fisher"``: ``F_emp = (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` with the data's own labels (any loss).
- ``"fisher"`` (true Fisher, Monte Carlo with one label per example): ``F = (1/n) Σ_i J_iᵀ g_i g_iᵀ J_i``
  with ``g_i = ∇_out −log p(ŷ_i | out_i)`` at a label ``ŷ_i`` sampled from the model's predictive
  distribution. Its expectation over the samples is the GGN for exponential-family losses. It needs an
  ``output_loss(..., likelihood=...)`` that says how to sample, and a ``generator``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import grad, jvp, vjp, vmap

from ._chunks import Partition
from ._data import DataSource  # Partition: re-exported, the solvers pass one
from ._errors import explained
from ._types import Batch, Data, LossFn, Params
from .functional import Unflatten, flatten
from .grads import batch_grads, check_scalar, check_summed
from .likelihood import OutputLoss, replayable, sampled_output_gradients

__all__ = [
    "curvature_operator",
    "CurvatureOperator",
    "Partition",
    "batch_matvec",
    "hvp",
    "ggn_vp",
    "hessian",
    "ggn",
    "resolve_curvature",
    "example_gradients",
    "CURVATURES",
]

CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")


def resolve_curvature(loss: LossFn, curvature: str | None) -> str:
    if curvature is None:
        return "ggn" if isinstance(loss, OutputLoss) else "hessian"
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r} is not supported here; choose one of {CURVATURES}")
    if curvature == "ggn" and not isinstance(loss, OutputLoss):
        raise TypeError(
            'curvature="ggn" needs the split outputs / loss-on-outputs: pass '
            'loss=ifunc.output_loss(outputs, loss_on_outputs) (or use curvature="hessian")'
        )
    if curvature == "fisher" and (not isinstance(loss, OutputLoss) or loss.likelihood is None):
        raise TypeError(
            'curvature="fisher" samples labels from the model, so it needs to know the likelihood: pass '
            'loss=ifunc.output_loss(outputs, loss_on_outputs, likelihood="categorical" | "gaussian" | callable) '
            '(or use curvature="empirical_fisher", which uses the data\'s labels)'
        )
    return curvature


def example_gradients(
    loss: LossFn,
    flat: torch.Tensor,
    unflatten: Unflatten,
    batch: Batch,
    *,
    curvature: str = "empirical_fisher",
    generator: torch.Generator | None = None,
    name: str = "data",
    offset: int = 0,
) -> torch.Tensor:
    """Per-example gradient factors ``[b, d]`` of a gradient curvature (``F = (1/n) Σ_i G_iᵀ G_i``).

    ``"empirical_fisher"``: ``G_i = ∇ℓ_i`` at the data's labels; ``"fisher"``: ``G_i = J_iᵀ g_i`` with ``g_i``
    the output gradient at a label sampled from ``loss.likelihood`` with ``generator``.
    """
    if curvature == "fisher":
        assert isinstance(loss, OutputLoss) and generator is not None  # resolve_curvature / the callers ensure it
        g = sampled_output_gradients(loss, loss.outputs(unflatten(flat), batch), batch, generator)
        return batch_grads(
            lambda x, b: loss.outputs(unflatten(x), b), flat, batch, cotangent=g, name=name, offset=offset
        )
    return batch_grads(lambda x, b: loss(unflatten(x), b), flat, batch, name=name, offset=offset)


def batch_matvec(
    loss: LossFn,
    flat: torch.Tensor,
    unflatten: Unflatten,
    batch: Batch,
    curvature: str,
    generator: torch.Generator | None = None,
):
    """``V [k, d] -> M_batch V``: the curvature of the loss of one batch (summed, not averaged) on ``k`` vectors.

    ``M_batch`` is ``∇² loss(θ, batch)`` (``"hessian"``), ``Σ_i J_iᵀ Λ_i J_i`` (``"ggn"``), ``Σ_i ∇ℓ_i ∇ℓ_iᵀ``
    (``"empirical_fisher"``) or ``Σ_i J_iᵀ g_i g_iᵀ J_i`` with labels drawn from ``generator`` (``"fisher"``);
    :func:`curvature_operator` averages it over the batches. Returns the closure ``[k, d] -> [k, d]``: the
    products run in the parameters' dtype (``V`` is cast to it) and come back in ``V``'s, so a float32 solver
    iterates on a half-precision model (its products rounded to the model's precision, its sums in float32).
    """
    product = _batch_products(loss, flat, unflatten, batch, curvature, generator)
    if product is None:  # empirical Fisher: V ↦ (V Gᵀ) G with the gradients cast to V's dtype
        G = batch_grads(lambda x, b: loss(unflatten(x), b), flat, batch)  # [b, d]
        return lambda V: (V @ G.to(V.dtype).T) @ G.to(V.dtype)
    return lambda V: product(V.to(flat.dtype)).to(V.dtype)


def _batch_products(loss, flat, unflatten, batch, curvature, generator):
    """:func:`batch_matvec` in the parameters' dtype (``V`` already cast); None for the empirical Fisher."""
    if curvature == "hessian":
        g = grad(lambda x: loss(unflatten(x), batch).reshape(()))
        return vmap(lambda v: jvp(g, (flat,), (v,))[1])
    if curvature == "empirical_fisher":
        return None
    assert isinstance(loss, OutputLoss)  # "ggn" / "fisher": resolve_curvature checked the split
    outputs, lo = loss.outputs, loss.loss_on_outputs
    f_out = lambda x: outputs(unflatten(x), batch)  # noqa: E731
    out, vjp_fn = vjp(f_out, flat)  # pyright: ignore[reportAssignmentType]  # without has_aux: (out, vjp_fn)
    if curvature == "fisher":
        assert generator is not None  # curvature_operator draws Fisher labels from a generator
        g = sampled_output_gradients(loss, out, batch, generator)
        shape = (g.shape[0],) + (1,) * (g.dim() - 1)

        def fisher_matvec(V):  # Σ_i J_iᵀ g_i (g_iᵀ J_i v): one jvp and one vjp per vector
            jv = vmap(lambda v: jvp(f_out, (flat,), (v,))[1])(V)  # [k, b, ...]
            c = (jv * g).reshape(V.shape[0], g.shape[0], -1).sum(-1)  # [k, b]
            return vmap(lambda ci: vjp_fn(ci.reshape(shape) * g)[0])(c)

        return fisher_matvec
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


def curvature_operator(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    curvature: str | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
    partition: Partition | None = None,
) -> CurvatureOperator:
    """Linear operator ``V [k, d] -> M V`` with ``M`` the mean curvature of ``loss`` over ``data``.

    ``M = (1/n) Σ_batches M_batch`` with, per curvature (``ℓ_i`` the loss of example ``i``):

    - ``"hessian"``: ``∇² Σ_i ℓ_i`` (forward-over-reverse HVP);
    - ``"ggn"``: ``Σ_i J_iᵀ Λ_i J_i`` (needs an :func:`output_loss`);
    - ``"empirical_fisher"``: ``Σ_i ∇ℓ_i ∇ℓ_iᵀ`` (vmapped per-example gradients, ``O(b d)`` memory);
    - ``"fisher"``: ``Σ_i J_iᵀ g_i g_iᵀ J_i`` with ``g_i`` the output gradient of ``−log p`` at a label
      sampled from the model (needs ``output_loss(..., likelihood=...)``). The labels are drawn from
      ``generator`` in data order and the same draws are replayed on every call, so ``M`` is one fixed
      PSD matrix (requires the data to be iterated in the same order each pass).

    Each call passes over all of ``data`` once, with all ``k`` vectors batched by ``vmap``. With a
    ``partition`` (the solvers pass the process group's under ``torchrun``) this process computes the
    batches ``i ≡ index (mod count)`` and ``partition.reduce`` adds the shares, so every rank gets the same
    ``M V``; every rank must then pass the same data.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      curvature: one of ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``; default
        ``"ggn"`` for an ``output_loss``, else ``"hessian"``.
      generator: label sampling for ``"fisher"`` (default seeded with 0; the global RNG is never used).
      check: evaluate the loss on the first batch and raise if it is not a finite scalar.
      partition: the share of the sum this process computes (default: all of it).

    Returns:
      :class:`CurvatureOperator` ``(matvec, flat_params, unflatten, n, curvature)``.

    Raises:
      ValueError: unknown curvature, non-scalar or non-finite loss. TypeError: ``"ggn"``/``"fisher"``
        without the :func:`output_loss` split (or without a likelihood for ``"fisher"``).
    """
    curvature = resolve_curvature(loss, curvature)
    flat, unflatten = flatten(params)
    source = DataSource(data, name="data", ordered=curvature == "fisher")
    n = len(source)
    fresh = replayable(generator, flat.device)
    part = partition if partition is not None else Partition()
    if check:
        first = source.first()
        value = check_scalar(loss(unflatten(flat), first))
        if not torch.isfinite(value):
            raise ValueError(f"loss(params, batch) is {value.item()} on the first batch; check inputs and params")
        check_summed(lambda x, b: loss(unflatten(x), b), flat, source)

    batches = source.pieces(part.count) if curvature != "fisher" else source  # keep every worker busy

    def matvec(V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        gen = fresh() if curvature == "fisher" else None
        for index, batch in enumerate(batches):
            if part.owns(index):
                with explained(f"{curvature} curvature products"):
                    out += batch_matvec(loss, flat, unflatten, batch, curvature, gen)(V)
            elif gen is not None:  # another rank's batch: draw its labels anyway, to keep the generator in step
                assert isinstance(loss, OutputLoss)
                sampled_output_gradients(loss, loss.outputs(unflatten(flat), batch), batch, gen)
        return part.reduce(out) / n

    return CurvatureOperator(matvec, flat, unflatten, n, curvature)


def _apply(op: CurvatureOperator, v):
    if isinstance(v, torch.Tensor) and v.dim() in (1, 2) and v.shape[-1] == op.flat_params.numel():
        V = v.reshape(-1, v.shape[-1]).to(op.flat_params.dtype)
        out = op.matvec(V)
        return out.reshape(v.shape)
    flat_v, batched = op.unflatten.flatten_like(v)
    out = op.matvec(flat_v if batched else flat_v[None])
    return op.unflatten(out if batched else out[0])


def hvp(
    loss: LossFn, params: Params, data: Data, v, *, curvature: str = "hessian", generator: torch.Generator | None = None
):
    """Mean-curvature-vector product ``H v`` (or ``G v``, ``F v`` with another ``curvature``).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader; ``H`` is the Hessian of the mean loss over it.
      v: ``[d]``, ``[k, d]`` or a pytree like ``params`` (optionally with a leading ``k``).
      curvature: ``"hessian"`` (default), ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``
        (see :func:`curvature_operator`).
      generator: label sampling for ``"fisher"``.

    Returns:
      ``H v`` in the form of ``v``.
    """
    return _apply(curvature_operator(loss, params, data, curvature=curvature, generator=generator), v)


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
