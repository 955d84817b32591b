"""Reading finished score stores: the whole matrix, or the top ``k`` per query, each chunk's CRC-32 checked."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .._errors import check_count
from ._hdf5 import _open
from ._meta import read_meta
from ._trust import FORMAT, _verify

__all__ = ["load_scores", "top_k"]


def _open_complete(path) -> Any:
    f = _open(path, FORMAT, "score store")
    done = f["done"][...]
    if not done.all():
        missing = int((done == 0).sum())
        f.close()
        raise ValueError(
            f"{path} is incomplete ({missing} of {len(done)} chunks missing): re-run the same "
            "attribute(..., out=path) call to finish it"
        )
    return f


def _chunk_checks(f, path, verify: bool) -> tuple[int, np.ndarray | None]:
    """``(chunk size, checksums)``; checksums None when not verifying, or for a version 1 file (with a warning).

    Unverified reading needs no metadata (chunk size 1: any block of columns will do).
    """
    if not verify:
        return 1, None
    try:
        chunk = int(read_meta(f)["chunk_size"])
        if chunk < 1:
            raise ValueError(f"chunk_size {chunk}")
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path}: the store's metadata is damaged ({type(err).__name__}: {err}), so its chunks cannot be "
            "checked. Re-run the attribute(..., out=path) call with overwrite=True to recompute the scores, or read "
            "them unchecked with verify=False"
        ) from None
    if "checksums" not in f:
        warnings.warn(
            f"{path} was written by an older ifunc without checksums; its scores cannot be verified", stacklevel=3
        )
        return chunk, None
    return chunk, f["checksums"][...]


def _verified_blocks(ds, path, chunk: int, sums: np.ndarray | None, block: int):
    """``(start, columns)`` over ``ds`` in blocks of whole chunks (at least one), each chunk checked."""
    step = max(1, block // chunk) * chunk
    for start in range(0, ds.shape[1], step):
        cols = ds[:, start : start + step]
        if sums is not None:
            for c in range(0, cols.shape[1], chunk):
                _verify(path, (start + c) // chunk, cols[:, c : c + chunk], int(sums[(start + c) // chunk]))
        yield start, cols


def load_scores(path, *, lazy: bool = False, verify: bool = True):
    """Read a finished score store.

    Args:
      lazy: return the read-only ``h5py.Dataset`` instead of an array (its file stays open until the dataset
        is garbage collected or ``ds.file.close()`` is called).
      verify: check every chunk against its CRC-32 (with ``lazy=True`` the file is read once, about 64 MiB
        at a time, before the dataset is returned). ``False`` skips this for speed.

    Returns:
      ``np.ndarray [n_query, n_train]``, or the ``h5py.Dataset`` with ``lazy=True``.

    Raises:
      ValueError: not a score store, unreadable, incomplete, its metadata damaged, or a chunk fails its checksum
        (named).
      BlockingIOError: another process is writing the file.
    """
    f = _open_complete(path)
    try:
        chunk, sums = _chunk_checks(f, path, verify)
        ds = f["scores"]
        if lazy:
            if sums is not None:  # one pass, about 64 MiB at a time
                for _ in _verified_blocks(ds, path, chunk, sums, (1 << 24) // max(1, ds.shape[0])):
                    pass
            return ds
        scores = ds[...]
        if sums is not None:
            for i, start in enumerate(range(0, scores.shape[1], chunk)):
                _verify(path, i, scores[:, start : start + chunk], int(sums[i]))
        f.close()
        return scores
    except BaseException:
        f.close()
        raise


def top_k(
    path, k: int, *, block: int = 65536, largest: bool = True, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest (or lowest) scoring training examples per query, reading ``block`` columns at a time.

    ``block`` is rounded down to whole chunks of the store (at least one); with ``verify`` every chunk is
    checked against its CRC-32 as it is read.

    Returns:
      ``(values [n_query, k], indices [n_query, k])`` without ever loading the whole matrix.

    Raises:
      ValueError: as :func:`load_scores`, or ``k`` out of range.
      TypeError, ValueError: ``k`` or ``block`` not an int >= 1 (a bool or a float included).
    """
    k = check_count(k, "k", "top_k")
    block = check_count(block, "block", "top_k")
    with _open_complete(path) as f:
        ds = f["scores"]
        n_query, n_train = ds.shape
        if k > n_train:
            raise ValueError(f"k must be in [1, n_train={n_train}], got {k}")
        chunk, sums = _chunk_checks(f, path, verify)
        best_v = torch.empty(n_query, 0)
        best_i = torch.empty(n_query, 0, dtype=torch.long)
        for start, cols in _verified_blocks(ds, path, chunk, sums, block):
            vals = torch.from_numpy(cols).to(torch.float64)
            idx = torch.arange(start, start + vals.shape[1]).expand(n_query, -1)
            cat_v = torch.cat([best_v, vals], dim=1)
            cat_i = torch.cat([best_i, idx], dim=1)
            keep = cat_v.topk(min(k, cat_v.shape[1]), dim=1, largest=largest)
            best_v, best_i = keep.values, cat_i.gather(1, keep.indices)
        return best_v, best_i


# ---------------------------------------------------------------- per-rank parts
