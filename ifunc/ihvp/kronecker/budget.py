"""Chunk sizes of the Kronecker passes from the byte budget: one example's captured forward, measured.

Every Kronecker pass (fitting the factors, preconditioning the queries, pairwise / per-token / self-influence
scoring) holds, per example of a chunk, what autograd saves in the forward pass (activations, logits), the captured
layer inputs ``a`` and output gradients ``g`` and the backward pass's temporaries. The saved storages are counted
(:func:`ifunc._memory.probe_bytes`) for one and for two examples: the difference is what one more example adds (the
parameters autograd saves for the backward pass — 0.5 GB for GPT-2 small — are not per example). The chunk is the
budget over three times that, plus what a pass holds per example besides (``extra_per_example``, e.g. the
``[n_query, T]`` per-token scores), capped at :data:`DEFAULT_CHUNK` examples and, when ``max_memory`` is not given,
at :data:`DEFAULT_POSITIONS` positions (or :data:`MIN_CHUNK` examples) and at
:data:`ifunc._memory.DEFAULT_CHUNK_BYTES` of per-example tensors (so that, by default, a pass holds about the model,
its factors and at most 1 GiB, not half the machine). The byte cap
costs some speed on large models: GPT-2 small gets chunks of 2 sequences (256 positions), and a 2-thread
``[rows, 3072]`` covariance product ran at 68 % (256 rows) and 94 % (1,024 rows) of its 2,048-row rate on the
benchmark machine; pass ``max_memory=`` for larger chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..._data import DataSource, batch_size, check_chunk_size, slice_batch  # the one chunk-size rule
from ..._memory import added_bytes, chunk_examples, probe_bytes
from ..._types import Data, LossFn, Params
from .capture import layer_capture, requiring_grad
from .layers import LayerSpec

__all__ = ["DEFAULT_CHUNK", "DEFAULT_POSITIONS", "MIN_CHUNK", "capture_chunk_size", "check_chunk_size"]

#: examples per chunk at most (the chunk is also the unit a resumed score store keeps)
DEFAULT_CHUNK = 256

#: positions (rows of the captured products: examples × tokens or patches) per chunk by default. The covariance and
#: contraction products reach their full rate well before: on the language-model benchmark (2 cores, 64 tokens per
#: sequence) chunks of 64 sequences ran the fit, pairwise and per-token scores as fast as chunks of 209 with half the
#: peak memory (663 vs 1,381 MB). Only the default is capped: ``max_memory=`` or ``chunk_size=`` chooses larger chunks.
DEFAULT_POSITIONS = 4096

#: examples the positions cap always allows (the byte budget still bounds them): a 3-channel 32 × 32 image has 1,024
#: positions in its first convolution, and a small CNN's fit ran 1.4× faster in chunks of 32 images than of 4
MIN_CHUNK = 32


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
    size = batch_size(first)  # a readable error for a batch without an example dimension
    p = requiring_grad(params)
    positions = [1]  # rows one example adds to the captured products (tokens, patches), read off the probe

    def probe(k: int) -> int:
        part = slice_batch(first, 0, k)

        def run():
            with layer_capture(model, list(layers)) as rec, torch.enable_grad():
                value = loss(p, part)
            # rows per example whichever dimension indexes the examples (the specs may not be probed yet)
            rows = (sum(x.numel() // max(1, x.shape[-1]) for x in rec.inputs[s.name]) // k for s in layers)
            positions.append(max(rows, default=1))
            return [value] + [o for outputs in rec.outputs.values() for o in outputs]

        return probe_bytes(run)

    per_example = added_bytes(probe, size) + extra_per_example // 3
    if max_memory is None:  # by default no more positions than the products need for their full rate
        cap = min(cap, max(MIN_CHUNK, DEFAULT_POSITIONS // max(positions)))
    return min(cap, chunk_examples(max_memory, per_example, what=what, fixed=fixed))
