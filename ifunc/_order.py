"""The order of a DataLoader and the global RNG while user data is read.

:func:`order_problem` says whether a DataLoader yields its examples in a fixed order (score columns and sampled
labels follow the order of the data); :func:`own_rng_stream` iterates user data on a stream of its own (a
DataLoader draws its seeds from the global RNG): the caller's RNG never moves, and every pass, started from the
same global state, draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

__all__ = ["order_problem", "own_rng_stream"]

_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def order_problem(loader: DataLoader) -> str | None:
    """None when ``loader`` yields its examples in a fixed order, else what makes the order random.

    Fixed: an iterable-style data set (its own order), a ``SequentialSampler`` (directly or under a plain
    ``BatchSampler``), or any other sampler / batch sampler whose indices are the same on two passes (checked by
    iterating them twice with the global RNG saved and restored, so nothing is consumed). Random, refused by type
    without iterating: ``RandomSampler`` (seeded or not), ``SubsetRandomSampler``, ``WeightedRandomSampler`` and
    any sampler with ``shuffle=True`` (``DistributedSampler``), also under a ``BatchSampler``.
    """
    if isinstance(loader.dataset, IterableDataset):
        return None
    index_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    inner = index_sampler.sampler if isinstance(index_sampler, BatchSampler) else index_sampler
    if isinstance(inner, _RANDOM_SAMPLERS) or getattr(inner, "shuffle", False) is True:
        return f"its order comes from a {type(inner).__name__}, which draws a random order"
    if type(inner) is SequentialSampler and type(index_sampler) in (SequentialSampler, BatchSampler):
        return None
    state = torch.get_rng_state()
    try:
        orders = [_plain(list(index_sampler)), _plain(list(index_sampler))]
    finally:
        torch.set_rng_state(state)
    if orders[0] != orders[1]:
        culprit = index_sampler if type(inner) is SequentialSampler else inner
        return f"its sampler {type(culprit).__name__} gave two different orders on two passes"
    return None


def _plain(indices):
    """Sampler output as plain Python values (tensors to lists), for comparison."""
    if isinstance(indices, torch.Tensor):
        return indices.tolist()
    if isinstance(indices, (list, tuple)):
        return [_plain(i) for i in indices]
    return indices


def own_rng_stream(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate user data with its own stream of the global CPU RNG, leaving the global RNG where it was.

    A DataLoader draws its base seed from the global RNG when it starts a pass (and an unseeded random sampler
    or a data set's augmentations draw from it too). Here those draws run on a copy of the global state taken
    when the pass starts, swapped in around each step of the data and out again, so the caller's RNG never moves
    and every pass draws the same numbers (worker ``i`` still gets seed ``base + i``). Cost: four state
    copies of 5 KB per batch.
    """
    outer = torch.get_rng_state()
    try:
        it = iter(batches)
    finally:
        inner = torch.get_rng_state()
        torch.set_rng_state(outer)
    while True:
        outer = torch.get_rng_state()
        torch.set_rng_state(inner)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            inner = torch.get_rng_state()
            torch.set_rng_state(outer)
        yield batch
