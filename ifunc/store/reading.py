"""Reading finished score stores: the whole matrix, the top ``k`` per query, or blocks of columns, each chunk's
CRC-32 checked.

:func:`read_blocks` is the one verified reader: :func:`top_k` and the gradient index
(:meth:`ifunc.index.GradientIndex.chunks`) read through it, :func:`load_scores` checks with its per-chunk check, and
a chunk whose bytes do not match the CRC-32 recorded when it was written raises :class:`ChecksumError` (a
``ValueError``) naming the chunk and its examples.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .._errors import check_count
from ._hdf5 import _open
from ._meta import read_meta
from ._trust import FORMAT, _verify

__all__ = ["load_scores", "top_k", "read_blocks", "ChecksumError"]

_BLOCK_BYTES = 1 << 26  #: the default block of :func:`read_blocks`: about 64 MiB of float32 columns


class ChecksumError(ValueError):
    """A stored chunk whose columns no longer match the CRC-32 recorded when they were written.

    Attributes:
      path: the file. chunk: the chunk's position. start, stop: its columns (training examples) ``start .. stop - 1``.
    """

    def __init__(self, message: str, *, path, chunk: int, start: int, stop: int):
        super().__init__(message)
        self.path, self.chunk, self.start, self.stop = path, chunk, start, stop


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


def _crc32(columns: np.ndarray) -> int:
    """CRC-32 of ``columns [r, w]`` as C-order bytes, row by row (a column slice of a block is never copied)."""
    if columns.flags.c_contiguous:
        return zlib.crc32(columns.data)
    crc = 0
    for row in columns:  # each row of a column slice is contiguous
        crc = zlib.crc32(row, crc)
    return crc


def _check(path, index: int, start: int, columns: np.ndarray, expected: int) -> None:
    """ChecksumError unless chunk ``index`` (columns ``start ..``) matches its recorded CRC-32."""
    if _crc32(columns) == expected:
        return
    stop = start + columns.shape[1]
    try:
        _verify(path, index, columns, expected)  # the store's verdict and message
    except ValueError as err:
        raise ChecksumError(str(err), path=path, chunk=index, start=start, stop=stop) from None
    raise ChecksumError(  # unreachable unless zlib disagrees with itself: refuse rather than pass the chunk
        f"{path}: chunk {index} fails its checksum", path=path, chunk=index, start=start, stop=stop
    )


def _verified_blocks(ds, path, chunk: int, sums: np.ndarray | None, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, columns)`` over ``ds`` in blocks of whole chunks (at least one), each chunk checked."""
    step = max(1, block // chunk) * chunk
    for start in range(0, ds.shape[1], step):
        cols = ds[:, start : start + step]
        if sums is not None:
            for c in range(0, cols.shape[1], chunk):
                index = (start + c) // chunk
                _check(path, index, start + c, cols[:, c : c + chunk], int(sums[index]))
        yield start, cols


def read_blocks(path, *, block: int | None = None, verify: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, columns [n_query, w])`` for consecutive blocks of a finished score store, each chunk checked.

    The blocks cover columns ``0 .. n_train - 1`` in order; block ``(start, columns)`` holds columns ``start ..
    start + w - 1``, whole stored chunks: ``block`` columns rounded down to a multiple of the chunk size (at least
    one chunk; default about 64 MiB), the last block shorter. With ``verify`` every chunk of a block is checked
    against the CRC-32 recorded when it was written before the block is yielded; ``verify=False`` reads blocks of
    exactly ``block`` columns unchecked. The reader holds one block at a time (a fresh array each: a block kept by
    the caller stays valid); the file is open (read-only, shared lock) while the iteration runs and closed when it
    ends or the iterator is closed.

    Raises:
      ChecksumError: a chunk fails its checksum (a ``ValueError`` naming the file, the chunk and its columns).
      ValueError: not a score store, unreadable, incomplete, or its metadata damaged.
      BlockingIOError: another process is writing the file.
      TypeError, ValueError: ``block`` not an int >= 1.

    Example:
      >>> for start, columns in ifunc.store.read_blocks("scores.h5"):
      ...     best = np.maximum(best, columns.max(axis=1))
    """
    if block is not None:
        block = check_count(block, "block", "read_blocks")
    with _open_complete(path) as f:
        chunk, sums = _chunk_checks(f, path, verify)
        ds = f["scores"]
        width = block if block is not None else max(1, _BLOCK_BYTES // (ds.dtype.itemsize * max(1, ds.shape[0])))
        yield from _verified_blocks(ds, path, chunk, sums, width)


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
      ChecksumError: a chunk fails its checksum (a ``ValueError`` naming it).
      ValueError: not a score store, unreadable, incomplete, or its metadata damaged.
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
                _check(path, i, start, scores[:, start : start + chunk], int(sums[i]))
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
      ChecksumError, ValueError: as :func:`load_scores`, or ``k`` out of range.
      TypeError, ValueError: ``k`` or ``block`` not an int >= 1 (a bool or a float included).
    """
    k = check_count(k, "k", "top_k")
    block = check_count(block, "block", "top_k")
    with _open_complete(path) as f:
        n_query, n_train = f["scores"].shape
    if k > n_train:
        raise ValueError(f"k must be in [1, n_train={n_train}], got {k}")
    best_v = torch.empty(n_query, 0)
    best_i = torch.empty(n_query, 0, dtype=torch.long)
    for start, cols in read_blocks(path, block=block, verify=verify):
        vals = torch.from_numpy(cols).to(torch.float64)
        idx = torch.arange(start, start + vals.shape[1]).expand(n_query, -1)
        cat_v = torch.cat([best_v, vals], dim=1)
        cat_i = torch.cat([best_i, idx], dim=1)
        keep = cat_v.topk(min(k, cat_v.shape[1]), dim=1, largest=largest)
        best_v, best_i = keep.values, cat_i.gather(1, keep.indices)
    return best_v, best_i


# ---------------------------------------------------------------- per-rank parts
