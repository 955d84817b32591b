"""The seeded Gaussian matrices of the gradient-index projection: stable seeds, float64 draws, column blocks.

Every matrix is named by a path of strings (``("layer", module, "out")``, ``("dense", parameter, block)``) and
drawn from its own CPU ``torch.Generator`` seeded with ``sha256(f"{seed}/{path}")``: the values depend on the
seed and the names only, never on the global RNG, the order of the calls or the machine. Draws are float64 and
cast afterwards, so a float32 and a float64 projection are the same matrix up to that one rounding.
"""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = ["stable_seed", "gaussian", "column_blocks"]


def stable_seed(seed: int, *path: str) -> int:
    """The generator seed of the matrix named ``path``: the first 63 bits of ``sha256(f"{seed}/{'/'.join(path)}")``.

    Stable across processes, machines and Python versions (unlike ``hash``). The last element of a path is never
    free text (``"out"``, ``"in"`` or a block index), so two different ``(name, last)`` pairs never give one string.
    """
    text = "/".join((str(int(seed)), *path))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def gaussian(rows: int, cols: int, seed: int, *path: str) -> torch.Tensor:
    """``[rows, cols]`` float64 on the CPU with i.i.d. entries ``N(0, 1/rows)``, so ``E[RᵀR] = I_cols``."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, *path))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64, device="cpu") / math.sqrt(rows)


def column_blocks(numel: int, k: int, block: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` column ranges of one parameter's ``[k, numel]`` slab of ``R``, each ``≤ block`` entries.

    ``width = max(1, block // k)`` columns per block (the last one shorter); block ``j`` is drawn on its own, so
    no more than ``k · width`` random numbers exist at once.
    """
    width = max(1, block // max(k, 1))
    return [(s, min(s + width, numel)) for s in range(0, numel, width)]
