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
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import store
from .projection import Projection

__all__ = ["GradientIndex", "open_index", "projection_digest", "INDEX_KIND"]

INDEX_KIND = "gradient index"  #: the ``kind`` recorded in the metadata of every index


def projection_digest(projection: Projection) -> str:
    """SHA-256 of the projection's description (sorted JSON): recorded in an index, checked when it is opened, so
    an edited seed, size or layer name is refused instead of silently projecting queries another way."""
    text = json.dumps(projection.describe(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _open_columns(path: Path) -> Any:
    """The finished store's ``scores`` dataset, open read-only (shared lock); refusals named for an index."""
    try:
        return store.load_scores(path, lazy=True, verify=False)
    except ValueError as err:
        missing = re.search(r"\(\d+ of \d+ chunks missing\)", str(err))
        if missing:
            raise ValueError(
                f"{path} is an unfinished gradient index {missing.group(0)}: re-run the same "
                "build_index(..., out=path) call to finish it (it resumes at the first missing chunk)"
            ) from None
        raise


class GradientIndex(NamedTuple):
    """A finished gradient index: ``n`` training examples, each a row of ``dim`` projected gradient coordinates.

    Row ``i`` (example ``i`` of the training data, in data order) is ``P(∇ℓ(z_i))`` with ``P`` the index's
    :class:`~ifunc.index.projection.Projection`: per Kronecker layer ``vec(P_o G_i P_aᵀ)`` (``k_o·k_a`` values,
    row-major), layers in order, then the dense projection of the other parameters (``k_dense`` values). The file
    stores the transpose ``[dim, n]`` in float32; rows come back float32 on the CPU.

    Attributes:
      path: the HDF5 file. projection: the projection the rows were made with. n: training examples.
      dim: coordinates per example (``projection.dim``). chunk: examples per stored chunk (the last may be smaller).
      meta: the file's metadata (JSON): ``kind``, ``projection``, ``params``, ``defined_by``, ``excluded``,
        ``versions``, ``n_query`` (= ``dim``), ``n_train`` (= ``n``), ``chunk_size``, ``dtype``.

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

        Each chunk's columns are read from disk and checked against their CRC-32 before they are yielded; only one
        chunk is in memory at a time (``dim · chunk`` float32 values), and the file is open (read-only, shared
        lock) only while the iteration runs.

        Raises:
          ValueError: a chunk fails its checksum (named), or the file is no longer a finished index.
        """
        ds = _open_columns(self.path)
        try:
            sums = ds.file["checksums"][...]
            for index, offset in enumerate(range(0, self.n, self.chunk)):
                columns = np.ascontiguousarray(ds[:, offset : offset + self.chunk])
                if zlib.crc32(columns.data) != int(sums[index]):
                    raise ValueError(
                        f"{self.path}: chunk {index} (examples {offset}..{offset + columns.shape[1] - 1}) fails its "
                        "checksum: the index was changed or damaged after it was written. Rebuild it with "
                        "build_index(..., overwrite=True)"
                    )
                yield offset, torch.from_numpy(columns).T
        finally:
            ds.file.close()

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
