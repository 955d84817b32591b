"""Ensembles of influence scores over checkpoints or seeds (TracIn / TRAK-style averaging)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

from ._types import Data, LossFn, Params
from .attribute import attribute

__all__ = ["attribute_ensemble"]


def attribute_ensemble(
    loss: LossFn | Sequence[LossFn],
    params: Sequence[Params],
    ihvp: Callable[[Params], Callable] | Sequence[Callable],
    train: Data,
    query: Data,
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    reduce: bool = True,
    stacked: bool = False,
    **attribute_kwargs,
) -> torch.Tensor:
    """Weighted sum of :func:`ifunc.attribute` scores over an ensemble of parameter sets.

    ``scores[q, i] = Σ_k w_k ∇f_k(z_q)ᵀ (H_k + λI)^{-1} ∇ℓ_k(z_i)``, where member ``k`` is one training
    checkpoint or one independently trained seed, ``H_k`` its curvature and ``w_k`` its weight (default
    ``1/m`` for ``m`` members: the mean). Each member's scores follow the sign convention of
    :func:`ifunc.attribute` (positive = helpful), so the ensemble does too.

    Averaging over seeds removes much of the noise a single non-convex training run leaves in the scores
    (TRAK, Park et al. 2023); summing gradient dot products over checkpoints, weighted by the learning rate,
    is TracIn (Pruthi et al. 2020) — ``ihvp=lambda p: ifunc.ihvp_identity(p)`` and ``weights=lrs``.

    Members are scored one after another, so peak memory is that of one :func:`ifunc.attribute` call plus
    the running sum; the closures of earlier members are released before the next is built. (A ``vmap``
    over members does not fit: iterative solvers stop on data-dependent tolerances.)

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch, shared by all members (the usual case:
        a loss written with :func:`ifunc.call` works for any parameters of the same architecture), or one
        loss per member.
      params: sequence of ``m`` parameter pytrees (or flat vectors), e.g. saved checkpoints; or a ``[m, d]``
        stack of flat vectors.
      ihvp: a factory ``params -> closure`` (e.g. ``lambda p: ifunc.ihvp_ekfac(loss, p, data, model=model,
        damping=1e-3)``) called once per member, or a sequence of ``m`` prebuilt closures.
      train, query: as in :func:`ifunc.attribute`.
      weights: ``m`` member weights; default ``1/m`` each.
      reduce: ``False`` returns the weighted member scores stacked, ``[m, n_query, n_train]``
        (their sum over the first dimension is the ensemble).
      stacked: ``params`` is one pytree whose leaves carry a leading member dimension ``m``, as returned by
        ``torch.func.stack_module_state(models)[0]``.
      **attribute_kwargs: passed to every :func:`ifunc.attribute` call (``measurement``, ``chunk_size``,
        ``progress``, ...). ``out=`` is not supported: write each member to its own store instead.

    Returns:
      ``[n_query, n_train]`` (``[m, n_query, n_train]`` with ``reduce=False``).

    Raises:
      ValueError: empty ensemble, or ``loss``/``ihvp``/``weights`` of a length other than ``len(params)``.
      TypeError: ``ihvp`` neither callable nor a sequence; ``out=`` given.

    Example:
      >>> checkpoints = [ifunc.params_of(m) for m in saved_models]
      >>> scores = ifunc.attribute_ensemble(loss, checkpoints,
      ...     lambda p: ifunc.ihvp_ekfac(loss, p, train, model=model, damping=1e-3), train, query)

    References:
      Pruthi et al. (2020), "Estimating training data influence by tracing gradient descent";
      Park et al. (2023), "TRAK: Attributing model behavior at scale".
    """
    if "out" in attribute_kwargs:
        raise TypeError(
            "attribute_ensemble does not write score stores; call ifunc.attribute(..., out=) per member instead"
        )
    if stacked:
        params = _unstack(params)
    if isinstance(params, dict) or (isinstance(params, torch.Tensor) and params.dim() != 2):
        raise TypeError(
            "params must be a sequence of parameter sets (one per checkpoint or seed) or a [m, d] "
            f"stack of flat vectors, got {type(params).__name__}; wrap a single set in a list"
        )
    members = list(params.unbind(0)) if isinstance(params, torch.Tensor) else list(params)
    m = len(members)
    if m == 0:
        raise ValueError("attribute_ensemble needs at least one member in params")
    losses = _per_member(loss, m, "loss")
    if callable(ihvp) and not isinstance(ihvp, (list, tuple)):
        factory, closures = ihvp, None
    elif isinstance(ihvp, (list, tuple)):
        factory, closures = None, _per_member(list(ihvp), m, "ihvp")
    else:
        raise TypeError(f"ihvp must be a factory params -> closure or a sequence of closures, got {ihvp!r}")
    if weights is None:
        w = [1.0 / m] * m
    else:
        w = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
        if len(w) != m:
            raise ValueError(f"weights has {len(w)} entries but there are {m} members in params")

    total, per_member = None, []
    for k, p in enumerate(members):
        closure = factory(p) if factory is not None else closures[k]  # pyright: ignore[reportOptionalSubscript]  # closures is set when factory is None
        scores = w[k] * attribute(losses[k], p, closure, train, query, **attribute_kwargs)
        del closure
        if reduce:
            total = scores if total is None else total + scores
        else:
            per_member.append(scores)
    if reduce:
        assert total is not None  # at least one member (checked above)
        return total
    return torch.stack(per_member)


def _unstack(tree) -> list:
    import optree

    leaves, spec = optree.tree_flatten(tree, namespace="ifunc")
    sizes = {leaf.shape[0] if isinstance(leaf, torch.Tensor) and leaf.dim() else None for leaf in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        raise ValueError(
            "stacked=True needs every leaf of params to be a tensor with the same leading member "
            f"dimension; got leading sizes {sorted(map(str, sizes))}"
        )
    m = sizes.pop()
    assert m is not None  # None was excluded above
    return [optree.tree_unflatten(spec, [leaf[k].detach() for leaf in leaves]) for k in range(m)]


def _per_member(value, m: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != m:
            raise ValueError(f"{name} has {len(value)} entries but there are {m} members in params")
        return list(value)
    return [value] * m
