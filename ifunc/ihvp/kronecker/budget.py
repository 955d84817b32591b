"""Chunk sizes of the Kronecker passes from the byte budget: one example's captured forward, measured.

Every Kronecker pass (fitting the factors, preconditioning the queries, pairwise / per-token / self-influence
scoring) holds, per example of a chunk, what autograd saves in the forward pass (activations, logits), the
captured layer inputs ``a`` and output gradients ``g`` and the backward pass's temporaries. One example is run
under the capture hooks and its saved storages counted (:func:`ifunc._memory.probe_bytes`); the chunk is the
budget over three times that, plus what a pass holds per example besides (``extra_per_example``, e.g. the
``[n_query, T]`` per-token scores), capped at :data:`DEFAULT_CHUNK`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..._data import DataSource, batch_size, slice_batch
from ..._memory import examples_per_chunk, probe_bytes, resolve_budget
from ..._types import Data, LossFn, Params
from .capture import layer_capture, requiring_grad
from .layers import LayerSpec

__all__ = ["DEFAULT_CHUNK", "capture_chunk_size"]

#: examples per chunk at most (the chunk is also the unit a resumed score store keeps)
DEFAULT_CHUNK = 256


def capture_chunk_size(
    loss: LossFn,
    params: Params,
    model: nn.Module,
    layers: Sequence[LayerSpec],
    data: Data,
    *,
    max_memory: int | None,
    what: str,
    extra_per_example: int = 0,
    fixed: int = 0,
    cap: int = DEFAULT_CHUNK,
) -> int:
    """Examples per chunk of a captured pass over ``data`` within ``max_memory`` bytes (None: the default budget).

    Raises:
      MemoryError: not even one example fits, with the numbers.
    """
    first = DataSource(data, name=what).first()
    batch_size(first)  # a readable error for a batch without an example dimension
    one = slice_batch(first, 0, 1)
    p = requiring_grad(params)

    def run():
        with layer_capture(model, list(layers)) as rec, torch.enable_grad():
            value = loss(p, one)
        return [value] + [o for outputs in rec.outputs.values() for o in outputs]

    per_example = probe_bytes(run) + extra_per_example // 3
    return min(cap, examples_per_chunk(resolve_budget(max_memory), per_example, what=what, fixed=fixed))
