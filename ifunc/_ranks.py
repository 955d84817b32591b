"""The ranks of the default process group and their handshakes: who they are, and whether they agree.

:func:`world` and :func:`active` say which rank this process is among how many (``(0, 1)`` without a process
group); collectives run on the current GPU under nccl, on the CPU under gloo. Before a collective whose ranks
could disagree, :mod:`ifunc.distributed` gathers every rank's shapes and dtypes (or a picklable value) and
compares them here: a mismatch raises the same ``ValueError`` on every rank, naming what disagrees and each rank's
shape and dtype, so no rank is left waiting inside gloo/nccl. A leaf: it imports no other ifunc module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["world", "active", "check_same", "SAME_PARAMS", "SAME_QUERIES"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return world()[1] > 1


def _device() -> torch.device:
    """Where collectives run: the current GPU for nccl, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_object(obj) -> list:
    out = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


SAME_PARAMS = "every rank must hold the same parameters in the same dtype (cast the model the same way on every rank)"
SAME_QUERIES = "every rank must pass the same query data and hold the same parameters in the same dtype"


def _spec(t) -> tuple | None:
    """``(shape, dtype)`` of a tensor, None for anything else (a rank holding nothing, a number)."""
    return (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None


def _agree(what: str, per_rank: list, fix: str) -> tuple | None:
    """The ``(shape, dtype)`` every rank holding a tensor has (None if no rank holds one).

    Raises ValueError on every rank alike (they all see the same gathered specs, so none waits in a collective)
    naming ``what`` and each rank's shape and dtype when they differ.
    """
    found = [s for s in per_rank if s is not None]
    if any(s != found[0] for s in found):
        seen = ", ".join(
            f"rank {r}: {'nothing' if s is None else f'{s[1]} {list(s[0])}'}" for r, s in enumerate(per_rank)
        )
        raise ValueError(f"ranks disagree on the shape/dtype of {what} ({seen}); {fix}")
    return found[0] if found else None


def _check_owners(owners: Sequence[int], count: int, size: int) -> None:
    """Raise ValueError unless ``owners`` holds ``count`` ranks of ``range(size)``."""
    if len(owners) != count or any(not 0 <= r < size for r in owners):
        raise ValueError(
            f"owners must give one rank in [0, {size}) per item ({count} items), got {list(owners)}; build them "
            "with the process group's partition, owners[i] = partition.owner(i)"
        )


def check_same(value, message: str) -> None:
    """Raise ``ValueError(message)`` on every rank unless all ranks hold an equal (picklable) ``value``."""
    if not active():
        return
    seen = _gather_object(value)
    if any(s != seen[0] for s in seen):
        raise ValueError(f"{message} (per rank: {seen})")
