"""The seeded draws of the gradient-index projection: stable seeds, Gaussian matrices, sign-hash codes, blocks.

Every draw is named by a path of strings (``("layer", module, "out")``, ``("dense", parameter, block)``) and
made by its own CPU ``torch.Generator`` seeded with ``sha256(f"{seed}/{path}")``: the values depend on the
seed and the names only, never on the global RNG, the order of the calls or the machine. Gaussian draws are
float64 and cast afterwards, so a float32 and a float64 projection are the same matrix up to that one rounding;
sign-hash codes are integers, the same map in every dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch

__all__ = ["stable_seed", "gaussian", "column_blocks", "sign_hash_codes", "sign_hash"]


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


def column_blocks(numel: int, block: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` ranges of one parameter's ``numel`` coordinates in blocks of ``block`` (the last shorter).

    Block ``j`` of the sign hash is drawn on its own (:func:`sign_hash_codes`), so no more than ``block`` codes
    exist at once unless they are held on purpose.
    """
    return [(s, min(s + block, numel)) for s in range(0, numel, block)]


def sign_hash_codes(numel: int, k: int, seed: int, *path: str) -> torch.Tensor:
    """``[numel]`` int64 codes, i.i.d. uniform on ``[0, 2k)``: coordinate ``i`` goes to row ``c_i mod k`` of the
    sketch with sign ``+1`` if ``c_i < k`` else ``-1`` (a uniform row and an independent fair sign)."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, *path))
    return torch.randint(0, 2 * k, (numel,), generator=gen, dtype=torch.int64, device="cpu")


def sign_hash(columns: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int) -> torch.Tensor:
    """``Σ_j x_j S_jᵀ`` for the sign hashes ``S_j [k, n_j]`` of ``(x_j [b, n_j], codes_j [n_j])`` pairs: ``[b, k]``.

    ``columns`` is consumed one pair at a time (a generator may draw each block's codes when it is reached).

    ``S[r, i] = +1`` if ``c_i = r``, ``-1`` if ``c_i = r + k``, else 0: one nonzero per column, so ``SᵀS`` has a
    unit diagonal and ``E[SᵀS] = I`` over the signs. One pass over each ``x_j`` (``index_add_`` into ``2k`` shared
    sums), then one difference; every ``codes_j`` on its ``x_j``'s device.
    """
    sums = None
    for x, codes in columns:
        sums = x.new_zeros(x.shape[0], 2 * k) if sums is None else sums
        sums.index_add_(1, codes, x)
    if sums is None:
        raise ValueError("sign_hash: no columns")
    return sums[:, :k] - sums[:, k:]
