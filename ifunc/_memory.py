"""One byte budget for every pass that holds per-example or per-token tensors.

Chunk sizes come from ``max_memory`` (bytes; default :func:`default_budget`, half of the memory the machine has
available, and then at most :data:`DEFAULT_CHUNK_BYTES` of per-example tensors) divided by the bytes one example
adds, *measured* (:func:`added_bytes`: a pass over two examples minus one over one): the tensors autograd saves for
the backward pass (activations, logits included) and the outputs of the pass, times a factor for the backward pass's
own temporaries. The generic per-example gradients (:func:`ifunc.grads.chunk_size_for`) and every Kronecker pass
(:mod:`ifunc.ihvp.kronecker.budget`) size their chunks here. A pass that cannot fit even one example raises with the
numbers instead of being killed by the operating system.
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
    "release_free_memory",
    "DEFAULT_CHUNK_BYTES",
]

#: fraction of the available memory a pass may use by default
DEFAULT_FRACTION = 0.5
#: bytes of per-example tensors one chunk holds at most when ``max_memory`` is not given: by default a pass holds
#: about the model, what it accumulates and 1 GiB, not half the machine (larger chunks buy little speed)
DEFAULT_CHUNK_BYTES = 1 << 30


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
    the covariance pass, the eigendecompositions, the eigenvalue pass and the query preparation): on GPT-2 small
    the fit otherwise left about 0.85 GB of free heap resident under the scoring pass.
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


def chunk_examples(max_memory: int | None, per_example: int, *, what: str, fixed: int = 0, factor: float = 3.0) -> int:
    """Examples per chunk: :func:`examples_per_chunk` within ``max_memory``, and without it also at most
    :data:`DEFAULT_CHUNK_BYTES` of per-example tensors."""
    n = examples_per_chunk(resolve_budget(max_memory), per_example, what=what, fixed=fixed, factor=factor)
    if max_memory is None:
        n = min(n, max(1, DEFAULT_CHUNK_BYTES // max(1, int(factor * per_example))))
    return n


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
            f"{_size(fixed)} held, but the budget is {_size(budget)} "
            f"(max_memory=; default {DEFAULT_FRACTION:.0%} of the {available_bytes() / 2**30:.1f} GiB available): "
            "raise max_memory, free memory, or shorten the sequences"
        )
    return int(n)
