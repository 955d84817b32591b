"""The per-example gradient primitive: ``vmap(grad)`` over the examples of a batch, chunked to a memory budget.

Every per-example gradient in ifunc comes from :func:`batch_grads` (the gradients of a whole model for the
generic scorer and the empirical Fisher, the sampled-label gradients ``J_iᵀ u_i`` of the true Fisher, the
diagonal blocks of the Kronecker family), so its guards hold everywhere: the value must be a scalar, a
torch.func limit (dropout, ``.item()``, BatchNorm in train mode) gets a readable error, and a NaN/inf
gradient raises naming the example and the data set (``"train"``, ``"query"``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Callable

import optree
import torch
from torch.func import grad, vmap

from ._batches import batch_size, slice_batch
from ._chunks import check_chunk_size, iter_chunks
from ._data import DataSource, as_source
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


def chunk_size_for(
    func: Callable, params: Params, data: Data, *, max_memory: int | None = None, name: str = "data", fixed: int = 0
) -> int:
    """Examples per ``vmap(grad)`` chunk within the byte budget ``max_memory`` (:mod:`ifunc._memory`).

    One example costs four gradient-sized rows ``[d]`` (the gradient, its vmap buffers, the product with the
    queries) plus three times the bytes autograd saves in its forward pass (activations, logits: measured on the
    first example); ``fixed`` bytes are held besides (e.g. the preconditioned queries). ``max_memory=None`` is the
    default budget: half the available memory, and at most 1 GiB of per-example tensors. At most
    :func:`ifunc._memory.chunk_cap` examples (one position per example: 4096).

    Raises:
      MemoryError: not even one example fits, with the numbers.
    """
    flat, unflatten = flatten(params)
    first = as_source(data, name=name).first()
    size = batch_size(first)  # a readable error for a batch without an example dimension
    x = flat.detach().requires_grad_(True)

    def probe(k: int) -> int:
        part = slice_batch(first, 0, k)
        with torch.enable_grad(), explained(f"per-sample gradients of the {name} data", (RuntimeError, ValueError)):
            return probe_bytes(lambda: func(unflatten(x), part))

    per_example = 4 * flat.numel() * flat.element_size() + 3 * added_bytes(probe, size)
    return chunk_examples(max_memory, per_example, what=f"per-example gradients ({name})", fixed=fixed, factor=1)


def check_scalar(value, what: str = "loss(params, batch)") -> torch.Tensor:
    """``value`` as a 0-d tensor; ``ValueError`` naming ``what`` unless it is a one-element tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() > 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{what} must return a scalar tensor (the loss summed over the batch), got {shape}; "
            "use reduction='sum' or .sum()"
        )
    return value.reshape(())


