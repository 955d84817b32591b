"""The curvature operator a solver iterates on, sharded over the process group under ``torchrun``.

Every operator-based method (explicit, CG, LiSSA, Arnoldi, Nyström) builds its operator here, so under
``torchrun`` each rank computes the batches ``i ≡ rank (mod W)`` and the products are all-reduced: every
rank then takes the same solver steps. Without a process group it is :func:`ifunc.curvature_operator`.
"""

from __future__ import annotations

import torch

from .. import distributed
from .._data import DataSource, fingerprint, tensor_leaves
from .._types import Data, LossFn, Params
from ..curvature import CurvatureOperator, Partition, curvature_operator

__all__ = ["data_operator", "check_same_data", "rank_partition"]


def rank_partition() -> Partition:
    """This process's share of a sum over batches: rank ``r`` of ``W`` sums ``i ≡ r (mod W)``, all-reduced."""
    rank, size = distributed.world()
    return Partition(rank, size, distributed.reduce_tensor)


def check_same_data(source: DataSource) -> None:
    """Raise on every rank unless all ranks see the same data: same size (when cheap), same first batch.

    ifunc shards the data itself, so each rank must pass all of it, in the same order; a
    ``DistributedSampler`` (each rank a different part) or an unseeded shuffle would otherwise give silently
    wrong sums. Never an extra pass over the data. Nothing happens without a process group.
    """
    if not distributed.active():
        return
    signature = (source.cheap_count(), fingerprint(tensor_leaves(source.first())))
    distributed.check_same(
        signature,
        (
            f"{source.name}: the ranks hold different data (example count, first-batch fingerprint); under "
            "torch.distributed every rank must pass the same, complete data in the same order (no DistributedSampler, "
            "no unseeded shuffling): ifunc shards it across the ranks"
        ),
    )


def data_operator(
    loss: LossFn, params: Params, data: Data, *, curvature: str | None = None, generator: torch.Generator | None = None
) -> CurvatureOperator:
    """:func:`ifunc.curvature_operator` over ``data``, with this rank's partition of the batches."""
    check_same_data(DataSource(data, name="data"))
    return curvature_operator(loss, params, data, curvature=curvature, generator=generator, partition=rank_partition())
