"""The curvature each LiSSA step multiplies by: all of the data, sampled mini-batches, or a loader's batches.

Every call of a LiSSA closure replays the same steps (its generator state is fixed at build time), so the
closure is deterministic; a shuffling DataLoader, whose batches change between passes, is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import torch
from torch.utils.data import DataLoader

from .._batches import batch_size as _batch_size
from .._batches import index_batch
from .._data import DataSource
from .._errors import explained
from .._order import order_problem
from .._types import Data, LossFn, MatVec
from ..curvature import CurvatureOperator, batch_matvec

__all__ = ["fresh", "step_operators"]

#: ``(generator, run) -> the operators of the steps of run ``run`` of ``repeat``, one per step``
Steps = Callable[[torch.Generator, int], Iterator[MatVec]]


def fresh(state: torch.Tensor) -> torch.Generator:
    """A CPU generator in ``state``."""
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def _child(gen: torch.Generator) -> torch.Generator:
    """A generator seeded from ``gen`` (advancing it), for the labels of one step's true Fisher."""
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))


def step_operators(
    loss: LossFn,
    data: Data,
    full: CurvatureOperator,
    operator: MatVec,
    block_op: Callable[[MatVec], MatVec],
    *,
    batch_size: int | None,
    repeat: int,
    who: str,
) -> tuple[bool, Steps]:
    """``(full_steps, steps)``: whether every step uses all of ``data``, and the step operators of each run.

    ``full_steps``: every step is ``operator`` (the mean curvature ``H`` over ``data``, block-diagonal with
    ``blocks``). Otherwise each step is the mean curvature ``H_j`` of ``batch_size`` examples (through
    ``block_op``): drawn uniformly with replacement with the run's generator from in-memory data, or, from a
    DataLoader or Dataset, its examples in order re-cut into consecutive batches, cycled, run ``r`` of
    ``repeat`` starting at batch ``⌊r c / repeat⌋`` of the ``c = ⌈n / b⌉``.

    Raises:
      ValueError: ``repeat > 1`` with full-data steps (identical runs); mini-batch steps from a shuffling
        DataLoader; more runs than a streamed data set has distinct ones.
    """
    source = DataSource(data)
    full_steps = batch_size is None or batch_size >= full.n
    per_step = full.n if batch_size is None else batch_size
    pool = None if full_steps else source.in_memory()
    n_chunks = -(-full.n // per_step)  # a loader's examples in order, cut into consecutive batches of per_step
    if full_steps and repeat > 1:
        raise ValueError(
            f"{who}: repeat={repeat} with all of the data every step (batch_size={batch_size}, n={full.n}): the runs "
            "would be identical (the full-data recursion is deterministic); pass repeat=1, or a batch_size below the "
            "number of examples for averaged mini-batch runs"
        )
    if not full_steps and pool is None:
        problem = order_problem(data) if isinstance(data, DataLoader) else None
        if problem is not None:
            raise ValueError(
                f"{who}: mini-batch steps (batch_size={batch_size}) from a DataLoader that shuffles ({problem}) would "
                "change on every call, but the closure must be deterministic: pass a DataLoader with shuffle=False "
                "(its examples are re-cut into consecutive batches of batch_size), the data in memory (a batch or a "
                "list of batches: batches are then drawn with generator), or batch_size=None"
            )
        if repeat > n_chunks:
            raise ValueError(
                f"{who}: repeat={repeat} runs over data streamed from a DataLoader/Dataset: its {full.n} examples in "
                f"order give only {n_chunks} distinct runs of batch_size={batch_size} (run r starts at batch "
                f"⌊r·{n_chunks}/repeat⌋), so some runs would repeat; pass repeat <= {n_chunks}, or the data in memory "
                "(a batch or a list of batches: independent random batches drawn with generator)"
            )
    where = f"{full.curvature} curvature products (a LiSSA mini-batch)"

    def labels(gen):  # only the true Fisher draws from gen here, so other curvatures keep their streams
        return _child(gen) if full.curvature == "fisher" else None

    def batch_step(batch, gen) -> MatVec:
        """The mean curvature of one batch (block-diagonal with ``blocks``)."""
        size = _batch_size(batch)
        with explained(where):
            product = batch_matvec(loss, full.flat_params, full.unflatten, batch, full.curvature, labels(gen))

        def mean(V: torch.Tensor) -> torch.Tensor:
            with explained(where):
                return product(V) / size

        return block_op(mean)

    def steps(gen: torch.Generator, run: int) -> Iterator[MatVec]:
        if full_steps:
            while True:
                yield operator
        elif pool is not None:  # in memory: batch_size examples drawn with replacement
            while True:
                yield batch_step(index_batch(pool, torch.randint(full.n, (per_step,), generator=gen)), gen)
        else:  # streamed: consecutive batches of batch_size examples in order, cycled; run r starts at its own one
            skip = run * n_chunks // repeat
            while True:
                for i, batch in enumerate(source.chunks(per_step)):
                    if i >= skip:
                        yield batch_step(batch, gen)
                skip = 0

    return full_steps, steps
