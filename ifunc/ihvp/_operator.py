"""The curvature operator a solver iterates on, sharded over the process group under ``torchrun``.

Every operator-based method (explicit, CG, LiSSA, Arnoldi, Nyström) builds its operator here, so under
``torchrun`` each rank computes the batches ``i ≡ rank (mod W)`` and the products are all-reduced: every
rank then takes the same solver steps. Without a process group it is :func:`ifunc.curvature_operator`.

:func:`rank_partition` is the one place where the process group becomes a :class:`ifunc._data.Partition`: the
Kronecker fit, the curvature operators and the scoring sinks all split their chunks with it.
"""

from __future__ import annotations

import hashlib

import optree
import torch

from .. import distributed
from .._batches import tensor_leaves
from .._chunks import Partition
from .._data import DataSource, fingerprint
from .._types import Data, LossFn, Params
from ..curvature import CurvatureOperator, curvature_operator

__all__ = ["data_operator", "check_same_data", "rank_partition", "data_signature"]


def rank_partition() -> Partition:
    """This process's share of a pass over chunks: ``Partition(rank, W, all-reduce)`` of the default process group.

    Rank ``r`` of ``W`` computes the chunks ``i ≡ r (mod W)`` and ``reduce`` sums a tensor over the ranks;
    without a process group it is ``Partition(0, 1)``, whose ``reduce`` returns its argument.
    """
    rank, size = distributed.world()
    return Partition(rank, size, distributed.reduce_tensor)


def check_same_data(source: DataSource, params: Params | None = None) -> None:
    """Raise on every rank unless all ranks see the same data (size when cheap, first batch) and ``params``.

    ifunc shards the data itself, so each rank must pass all of it, in the same order; a
    ``DistributedSampler`` (each rank a different part) or an unseeded shuffle would otherwise give silently
    wrong sums, and so would parameters that differ between ranks (a rank that loaded another checkpoint, or
    a model cast to another dtype). The message shows each rank's dtypes. Never an extra pass over the data.
    Nothing happens without a process group.
    """
    if not distributed.active():
        return
    leaves = tensor_leaves(source.first())
    signature = (source.cheap_count(), sorted({str(t.dtype) for t in leaves}), fingerprint(leaves))
    what = "data (example count, dtypes, first-batch fingerprint)"
    if params is not None:
        tensors = [t for t in optree.tree_leaves(params, namespace="ifunc") if isinstance(t, torch.Tensor)]
        signature += (sorted({str(t.dtype) for t in tensors}), fingerprint(tensors))
        what = "data or parameters (example count, dtypes, fingerprints)"
    distributed.check_same(
        signature,
        (
            f"{source.name}: the ranks hold different {what}; under torch.distributed every rank must pass the same, "
            "complete data in the same order (no DistributedSampler, no unseeded shuffling) and the same parameters "
            "in the same dtype: ifunc shards the data across the ranks"
        ),
    )


def data_operator(
    loss: LossFn, params: Params, data: Data, *, curvature: str | None = None, generator: torch.Generator | None = None
) -> CurvatureOperator:
    """:func:`ifunc.curvature_operator` over ``data``, with this rank's partition of the batches."""
    check_same_data(DataSource(data, name="data"), params)
    return curvature_operator(loss, params, data, curvature=curvature, generator=generator, partition=rank_partition())


def data_signature(data: Data) -> str:
    """The fingerprints of every batch of ``data``, hashed in order (one pass, no gradients).

    Closures that keep nothing computed from their data (CG, LiSSA solve on it at every call) record it in
    ``info["data"]``, so a score store built on other data is refused instead of resumed.
    """
    h = hashlib.sha256()
    for batch in DataSource(data, name="data"):
        h.update(fingerprint(tensor_leaves(batch)).encode())
    return h.hexdigest()[:32]
