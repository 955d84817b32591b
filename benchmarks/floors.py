"""The machine's matmul rate, the denominator of every benchmark's FLOP floor (floor = FLOPs ÷ this rate)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def gemm_rate(threads: int | None = None, mm: Callable = torch.mm, *, repeats: int = 5) -> float:
    """Median GFLOP/s of a 2048² float32 matrix product ``mm(a, b)`` (on ``threads`` threads if given)."""
    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / sorted(times)[repeats // 2] / 1e9