def check_summed(func: Callable, params: Params, data, what: str = "loss(params, batch)") -> None:
    """Raise unless ``func`` adds up over examples: ``f(params, {a, b}) = f(params, {a}) + f(params, {b})``.

    ifunc's losses and measurements are sums over the batch of per-example terms, so additivity on the first
    two examples ``a, b`` of the data is exactly the contract. Any per-batch normalisation breaks it: PyTorch's
    default ``reduction="mean"`` (``f({a, b}) = (f(a) + f(b)) / 2``), a mean over the real tokens of padded
    sequences (a Hugging Face model's ``.loss``), a loss coupling the examples. The two examples are read
    across the data's batch boundaries (a ``DataLoader(batch_size=1)`` included); data of one example has
    nothing to compare and passes. Rounding is allowed: ``|f({a, b}) − f(a) − f(b)| ≤ √ε (|f(a)| + |f(b)|)``
    with ``ε`` the machine epsilon of the value's dtype (a broken normalisation is off by a factor of order 1).
    Three evaluations on at most two examples, without gradients.

    Args:
      func: ``func(params, batch) -> scalar``.
      params: what ``func`` takes.
      data: a batch, any data ifunc accepts, or a :class:`ifunc._data.DataSource`.
      what: the function's name in the error.

    Raises:
      ValueError: ``f({a, b})`` differs from ``f(a) + f(b)`` beyond rounding.
    """
    source = data if isinstance(data, DataSource) else DataSource(data)
    try:
        pair = source.head(2)
    except RuntimeError:  # batches padded to different lengths cannot be joined: the first batch alone
        pair = source.first()
    if batch_size(pair) < 2:
        return
    with torch.no_grad():
        value = check_scalar(func(params, pair), what)
        one = float(check_scalar(func(params, slice_batch(pair, 0, 1)), what))
        two = float(check_scalar(func(params, slice_batch(pair, 1, 2)), what))
    both = float(value)
    if not all(math.isfinite(v) for v in (both, one, two)):
        return  # the non-finite checks name the example
    eps = torch.finfo(value.dtype if value.dtype.is_floating_point else torch.float32).eps
    if abs(both - (one + two)) > math.sqrt(eps) * (abs(one) + abs(two)):
        raise ValueError(
            f"{what} looks mean-reduced (it is not a sum over the examples of the batch): on two examples it gives "
            f"{both:.6g}, but the examples alone give {one:.6g} and {two:.6g}, which sum to {one + two:.6g}. ifunc "
            "needs f(a and b) = f(a) + f(b): use reduction='sum' (or .sum() instead of .mean()); a loss normalised "
            "per batch, such as a mean over the real tokens of padded sequences (a Hugging Face model's .loss), must "
            "sum the per-token losses instead (ifunc.language.causal_lm_loss does); a loss that couples the "
            "examples of a batch (batch statistics, in-batch negatives) has no per-example gradient and cannot be "
            "used"
        )


def check_finite(G, name: str, offset: int = 0) -> None:
    """Raise naming the first example whose gradient (a tensor or pytree of ``[b, ...]``) has a NaN/inf."""
    leaves = [t for t in optree.tree_leaves(G, namespace="ifunc") if isinstance(t, torch.Tensor)]
    if not leaves:
        return
    # a NaN/inf anywhere makes its sum non-finite: the elementwise pass runs only then (or when a sum overflowed)
    if all(bool(torch.isfinite(t.sum())) for t in leaves):
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


def _eager_check(func, params, chunk, source: DataSource) -> None:
    """Evaluate ``func`` on one example outside vmap (a readable error for non-scalar outputs and limits), and
    check that it is summed over examples on the first two (from ``chunk``, else read from ``source``).

    Errors name ``loss(params, batch)`` on training data and ``loss/measurement(params, batch)`` on queries (where
    either may be the callable)."""
    what = "loss(params, batch)" if source.name == "train" else "loss/measurement(params, batch)"
    with explained("per-sample gradients (one example at a time)", (RuntimeError, ValueError)):
        value = func(params, slice_batch(chunk, 0, 1))
    check_scalar(value, what)
    check_summed(func, params, chunk if batch_size(chunk) >= 2 else source, what)


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
      ValueError: ``func`` is not scalar-valued or not summed over the batch (:func:`check_summed`), a gradient is
        NaN/inf (naming the example index), or ``chunk_size`` is not a positive int (TypeError for a non-int).
    """
    flat, unflatten = flatten(params)
    source = as_source(data, name=name, ordered=True)
    size = check_chunk_size(chunk_size) or chunk_size_for(func, params, source, max_memory=max_memory, name=name)
    flat_func = lambda x, b: func(unflatten(x), b)  # noqa: E731
    for chunk in iter_chunks(source, size):
        if chunk.index == 0:
            _eager_check(flat_func, flat, chunk.batch, source)
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
      chunk_size: examples per ``vmap`` call; default from the byte budget ``max_memory`` (see
        :func:`chunk_size_for`).
      max_memory: bytes a chunk may hold; ``None``: the default budget: half the available memory, and at most
        1 GiB of per-example tensors.
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
