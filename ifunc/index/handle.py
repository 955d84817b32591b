"""A finished gradient index, reopened read-only: its projection, its size, and its rows chunk by chunk.

An index (written by :func:`ifunc.index.build_index`) is a score store (:mod:`ifunc.store`) whose "queries" are the
``dim`` coordinates of the projection: the file holds ``scores [dim, n]`` in float32, column ``i`` the projected
gradient of training example ``i``, written in chunks of ``chunk`` columns with a CRC-32 per chunk. Its metadata says
how it was built (``kind = "gradient index"``, the projection's description, fingerprints of the parameters, content
hashes of the loss and the model). :class:`GradientIndex` reads it back as rows ``[b, dim]`` per chunk, each chunk
checked against its checksum as it is read, one chunk in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import store
from ..store import ChecksumError, read_blocks
from .projection import Projection

__all__ = ["GradientIndex", "open_index", "projection_digest", "INDEX_KIND"]

INDEX_KIND = "gradient index"  #: the ``kind`` recorded in the metadata of every index


def projection_digest(projection: Projection) -> str:
    """SHA-256 of the projection's description (sorted JSON): recorded in an index, checked when it is opened, so
    an edited seed, size or layer name is refused instead of silently projecting queries another way."""
    text = json.dumps(projection.describe(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _as_index_error(path: Path, err: ValueError) -> ValueError:
    """A score store's refusal said for an index: an unfinished build, or a chunk that fails its checksum."""
    if isinstance(err, ChecksumError):
        return ValueError(
            f"{path}: chunk {err.chunk} (examples {err.start}..{err.stop - 1}) fails its checksum: the index was "
            "changed or damaged after it was written. Rebuild it with build_index(..., overwrite=True)"
        )
    missing = re.search(r"\(\d+ of \d+ chunks missing\)", str(err))
    if missing:
        return ValueError(
            f"{path} is an unfinished gradient index {missing.group(0)}: re-run the same "
            "build_index(..., out=path) call to finish it (it resumes at the first missing chunk)"
        )
    return err


def _open_columns(path: Path) -> Any:
    """The finished store's ``scores`` dataset, open read-only (shared lock); refusals named for an index."""
    try:
        return store.load_scores(path, lazy=True, verify=False)
    except ValueError as err:
        raise _as_index_error(path, err) from None


class GradientIndex(NamedTuple):
    """A finished gradient index: ``n`` training examples, each a row of ``dim`` projected gradient coordinates.

    Row ``i`` (example ``i`` of the training data, in data order) is ``P(∇ℓ(z_i))`` with ``P`` the index's
    :class:`~ifunc.index.projection.Projection`: per Kronecker layer ``vec(P_o G_i P_aᵀ)`` (``k_o·k_a`` values,
    row-major), layers in order, then the dense projection of the other parameters (``k_dense`` values). The file
    stores the transpose ``[dim, n]`` in float32; rows come back float32 on the CPU.

    Attributes:
      path: the HDF5 file. projection: the projection the rows were made with. n: training examples.
      dim: coordinates per example (``projection.dim``). chunk: examples per stored chunk (the last may be smaller).
      meta: the file's metadata (JSON): ``kind``, ``projection``, ``params``, ``params_dtype``, ``defined_by``,
        ``excluded``, ``versions``, ``n_query`` (= ``dim``), ``n_train`` (= ``n``), ``chunk_size``, ``dtype``.

    Example:
      >>> index = ifunc.open_index("train.idx.h5")
      >>> for offset, rows in index.chunks():          # rows [b, dim], checked, one chunk in memory
      ...     scores[:, offset : offset + len(rows)] = queries @ rows.T
    """

    path: Path
    projection: Projection
    n: int
    dim: int
    chunk: int
    meta: dict

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, rows [b, dim])`` for every stored chunk, in order; rows ``offset .. offset + b - 1``.

        The columns are read in blocks of whole chunks (:func:`ifunc.store.reading.read_blocks`, about 64 MiB, at
        least one chunk) and each chunk is checked against its CRC-32 before any row of its block is yielded; one
        block is in memory at a time, and the file is open (read-only, shared lock) only while the iteration runs.
        The rows ``[b, dim]`` are views of their block (column-major).

        Raises:
          ValueError: a chunk fails its checksum (named), or the file is no longer a finished index.
        """
        try:  # blocks of whole stored chunks (about 64 MiB), each chunk checked before its block is yielded
            for start, columns in read_blocks(self.path):
                for offset in range(0, columns.shape[1], self.chunk):
                    yield start + offset, torch.from_numpy(columns[:, offset : offset + self.chunk]).T
        except ValueError as err:
            raise _as_index_error(self.path, err) from None

    def matrix(self) -> torch.Tensor:
        """Every row, ``[n, dim]`` float32, each chunk checked (for small indexes and tests: it holds them all)."""
        return torch.cat([rows for _, rows in self.chunks()]) if self.n else torch.zeros(0, self.dim)


def open_index(path) -> GradientIndex:
    """Reopen the finished gradient index at ``path`` read-only.

    Reads the metadata only (the projection's description, the sizes); the rows are read later, chunk by chunk, by
    :meth:`GradientIndex.chunks`. Nothing is written.

    Returns:
      A :class:`GradientIndex` with ``n`` rows of ``dim`` coordinates stored in chunks of ``chunk`` examples.

    Raises:
      ValueError: ``path`` is not an ifunc score store, is unfinished (a build stopped: re-run it to resume), is a
        score store that is not a gradient index (``attribute(..., out=)``), or its metadata is damaged.
      BlockingIOError: another process is writing the file.

    Example:
      >>> index = ifunc.open_index("train.idx.h5")
      >>> index.n, index.dim
      (50000, 4352)
    """
    path = Path(path)
    ds = _open_columns(path)
    try:
        raw = ds.file["meta"][()]
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        dim, n = (int(s) for s in ds.shape)
        has_checksums = "checksums" in ds.file
    finally:
        ds.file.close()
    if not has_checksums:
        raise ValueError(
            f"{path}: the gradient index has no checksums, so its rows cannot be verified (damaged, or written by "
            "something else); rebuild it with build_index(..., overwrite=True)"
        )
    if not isinstance(meta, dict) or meta.get("kind") != INDEX_KIND:
        kind = meta.get("method", "?") if isinstance(meta, dict) else "?"
        raise ValueError(
            f"{path} is a score store ({kind} scores) but not a gradient index: open it with ifunc.load_scores, or "
            "build an index with build_index(..., out=path)"
        )
    try:
        projection = Projection.from_description(meta["projection"])
        if meta.get("projection_sha256") != projection_digest(projection):
            raise ValueError("the projection's description does not match its recorded digest (an edited field)")
        chunk = int(meta["chunk_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: the gradient index's metadata is damaged ({type(err).__name__}: {err}); rebuild it with "
            "build_index(..., overwrite=True)"
        ) from None
    if projection.dim != dim or chunk < 1:
        raise ValueError(
            f"{path}: the gradient index is damaged: its projection has {projection.dim} coordinates, the file "
            f"holds {dim} rows (chunk size {chunk}); rebuild it with build_index(..., overwrite=True)"
        )
    return GradientIndex(path, projection, n, dim, chunk, meta)
