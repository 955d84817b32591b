"""The per-example gradient primitive: ``vmap(grad)`` over the examples of a batch, chunked to a memory budget.

Every per-example gradient in ifunc comes from :func:`batch_grads` (the gradients of a whole model for the
generic scorer and the empirical Fisher, the sampled-label gradients ``J_iᵀ u_i`` of the true Fisher, the
diagonal blocks of the Kronecker family), so its guards hold everywhere: the value must be a scalar, a
torch.func limit (dropout, ``.item()``, BatchNorm in train mode) gets a readable error, and a NaN/inf
gradient raises naming the example and the data set (``"train"``, ``"query"``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Callable

import optree
import torch
from torch.func import grad, vmap

from ._data import DataSource, batch_size, iter_chunks, slice_batch
from ._errors import explained
from ._memory import added_bytes, chunk_examples, probe_bytes
from ._types import Batch, Data, Measurement, Params
from .functional import flatten

__all__ = [
    "per_sample_grads",
    "iter_per_sample_grads",
    "batch_grads",
    "check_scalar",
    "check_summed",
    "check_finite",
    "chunk_size_for",
]

MAX_CHUNK = 4096  #: examples per chunk at most: a finished chunk is also the unit a resumed score store keeps


def chunk_size_for(
    func: Callable, params: Params, data: Data, *, max_memory: int | None = None, name: str = "data", fixed: int = 0
) -> int:
    """Examples per ``vmap(grad)`` chunk within the byte budget ``max_memory`` (:mod:`ifunc._memory`).

    One example costs four gradient-sized rows ``[d]`` (the gradient, its vmap buffers, the product with the
    queries) plus three times the bytes autograd saves in its forward pass (activations, logits: measured on the
    first example); ``fixed`` bytes are held besides (e.g. the preconditioned queries). At most
    :data:`MAX_CHUNK`.

    Raises:
      MemoryError: not even one example fits, with the numbers.
    """
    flat, unflatten = flatten(params)
    first = DataSource(data, name=name).first()
    size = batch_size(first)  # a readable error for a batch without an example dimension
    x = flat.detach().requires_grad_(True)

    def probe(k: int) -> int:
        part = slice_batch(first, 0, k)
        with torch.enable_grad(), explained(f"per-sample gradients of the {name} data", (RuntimeError, ValueError)):
            return probe_bytes(lambda: func(unflatten(x), part))

    per_example = 4 * flat.numel() * flat.element_size() + 3 * added_bytes(probe, size)
    n = chunk_examples(max_memory, per_example, what=f"per-example gradients ({name})", fixed=fixed, factor=1)
    return min(n, MAX_CHUNK)


def check_scalar(value, what: str = "loss(params, batch)") -> torch.Tensor:
    """``value`` as a 0-d tensor; ``ValueError`` naming ``what`` unless it is a one-element tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() > 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{what} must return a scalar tensor (the loss summed over the batch), got {shape}; "
            "use reduction='sum' or .sum()"
        )
    return value.reshape(())


def check_summed(func: Callable, params: Params, batch: Batch, what: str = "loss(params, batch)") -> None:
    """Raise when ``func`` looks mean-reduced: on two examples it returns the mean of their single values.

    ifunc's losses and measurements are sums over the batch (``reduction="sum"``); PyTorch's default
    ``reduction="mean"`` silently rescales every batch differently and changes rankings. Three evaluations
    of at most two examples, without gradients.
    """
    if batch_size(batch) < 2:
        return
    with torch.no_grad():
        both = float(check_scalar(func(params, slice_batch(batch, 0, 2)), what))
        one = float(check_scalar(func(params, slice_batch(batch, 0, 1)), what))
        two = float(check_scalar(func(params, slice_batch(batch, 1, 2)), what))
    total, scale = one + two, max(abs(one), abs(two), 1e-30)
    if abs(both - total) > 1e-3 * scale and abs(both - total / 2) <= 1e-4 * scale:
        raise ValueError(
            f"{what} looks mean-reduced: on two examples it gives {both:.6g}, the mean of their single values "
            f"({one:.6g}, {two:.6g}), not their sum. ifunc needs the loss summed over the batch: use "
            "reduction='sum' (or .sum() instead of .mean())"
        )


def check_finite(G, name: str, offset: int = 0) -> None:
    """Raise naming the first example whose gradient (a tensor or pytree of ``[b, ...]``) has a NaN/inf."""
    leaves = [t for t in optree.tree_leaves(G, namespace="ifunc") if isinstance(t, torch.Tensor)]
    if not leaves:
        return
    ok = torch.stack([torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) for t in leaves]).all(dim=0)
    if not bool(ok.all()):
        index = offset + int((~ok).nonzero()[0])
        raise ValueError(
            f"non-finite gradient for example {index} of {name} data; check that example's inputs (and the parameters)"
        )


