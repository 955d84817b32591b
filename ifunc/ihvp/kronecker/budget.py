"""Chunk sizes of the Kronecker passes from the byte budget: one example's captured forward, measured.

Every Kronecker pass (fitting the factors, preconditioning the queries, pairwise / per-token / self-influence
scoring) holds, per example of a chunk, what autograd saves in the forward pass (activations, logits), the captured
layer inputs ``a`` and output gradients ``g`` and the backward pass's temporaries. The saved storages are counted
(:func:`ifunc._memory.probe_bytes`) for one and for two examples: the difference is what one more example adds (the
parameters autograd saves for the backward pass are not per example). The chunk is the budget over three times
that, plus what a pass holds per example besides (``extra_per_example``, e.g. the ``[n_query, T]`` per-token
scores), within the one cap of :func:`ifunc._memory.chunk_cap` with the positions (tokens, patches) one example adds
to the captured products: by default (``max_memory=None``: half the available memory, and at most 1 GiB of
per-example tensors) at most :data:`~ifunc._memory.DEFAULT_POSITIONS` positions or
:data:`~ifunc._memory.MIN_CHUNK` examples, whichever is more, and never more than
:data:`~ifunc._memory.MAX_CHUNK` examples. The default favours memory over the last bit of speed on large models;
``max_memory=`` chooses larger chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..._batches import batch_size, slice_batch
from ..._chunks import check_chunk_size
from ..._data import as_source  # the one chunk-size rule
from ..._memory import added_bytes, chunk_examples, probe_bytes
from ..._types import Data, LossFn, Params
from .capture import layer_capture, requiring_grad
from .layers import LayerSpec

__all__ = ["capture_chunk_size", "check_chunk_size"]


def capture_chunk_size(
    loss: LossFn,
    params: Params,
    model: nn.Module,
    layers: Sequence[LayerSpec],
    data: Data,
    *,
    max_memory: int | None,
    what: str,
    extra_per_example: int | Callable[[int], int] = 0,
    fixed: int = 0,
) -> int:
    """Examples per chunk of a captured pass over ``data`` within ``max_memory`` bytes.

    ``max_memory=None`` is the default budget: half the available memory, and at most 1 GiB of per-example tensors
    (:func:`ifunc._memory.chunk_examples`, capped by :func:`ifunc._memory.chunk_cap` with the positions one example
    adds, read off the probe). ``fixed`` bytes are held besides (e.g. the factors being summed);
    ``extra_per_example`` bytes per example besides the captured forward (a number, or a function of the positions
    one example adds, e.g. for score columns per token or a contraction whose temporaries depend on them).

    Raises:
      MemoryError: not even one example fits, with the numbers.
    """
    first = as_source(data, name=what).first()
    size = batch_size(first)  # a readable error for a batch without an example dimension
    p = requiring_grad(params)
    positions = [1]  # rows one example adds to the captured products (tokens, patches), read off the probe

    def probe(k: int) -> int:
        part = slice_batch(first, 0, k)

        def run():
            with layer_capture(model, list(layers)) as rec, torch.enable_grad():
                value = loss(p, part)
            # rows per example whichever dimension indexes the examples (the specs may not be probed yet)
            rows = (sum(x.shape[0] * x.shape[1] for x in rec.inputs[s.name]) // k for s in layers)  # [b, T, ...]
            positions.append(max(rows, default=1))
            return [value] + [o for outputs in rec.outputs.values() for o in outputs]

        return probe_bytes(run)

    added = added_bytes(probe, size)
    extra = extra_per_example(max(positions)) if callable(extra_per_example) else extra_per_example
    per_example = added + extra // 3
    return chunk_examples(max_memory, per_example, what=what, fixed=fixed, positions=max(positions))
