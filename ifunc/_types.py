"""Type aliases that say what a value means."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

#: A pytree of tensors (dict name -> tensor, nested containers) or one flat tensor.
Params = Any
#: One batch: a tensor, or a tuple/list/dict of tensors sharing the leading (example) dimension.
Batch = Any
#: Data: a batch, a list of batches, a ``torch.utils.data.Dataset`` or a ``DataLoader``.
Data = Any
#: ``loss(params, batch) -> scalar``: the training loss of one batch, **summed** over its examples.
LossFn = Callable[[Params, Batch], torch.Tensor]
#: ``measurement(params, batch) -> scalar``: the query quantity f, summed over the batch.
Measurement = Callable[[Params, Batch], torch.Tensor]
#: ``matvec(V) -> M V`` on a stack of flat vectors ``[k, d] -> [k, d]``.
MatVec = Callable[[torch.Tensor], torch.Tensor]


class Preconditioner(Protocol):
    """A callable ``[k, d] -> [k, d]`` approximating ``(H + λI)^{-1}`` (any :class:`ifunc.IHVP` qualifies)."""

    def __call__(self, v: torch.Tensor) -> torch.Tensor: ...
