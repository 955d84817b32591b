"""Curvature products of the mean training loss: Hessian, Gauss-Newton and Fisher products, dense matrices.

Normalisation: with ``loss(params, batch)`` the loss of a batch **summed** over its examples and ``n`` the
total number of examples in ``data``, the curvature is that of the *mean* loss,
``H = (1/n) Σ_batches ∇² loss(θ, batch)``. Several batches are therefore averaged, never inverted one by one.

The Gauss-Newton matrix needs the split "model outputs" / "loss on outputs": give the loss as
``ifunc.output_loss(outputs, loss_on_outputs)``, then ``G = (1/n) Σ Jᵀ Λ J`` with ``J = ∂outputs/∂θ`` and
``Λ = ∇²_out loss_on_outputs`` (PSD for convex losses such as cross-entropy and squared error).

Two more PSD curvatures are built from per-example gradients:

- ``"empirical_fisher"``: ``F_emp = (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` with the data's own labels (any loss).
- ``"fisher"`` (true Fisher, Monte Carlo with one label per example): ``F = (1/n) Σ_i J_iᵀ g_i g_iᵀ J_i``
  with ``g_i = ∇_out −log p(ŷ_i | out_i)`` at a label ``ŷ_i`` sampled from the model's predictive
  distribution. Its expectation over the samples is the GGN for exponential-family losses. It needs an
  ``output_loss(..., likelihood=...)`` that says how to sample, and a ``generator``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import optree
import torch
from torch.func import grad, jvp, vjp, vmap

from . import distributed
from ._errors import explain
from ._data import DataSource, batch_size
from ._types import Batch, Data, LossFn, Params
from .functional import Unflatten, flatten

__all__ = ["output_loss", "OutputLoss", "curvature_operator", "CurvatureOperator", "hvp", "ggn_vp",
           "hessian", "ggn"]

CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")


#: ``sample(outputs [b, ...], generator) -> [b, ...]``: ``∇_out −log p(ŷ | out)`` at sampled labels ``ŷ``.
Likelihood = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _sample_categorical(outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Logits ``[..., C]``: ``ŷ ~ softmax(out)`` per row, ``∇_out −log p(ŷ|out) = softmax(out) − onehot(ŷ)``."""
    probs = torch.softmax(outputs.detach().to(torch.float64), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    labels = torch.multinomial(flat.cpu(), 1, generator=generator).squeeze(1).to(flat.device)
    onehot = torch.nn.functional.one_hot(labels, flat.shape[-1]).to(flat.dtype)
    return (flat - onehot).reshape(outputs.shape).to(outputs.dtype)


def _sample_gaussian(outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance Gaussian ``ŷ ~ N(out, I)``: ``∇_out ½‖out − ŷ‖² = out − ŷ = −ε``, ``ε ~ N(0, I)``."""
    noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
    return -noise.to(outputs.device)


LIKELIHOODS = {"categorical": _sample_categorical, "gaussian": _sample_gaussian}


class OutputLoss:
    """A loss split as ``loss(params, batch) = loss_on_outputs(outputs(params, batch), batch)``.

    It is itself a loss function (callable as ``loss(params, batch)``), so it can be passed anywhere a
    loss is accepted; the split lets the Gauss-Newton curvature (``curvature="ggn"``) be formed, and the
    optional ``likelihood`` lets the true Fisher (``curvature="fisher"``) sample labels.
    """

    def __init__(self, outputs: Callable[[Params, Batch], torch.Tensor],
                 loss_on_outputs: Callable[[torch.Tensor, Batch], torch.Tensor], *,
                 likelihood: str | Likelihood | None = None):
        if not callable(outputs) or not callable(loss_on_outputs):
            raise TypeError("output_loss(outputs, loss_on_outputs) takes two callables")
        if isinstance(likelihood, str):
            if likelihood not in LIKELIHOODS:
                raise ValueError(
                    f"likelihood={likelihood!r} is not built in; choose one of {sorted(LIKELIHOODS)} or pass a "
                    "callable (outputs, generator) -> gradient of -log p(sampled label | outputs)"
                )
            likelihood = LIKELIHOODS[likelihood]
        elif likelihood is not None and not callable(likelihood):
            raise TypeError(f"likelihood must be a string or a callable, got {type(likelihood).__name__}")
        self.outputs = outputs
        self.loss_on_outputs = loss_on_outputs
        self.likelihood = likelihood

    def __call__(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_on_outputs(self.outputs(params, batch), batch)


def output_loss(outputs: Callable[[Params, Batch], torch.Tensor],
                loss_on_outputs: Callable[[torch.Tensor, Batch], torch.Tensor], *,
                likelihood: str | Likelihood | None = None) -> OutputLoss:
    """Build a loss that exposes its model outputs, for Gauss-Newton and true-Fisher curvature.

    Args:
      outputs: ``outputs(params, batch) -> Tensor`` (e.g. logits ``[b, classes]``); for
        ``curvature="fisher"`` the leading dimension must be the batch's examples.
      loss_on_outputs: ``loss_on_outputs(outputs, batch) -> scalar``, summed over the batch.
      likelihood: how to sample labels from the model for the true Fisher. ``"categorical"``: outputs
        are logits ``[..., C]`` (cross-entropy), ``g = softmax(out) − onehot(ŷ)`` with ``ŷ ~ softmax(out)``.
        ``"gaussian"``: unit-variance Gaussian (squared error ``½‖out − y‖²``), ``g = −ε``,
        ``ε ~ N(0, I)``. A callable ``(outputs, generator) -> g`` (same shape as outputs) returns
        ``∇_out −log p(ŷ | out)`` at labels it samples with ``generator``. ``None``: no true Fisher.

    Example:
      >>> loss = output_loss(lambda p, b: ifunc.call(model, p, b[0]),
      ...                    lambda out, b: F.cross_entropy(out, b[1], reduction="sum"),
      ...                    likelihood="categorical")
    """
    return OutputLoss(outputs, loss_on_outputs, likelihood=likelihood)


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
    if curvature == "fisher" and (not isinstance(loss, OutputLoss) or loss.likelihood is None):
        raise TypeError(
            'curvature="fisher" samples labels from the model, so it needs to know the likelihood: pass '
            'loss=ifunc.output_loss(outputs, loss_on_outputs, likelihood="categorical" | "gaussian" | callable) '
            '(or use curvature="empirical_fisher", which uses the data\'s labels)'
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


def _one_example(example):
    return optree.tree_map(lambda t: t.unsqueeze(0), example, namespace="ifunc")


def example_gradients(loss: LossFn, flat: torch.Tensor, unflatten: Unflatten, batch: Batch) -> torch.Tensor:
    """Per-example gradients ``[b, d]`` of ``loss`` on one batch (each example as a batch of one), by vmap."""
    def one(x, example):
        return loss(unflatten(x), _one_example(example)).reshape(())

    return vmap(grad(one), in_dims=(None, 0))(flat, batch)


def sampled_output_gradients(loss: OutputLoss, out: torch.Tensor, batch: Batch,
                             generator: torch.Generator) -> torch.Tensor:
    """``g [b, ...] = ∇_out −log p(ŷ | out)`` at labels sampled by ``loss.likelihood``; checks shapes."""
    g = loss.likelihood(out.detach(), generator)
    if not isinstance(g, torch.Tensor) or g.shape != out.shape:
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"likelihood(outputs, generator) must return a tensor shaped like outputs "
                         f"{tuple(out.shape)}, got {got}")
    if out.dim() == 0 or out.shape[0] != batch_size(batch):
        raise ValueError(
            f'curvature="fisher" needs outputs whose leading dimension is the batch\'s examples; got outputs '
            f"{tuple(out.shape)} for a batch of {batch_size(batch)}"
        )
    return g.to(out.dtype)


def fisher_example_gradients(loss: OutputLoss, flat: torch.Tensor, unflatten: Unflatten, batch: Batch,
                             generator: torch.Generator) -> torch.Tensor:
    """Per-example sampled-label gradients ``J_iᵀ g_i`` ``[b, d]`` (the true-Fisher factors)."""
    out = loss.outputs(unflatten(flat), batch)
    g = sampled_output_gradients(loss, out, batch, generator)

    def one(x, example, gi):
        return (loss.outputs(unflatten(x), _one_example(example))[0] * gi).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(flat, batch, g)


def _batch_matvec(loss: LossFn, flat: torch.Tensor, unflatten: Unflatten, batch: Batch, curvature: str,
                  generator: torch.Generator | None = None):
    """``V [k, d] -> M_batch V`` for the summed loss of one batch."""
    if curvature == "hessian":
        g = grad(lambda x: loss(unflatten(x), batch).reshape(()))
        return vmap(lambda v: jvp(g, (flat,), (v,))[1])
    if curvature == "empirical_fisher":
        G = example_gradients(loss, flat, unflatten, batch)  # [b, d]
        return lambda V: (V @ G.T) @ G
    outputs, lo = loss.outputs, loss.loss_on_outputs
    f_out = lambda x: outputs(unflatten(x), batch)  # noqa: E731
    out, vjp_fn = vjp(f_out, flat)
    if curvature == "fisher":
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


def replayable(generator: torch.Generator | None) -> Callable[[], torch.Generator]:
    """A factory of generators that all start from ``generator``'s current state (default: seed 0)."""
    state = (generator if generator is not None else torch.Generator().manual_seed(0)).get_state()

    def fresh() -> torch.Generator:
        gen = torch.Generator()
        gen.set_state(state)
        return gen

    return fresh


def curvature_operator(loss: LossFn, params: Params, data: Data, *, curvature: str | None = None,
                       generator: torch.Generator | None = None, check: bool = True) -> CurvatureOperator:
    """Linear operator ``V [k, d] -> M V`` with ``M`` the mean curvature of ``loss`` over ``data``.

    ``M = (1/n) Σ_batches M_batch`` with, per curvature (``ℓ_i`` the loss of example ``i``):

    - ``"hessian"``: ``∇² Σ_i ℓ_i`` (forward-over-reverse HVP);
    - ``"ggn"``: ``Σ_i J_iᵀ Λ_i J_i`` (needs an :func:`output_loss`);
    - ``"empirical_fisher"``: ``Σ_i ∇ℓ_i ∇ℓ_iᵀ`` (vmapped per-example gradients, ``O(b d)`` memory);
    - ``"fisher"``: ``Σ_i J_iᵀ g_i g_iᵀ J_i`` with ``g_i`` the output gradient of ``−log p`` at a label
      sampled from the model (needs ``output_loss(..., likelihood=...)``). The labels are drawn from
      ``generator`` in data order and the same draws are replayed on every call, so ``M`` is one fixed
      PSD matrix (requires the data to be iterated in the same order each pass).

    Each call passes over all of ``data`` once, with all ``k`` vectors batched by ``vmap``. Under ``torchrun``
    (a default process group) rank ``r`` computes the batches ``i ≡ r (mod W)`` and the sum is all-reduced,
    so every rank gets the same ``M V``; every rank must pass the same data.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      curvature: one of ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``; default
        ``"ggn"`` for an ``output_loss``, else ``"hessian"``.
      generator: label sampling for ``"fisher"`` (default seeded with 0; the global RNG is never used).
      check: evaluate the loss on the first batch and raise if it is not a finite scalar.

    Returns:
      :class:`CurvatureOperator` ``(matvec, flat_params, unflatten, n, curvature)``.

    Raises:
      ValueError: unknown curvature, non-scalar or non-finite loss. TypeError: ``"ggn"``/``"fisher"``
        without the :func:`output_loss` split (or without a likelihood for ``"fisher"``).
    """
    curvature = resolve_curvature(loss, curvature)
    flat, unflatten = flatten(params)
    source = DataSource(data, name="data")
    n = len(source)
    fresh = replayable(generator)
    if check:
        first = next(iter(source))
        value = check_scalar(loss(unflatten(flat), first))
        if not torch.isfinite(value):
            raise ValueError(f"loss(params, batch) is {value.item()} on the first batch; check inputs and params")

    distributed.check_data(source)  # every rank must hold all the data (no-op without a process group)
    shards = distributed.batches(source, split=curvature != "fisher")  # the data itself without a process group

    def matvec(V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        gen = fresh() if curvature == "fisher" else None
        for mine, batch in distributed.shard(shards):  # every batch without a process group
            if mine:
                try:
                    out += _batch_matvec(loss, flat, unflatten, batch, curvature, gen)(V)
                except RuntimeError as err:
                    readable = explain(err, f"{curvature} curvature products")
                    if readable is not None:
                        raise readable from err
                    raise
            elif gen is not None:  # another rank's batch: draw its labels anyway, to keep the generator in step
                sampled_output_gradients(loss, loss.outputs(unflatten(flat), batch), batch, gen)
        return distributed.reduce_tensor(out) / n

    return CurvatureOperator(matvec, flat, unflatten, n, curvature)


def operator_matrix(matvec: Callable[[torch.Tensor], torch.Tensor], d: int, *, like: torch.Tensor,
                    index: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """Dense ``M[index][:, index]`` (default all of ``M``) from products with unit vectors, ``chunk`` at a time.

    Memory ``O(chunk·d + |index|²)``; ``|index|`` operator products in total.
    """
    index = torch.arange(d, device=like.device) if index is None else index
    m = index.numel()
    out = torch.empty(m, m, dtype=like.dtype, device=like.device)
    for start in range(0, m, chunk):
        cols = index[start:start + chunk]
        E = torch.zeros(cols.numel(), d, dtype=like.dtype, device=like.device)
        E[torch.arange(cols.numel()), cols] = 1
        out[start:start + cols.numel()] = matvec(E)[:, index]
    return (out + out.T) / 2


def _apply(op: CurvatureOperator, v):
    if isinstance(v, torch.Tensor) and v.dim() in (1, 2) and v.shape[-1] == op.flat_params.numel():
        V = v.reshape(-1, v.shape[-1]).to(op.flat_params.dtype)
        out = op.matvec(V)
        return out.reshape(v.shape)
    flat_v, batched = op.unflatten.flatten_like(v)
    out = op.matvec(flat_v if batched else flat_v[None])
    return op.unflatten(out if batched else out[0])


def hvp(loss: LossFn, params: Params, data: Data, v, *, curvature: str = "hessian",
        generator: torch.Generator | None = None):
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
    for mine, batch in distributed.shard(distributed.batches(source)):
        if mine:
            total += torch.func.hessian(lambda x: check_scalar(loss(unflatten(x), batch)))(flat)
    return distributed.reduce_tensor(total) / len(source)


def ggn(loss: OutputLoss, params: Params, data: Data) -> torch.Tensor:
    """Dense mean Gauss-Newton matrix ``(1/n) Σ Jᵀ Λ J`` ``[d, d]`` (small models only)."""
    resolve_curvature(loss, "ggn")
    flat, unflatten = flatten(params)
    source = DataSource(data)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    for mine, batch in distributed.shard(distributed.batches(source)):
        if not mine:
            continue
        out = loss.outputs(unflatten(flat), batch)
        J = torch.func.jacrev(lambda x: loss.outputs(unflatten(x), batch).reshape(-1))(flat)  # [m, d]
        Lam = torch.func.hessian(lambda o: loss.loss_on_outputs(o.reshape(out.shape), batch))(out.reshape(-1))
        total += J.T @ Lam @ J
    return distributed.reduce_tensor(total) / len(source)