def _one(t):
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


def batch_grads(
    func: Callable,
    params: Params,
    batch: Batch,
    *,
    cotangent: torch.Tensor | None = None,
    wrt: Sequence[str] | None = None,
    name: str = "data",
    offset: int = 0,
    check: bool = True,
):
    """Per-example gradients of one batch: ``G_i = ∇_θ func(θ, batch_i)``, each example a batch of one.

    Args:
      func: ``func(params, batch) -> scalar`` summed over the batch; with ``cotangent`` it returns the
        outputs ``[b, ...]`` instead, and ``G_i = J_iᵀ u_i`` is the gradient of ``⟨outputs_i, u_i⟩``.
      params: any pytree (a flat vector ``[d]`` included); the gradient has its structure.
      batch: ``b`` examples.
      cotangent: ``u [b, ...]`` shaped like the outputs, one row per example.
      wrt: for dict ``params``: differentiate only these entries (the others are constants).
      name, offset: the data set and the index of the batch's first example, for error messages.
      check: raise on a NaN/inf gradient.

    Returns:
      A pytree like ``params`` (or like ``{k: params[k] for k in wrt}``) with leaves ``[b, *shape]``.

    Raises:
      ValueError: ``func`` is not scalar-valued, or a gradient is NaN/inf (naming the example).
      RuntimeError: a torch.func limit inside ``func``, with the cause and the fix.
    """
    if wrt is None:
        sub, merge = params, (lambda s: s)
    else:
        sub = {k: params[k] for k in wrt}
        merge = lambda s: {**params, **s}  # noqa: E731

    def one(s, example, u):
        value = func(merge(s), optree.tree_map(_one, example, namespace="ifunc"))
        if u is None:
            return check_scalar(value, "loss/measurement(params, batch)")
        return (value * u.unsqueeze(0)).sum()

    with explained(f"per-example gradients of the {name} data"):
        G = vmap(grad(one), in_dims=(None, 0, None if cotangent is None else 0))(sub, batch, cotangent)
    if check:
        check_finite(G, name, offset)
    return G


def _eager_check(func, params, chunk) -> None:
    """Evaluate ``func`` on one example outside vmap: a readable error for non-scalar outputs and limits."""
    with explained("per-sample gradients (one example at a time)", (RuntimeError, ValueError)):
        value = func(params, slice_batch(chunk, 0, 1))
    check_scalar(value, "loss/measurement(params, batch)")
    check_summed(func, params, chunk, "loss/measurement(params, batch)")


def iter_per_sample_grads(
    func: Measurement,
    params: Params,
    data: Data,
    *,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    name: str = "data",
    offset: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield flat per-example gradients ``[c, d]`` chunk by chunk, in data order.

    The gradient of example ``i`` is ``∇_θ func(θ, batch_i)`` where ``batch_i`` is that example alone as a
    batch of size 1 (so ``func`` is written for batches, summed over them). ``offset`` is added to example
    indices in error messages (for data that is itself a chunk of a larger set); ``name`` names the data.

    Raises:
      ValueError: ``func`` is not scalar-valued, or a gradient is NaN/inf (naming the example index).
    """
    flat, unflatten = flatten(params)
    size = chunk_size or chunk_size_for(func, params, data, max_memory=max_memory, name=name)
    flat_func = lambda x, b: func(unflatten(x), b)  # noqa: E731
    for chunk in iter_chunks(DataSource(data, name=name, ordered=True), size):
        if chunk.index == 0:
            _eager_check(flat_func, flat, chunk.batch)
        yield batch_grads(flat_func, flat, chunk.batch, name=name, offset=offset + chunk.offset)


def per_sample_grads(
    func: Measurement,
    params: Params,
    data: Data,
    *,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    flat: bool = True,
    name: str = "data",
):
    """Per-example gradients of ``func`` (the training loss, or any measurement) over ``data``.

    Args:
      func: ``func(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader (in order: a shuffling DataLoader is refused).
      chunk_size: examples per ``vmap`` call; default from the byte budget ``max_memory`` (default: half the
        available memory; see :func:`chunk_size_for`).
      flat: return ``[n, d]``; ``False`` returns a pytree like ``params`` with leaves ``[n, *shape]``.
      name: the data set's name in error messages.

    Returns:
      ``[n, d]`` (or the pytree) in the parameters' dtype.

    Raises:
      ValueError: non-scalar ``func``, or a NaN/inf gradient (naming the example and the data set).

    Example:
      >>> G = ifunc.per_sample_grads(loss, params, (x, y))     # [n, d]
    """
    G = torch.cat(
        list(iter_per_sample_grads(func, params, data, chunk_size=chunk_size, max_memory=max_memory, name=name))
    )
    if flat:
        return G
    return flatten(params)[1](G)
