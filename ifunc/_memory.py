"""One byte budget and one chunk cap for every pass that holds per-example or per-token tensors.

Chunk sizes come from ``max_memory`` (bytes) divided by the bytes one example adds, *measured*
(:func:`added_bytes`: a pass over two examples minus one over one): the tensors autograd saves for the backward
pass (activations, logits included) and the outputs of the pass, times a factor for the backward pass's own
temporaries. Without ``max_memory``, the default budget: half the available memory (:func:`default_budget`), and
at most :data:`DEFAULT_CHUNK_BYTES` (1 GiB) of per-example tensors. :func:`chunk_cap` is the one cap on the number
of examples, :func:`chunk_examples` the one chunk-size rule: the generic per-example gradients
(:func:`ifunc.grads.chunk_size_for`) and every Kronecker pass (:mod:`ifunc.ihvp.kronecker.budget`) size their chunks
with it. A pass that cannot fit even one example raises with the numbers instead of being killed by the operating
system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "available_bytes",
    "default_budget",
    "resolve_budget",
    "probe_bytes",
    "added_bytes",
    "examples_per_chunk",
    "chunk_examples",
    "chunk_cap",
    "release_free_memory",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK",
    "DEFAULT_POSITIONS",
    "MIN_CHUNK",
]

#: fraction of the available memory a pass may use by default
DEFAULT_FRACTION = 0.5
#: bytes of per-example tensors one chunk holds at most when ``max_memory`` is not given: by default a pass holds
#: about the model, what it accumulates and 1 GiB, not half the machine (larger chunks buy little speed)
DEFAULT_CHUNK_BYTES = 1 << 30
#: examples per chunk at most, whatever the budget (a finished chunk is also the unit a resumed score store keeps)
MAX_CHUNK = 4096
#: positions (rows of the captured products: examples × tokens or patches) per chunk by default: the products reach
#: their full rate well before, so larger default chunks only cost memory. ``max_memory=`` or ``chunk_size=``
#: chooses larger chunks
DEFAULT_POSITIONS = 4096
#: examples the positions rule always allows (the byte budget still bounds them): an image's first convolution has
#: a position per pixel, and too few images per chunk leave the products small
MIN_CHUNK = 32


def available_bytes() -> int:
    """Memory available to this process now: ``MemAvailable`` of ``/proc/meminfo``, else physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no C library found, or not glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> None:
    """Return the C allocator's free pages to the operating system (glibc's ``malloc_trim(0)``; else a no-op).

    glibc serves tensors below its adaptive mmap threshold (up to 32 MiB: a 768 × 3072 float32 factor, a chunk's
    activations) from its heap and keeps their pages when they are freed, so after a pass the process's resident
    memory still counts everything the pass held at its peak. The Kronecker passes call this between passes (after
    the covariance pass, the eigendecompositions, the eigenvalue pass and the query preparation), so the free heap
    of one pass does not stay resident under the next.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_budget() -> int:
    """Bytes a pass may hold by default: :data:`DEFAULT_FRACTION` of :func:`available_bytes`."""
    return int(DEFAULT_FRACTION * available_bytes())


def resolve_budget(max_memory: int | None) -> int:
    """``max_memory`` as a positive number of bytes (``None``: :func:`default_budget`)."""
    if max_memory is None:
        return default_budget()
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return int(max_memory)


def _count(seen: dict[int, int], t) -> None:
    if isinstance(t, torch.Tensor) and t.layout == torch.strided:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())


def probe_bytes(run: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes, plus those of what it returns.

    ``run`` is one forward pass (on one example) whose result would be differentiated; the saved storages are
    what the backward pass keeps alive (activations, logits), the returned ones what the caller keeps. The probe
    is never differentiated: the hook records sizes and saves nothing (a saved tensor packed as itself forms a
    cycle through autograd's graph that Python's collector cannot see, keeping the probe's whole forward alive).
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> None:
        _count(seen, t)

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("ifunc's memory probe is a forward pass only; it cannot be differentiated")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = run()
    for t in out if isinstance(out, (list, tuple)) else [out]:
        _count(seen, t)
    return sum(seen.values())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def added_bytes(probe: Callable[[int], int], size: int) -> int:
    """Bytes one more example adds: ``probe(2) − probe(1)`` when the batch has two examples, else ``probe(1)``.

    ``probe(k)`` measures a pass over ``k`` examples (:func:`probe_bytes`); the difference leaves out what does
    not grow with the examples (the parameters autograd saves for the backward pass).
    """
    one = probe(1)
    return max(probe(2) - one, 1) if size >= 2 else one


def chunk_cap(max_memory: int | None, positions: int = 1) -> int:
    """The most examples a chunk holds, whatever the bytes: the one cap.

    With an explicit ``max_memory``: :data:`MAX_CHUNK` (4096). Without it (the default budget), also at most
    :data:`DEFAULT_POSITIONS` positions, but never fewer than :data:`MIN_CHUNK` examples:
    ``min(MAX_CHUNK, max(MIN_CHUNK, DEFAULT_POSITIONS // positions))``.

    Args:
      max_memory: the caller's byte budget, or ``None`` for the default one.
      positions: rows one example adds to the pass's products: 1 for per-example gradients, the tokens or patches
        of a layer for a captured Kronecker pass (the largest over the layers).
    """
    if max_memory is not None:
        return MAX_CHUNK
    return min(MAX_CHUNK, max(MIN_CHUNK, DEFAULT_POSITIONS // max(1, positions)))


def chunk_examples(
    max_memory: int | None, per_example: int, *, what: str, fixed: int = 0, factor: float = 3.0, positions: int = 1
) -> int:
    """Examples per chunk: the one chunk-size rule.

    :func:`examples_per_chunk` within ``max_memory`` (``None``: the default budget: half the available memory,
    and at most :data:`DEFAULT_CHUNK_BYTES` of per-example tensors, ``factor · per_example`` each), and at most
    :func:`chunk_cap` ``(max_memory, positions)`` examples.

    Raises:
      MemoryError: not even one example fits, with the numbers.
    """
    n = examples_per_chunk(resolve_budget(max_memory), per_example, what=what, fixed=fixed, factor=factor)
    if max_memory is None:
        n = min(n, max(1, DEFAULT_CHUNK_BYTES // max(1, int(factor * per_example))))
    return min(n, chunk_cap(max_memory, positions))


def examples_per_chunk(budget: int, per_example: int, *, what: str, fixed: int = 0, factor: float = 3.0) -> int:
    """``⌊(budget − fixed) / (factor · per_example)⌋`` examples; ``MemoryError`` naming the numbers below one.

    ``factor`` covers the backward pass's temporaries (gradients as large as the saved activations, and the
    captured layer inputs and output gradients).
    """
    need = max(1, int(factor * per_example))
    n = (budget - fixed) // need
    if n < 1:
        raise MemoryError(
            f"{what}: one example needs about {_size(need)} ({_size(per_example)} measured × {factor:g}) on top of "
            f"{_size(fixed)} held, but the budget is {_size(budget)} (max_memory=, by default "
            f"{DEFAULT_FRACTION:.0%} of the {available_bytes() / 2**30:.1f} GiB available): raise max_memory, free "
            "memory, or make one example smaller (shorter sequences, smaller inputs)"
        )
    return int(n)
