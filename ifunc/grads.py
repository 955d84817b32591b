"""Per-sample gradients by ``vmap(grad)``, chunked to a memory budget."""
from __future__ import annotations

from typing import Iterator

import optree
import torch
from torch.func import grad, vmap

from ._data import DataSource, slice_batch
from ._types import Data, Measurement, Params
from ._errors import explain
from .curvature import check_scalar
from .functional import flatten

__all__ = ["per_sample_grads", "iter_per_sample_grads", "chunk_size_for"]

DEFAULT_MAX_MEMORY = 1 << 30  # bytes for one chunk of gradients and their vmap intermediates


def chunk_size_for(d: int, itemsize: int, *, max_memory: int | None = None, copies: int = 4) -> int:
    """Examples per chunk so that ``copies`` gradient-sized buffers of ``[chunk, d]`` fit ``max_memory``."""
    budget = DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    return max(1, budget // max(1, copies * d * itemsize))


def _one(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def iter_per_sample_grads(func: Measurement, params: Params, data: Data, *, chunk_size: int | None = None,
                          max_memory: int | None = None, name: str = "data",
                          offset: int = 0) -> Iterator[torch.Tensor]:
    """Yield flat per-example gradients ``[c, d]`` chunk by chunk, in data order.

    The gradient of example ``i`` is ``∇_θ func(θ, batch_i)`` where ``batch_i`` is that example alone as a
    batch of size 1 (so ``func`` is written for batches, summed over them). ``offset`` is added to example
    indices in error messages (for data that is itself a chunk of a larger set).

    Raises:
      ValueError: ``func`` is not scalar-valued, or a gradient is NaN/inf (naming the example index).
    """
    flat, unflatten = flatten(params)
    d = flat.numel()
    size = chunk_size or chunk_size_for(d, flat.element_size(), max_memory=max_memory)
    source = DataSource(data, name=name)

    def per_example(x, example):
        example = optree.tree_map(_one, example, namespace="ifunc")
        return check_scalar(func(unflatten(x), example), "loss/measurement(params, batch)")

    g = vmap(grad(per_example), in_dims=(None, 0))
    first = True
    for chunk in source.chunks(size):
        if first:  # eager check outside vmap for a readable error on non-scalar outputs
            try:
                value = func(unflatten(flat), slice_batch(chunk, 0, 1))
            except (RuntimeError, ValueError) as err:
                readable = explain(err, "per-sample gradients (one example at a time)")
                if readable is not None:
                    raise readable from err
                raise
            check_scalar(value, "loss/measurement(params, batch)")
            first = False
        try:
            G = g(flat, chunk)
        except RuntimeError as err:
            readable = explain(err, "per-sample gradients")
            if readable is not None:
                raise readable from err
            raise
        bad = ~torch.isfinite(G).all(dim=1)
        if bool(bad.any()):
            index = offset + int(bad.nonzero()[0])
            raise ValueError(f"non-finite gradient for example {index} of {name}; check that example's inputs")
        offset += G.shape[0]
        yield G


def per_sample_grads(func: Measurement, params: Params, data: Data, *, chunk_size: int | None = None,
                     max_memory: int | None = None, flat: bool = True):
    """Per-example gradients of ``func`` (the training loss, or any measurement) over ``data``.

    Args:
      func: ``func(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      data: batch, list of batches, Dataset or DataLoader.
      chunk_size: examples per ``vmap`` call; default from ``max_memory`` (1 GiB).
      flat: return ``[n, d]``; ``False`` returns a pytree like ``params`` with leaves ``[n, *shape]``.

    Returns:
      ``[n, d]`` (or the pytree) in the parameters' dtype.

    Example:
      >>> G = ifunc.per_sample_grads(loss, params, (x, y))     # [n, d]
    """
    G = torch.cat(list(iter_per_sample_grads(func, params, data, chunk_size=chunk_size,
                                             max_memory=max_memory)))
    if flat:
        return G
    return flatten(params)[1](G)
