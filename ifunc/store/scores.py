"""HDF5 stores for score matrices: written chunk by chunk, resumable after a crash, checked on every read.

Layout of a score file (``format = "ifunc-scores"``, ``version = 2``), ``n_chunks = ⌈n_train / s⌉`` for the
chunk size ``s``; chunk ``c`` is the columns ``[c·s, min((c+1)·s, n_train))``::

    /scores        float32 [n_query, n_train]  contiguous, allocated when the file is created
    /done          uint8   [n_chunks]          1 once chunk c's columns, fingerprint and checksum are written
    /fingerprints  S32     [n_chunks]          fingerprint of chunk c's training tensors: the first 128 bits
                                               of SHA-256 over each tensor's shape, dtype and bytes
                                               (ifunc._data.fingerprint)
    /checksums     uint32  [n_chunks]          zlib CRC-32 of chunk c's columns, scores[:, c·s:(c+1)·s], as
                                               C-order float32 bytes
    /meta          JSON string                 what defines the scores: method, damping per block, method
                                               settings, curvature summaries [numel, Σ|x|, Σx²], identity,
                                               fingerprints of parameters and queries, chunk size, shapes,
                                               ifunc and torch versions
    attrs          format, version

Crash safety comes from the layout: every dataset is contiguous and fully allocated at creation, so writing a
chunk only overwrites raw bytes at fixed offsets and never touches HDF5 metadata. Those bytes are written with
plain file writes at the datasets' offsets, not through HDF5 (whose cache, once a write fails, fails again on
close and can crash the process), so a write that the disk refuses (full, a file-size limit) raises an
:class:`OSError` naming the file and leaves HDF5 with nothing to flush. A chunk is marked done only after its
columns, fingerprint and checksum are written; a process killed (or refused) mid-chunk leaves that chunk
unmarked, and the next run recomputes it and nothing else.

Trust (the checks themselves are :mod:`._trust`):

* *Resume.* An existing file is resumed only if its meta equals this call's (floats to a relative 1e-6:
  eigenvalues may differ in the last bits between processes) and every chunk it skips holds the same
  training data (:meth:`ScoreWriter.check`); otherwise it is refused and left untouched.
* *Reading.* :func:`load_scores` and :func:`top_k` recompute each chunk's CRC-32 and name a chunk that
  fails (``verify=False`` skips this).
* *Locks.* HDF5 locks the file (``flock``): a writer holds it exclusively, readers share it. A second
  writer gets :class:`BlockingIOError` "another process is writing ...". A new file is built under a unique
  temporary name in the same directory, locked, and only then linked into place; ``overwrite=True``
  replaces a file only while holding its lock, so a file another process has open is never replaced. The
  temporary name is removed whatever happens.
  With ``HDF5_USE_FILE_LOCKING=FALSE`` HDF5 takes no locks and none of this can be detected.
* *Finished files* are opened read-only: re-running the call is a no-op, also on a read-only file or
  directory.

Files of version 1 (no fingerprints or checksums) are still readable, unverified; they cannot be resumed.
All disk I/O of ifunc lives in this package: :mod:`._hdf5` (locks, creation, tensor files), this module
(writing and resuming score stores), :mod:`._trust` (what a store must pass to be resumed or read), :mod:`.merge`
(merging per-rank stores) and :mod:`.reading`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ._disk import write_failed
from ._hdf5 import _HEADROOM, _check_path, _create, _exclusive, _h5open, _h5py
from ._meta import as_read_back, read_meta
from ._trust import FORMAT, VERSION, _validate, _verify, check_fingerprint

__all__ = ["ScoreWriter", "remove_store", "recorded_chunk_size"]


log = logging.getLogger("ifunc")


# ---------------------------------------------------------------- writing


class ScoreWriter:
    """Open (or create) a score store for writing ``[n_query, n_train]`` in column chunks.

    Args:
      path: the ``.h5`` file.
      n_query, n_train, chunk_size: shape of the score matrix and width of a column chunk.
      meta: JSON-serialisable description of the run; an existing file must carry the same values (except
        ``versions``; floats to a relative :data:`RTOL`).
      dtype: numpy dtype of the stored scores.
      overwrite: replace an existing file instead of resuming it (only if no other process has it open).
      refuse_resume: reason why an existing file must not be resumed (e.g. an unidentifiable closure).
      warn_resume: warning shown when chunks of an existing file are reused (what the meta cannot check).

    Attributes:
      done: indices of the finished chunks. read_only: every chunk was done; the file is open read-only.

    Raises:
      ValueError: ``path`` is a directory; the existing file is not an ifunc score store, is unreadable
        (truncated), was written by an older ifunc, or by another run (the message lists the differences).
        The file is never modified in that case.
      BlockingIOError: another process has the file open (writing it, or reading it while we must write).
    """

    def __init__(
        self,
        path,
        *,
        n_query: int,
        n_train: int,
        chunk_size: int,
        meta: dict[str, Any],
        dtype=np.float32,
        overwrite: bool = False,
        refuse_resume: str | None = None,
        warn_resume: str | None = None,
    ):
        self.path = Path(path)
        _check_path(self.path)
        self.chunk_size, self.n_train = int(chunk_size), int(n_train)
        self.n_chunks = -(-self.n_train // self.chunk_size)
        self.dtype = np.dtype(dtype)
        wanted = as_read_back(
            dict(meta, n_query=n_query, n_train=n_train, chunk_size=self.chunk_size, dtype=self.dtype.name)
        )
        self._file: Any = None
        if overwrite or not self.path.exists():
            try:
                size = n_query * self.n_train * self.dtype.itemsize + 37 * self.n_chunks + len(json.dumps(wanted))
                build = lambda f: self._layout(f, wanted, n_query)  # noqa: E731
                self._file = _create(self.path, build, replace=overwrite, size=size + _HEADROOM)
            except FileExistsError:  # another process created it since we looked
                pass
        if self._file is None:
            self._file = self._open_existing(wanted, refuse_resume)
        elif refuse_resume:
            warnings.warn(f"{self.path} cannot be resumed if this run stops: {refuse_resume}", stacklevel=5)
        self.read_only = self._file.mode == "r"
        self._scores, self._done = self._file["scores"], self._file["done"]
        self._fingerprints, self._checksums = self._file["fingerprints"], self._file["checksums"]
        self._raw: Any = None  # the file opened for plain writes, at the first chunk written
        self.done = set(np.nonzero(self._done[...])[0].tolist())
        if self.done:
            log.info("ifunc: resuming %s: %d of %d chunks already done", self.path, len(self.done), self.n_chunks)
            if warn_resume:
                warnings.warn(f"resuming {self.path}: {warn_resume}", stacklevel=5)

    def _layout(self, f, wanted: dict, n_query: int) -> None:
        h5py = _h5py()
        space = h5py.h5s.create_simple((n_query, self.n_train))
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        plist.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
        h5py.h5d.create(f.id, b"scores", h5py.h5t.py_create(self.dtype), space, plist)
        f.create_dataset("done", data=np.zeros(self.n_chunks, dtype=np.uint8))
        f.create_dataset("fingerprints", data=np.zeros(self.n_chunks, dtype="S32"))
        f.create_dataset("checksums", data=np.zeros(self.n_chunks, dtype=np.uint32))
        f["meta"] = json.dumps(wanted, sort_keys=True)
        f.attrs["format"], f.attrs["version"] = FORMAT, VERSION

    def _open_existing(self, wanted: dict, refuse_resume: str | None) -> Any:
        """The existing file, validated: read-only when every chunk is done, else ``r+`` (locked)."""
        f = self._open_valid("r", wanted, refuse_resume)
        if f["done"][...].all():
            return f
        f.close()
        return self._open_valid("r+", wanted, refuse_resume)  # validated again, now under the write lock

    def _open_valid(self, mode: str, wanted: dict, refuse_resume: str | None) -> Any:
        try:
            f = _h5open(self.path, mode)
        except OSError as err:
            if isinstance(err, (BlockingIOError, PermissionError)) or err.errno == errno.ENOLCK:
                raise
            if mode != "r":  # it was readable a moment ago
                raise OSError(
                    err.errno, f"{self.path} has unfinished chunks but cannot be opened for writing ({err})"
                ) from None
            raise ValueError(
                f"{self.path} cannot be read as an ifunc score store ({err}); it may be truncated. It was left "
                "untouched: pass overwrite=True to replace it, or choose another path"
            ) from None
        try:
            _validate(f, self.path, wanted, refuse_resume)
        except BaseException:
            f.close()
            raise
        return f

    def check(self, index: int, fp: str) -> None:
        """Raise unless the training chunk ``index`` (already done) hashes to the recorded fingerprint ``fp``."""
        check_fingerprint(self.path, index, self.fingerprint(index), fp)

    def fingerprint(self, index: int) -> str:
        """The fingerprint recorded for chunk ``index``."""
        return self._fingerprints[index].decode()

    def write(self, index: int, columns: np.ndarray, fp: str) -> None:
        """Write chunk ``index`` (``[n_query, width]``) with its fingerprint and checksum, then mark it done.

        Raises:
          OSError: the disk refused the write (full, a file-size limit): named, with the path; the chunks
            already done are kept and a re-run resumes at this one.
        """
        start = index * self.chunk_size
        width = min(self.chunk_size, self.n_train - start)
        columns = np.ascontiguousarray(columns, dtype=self.dtype)
        if columns.shape[1:] != (width,):
            raise ValueError(f"chunk {index} of {self.path} has {width} columns, got {columns.shape[1:]}")
        try:
            if self._raw is None:
                self._raw = open(self.path, "r+b", buffering=0)  # noqa: SIM115  (closed in close())
            n_query, n_train = self._scores.shape
            cells = np.ascontiguousarray(columns.astype(self._scores.dtype, copy=False))
            step = self._scores.dtype.itemsize
            rows, at = cells.data.cast("B"), self._scores.id.get_offset() + start * step
            fd, size, stride = self._raw.fileno(), width * step, n_train * step
            for q in range(n_query):  # row q of the C-order matrix holds columns [start, start + width) here
                row = rows[q * size : (q + 1) * size]
                written = os.pwrite(fd, row, at + q * stride)  # inline: an index writes `dim` rows per chunk
                if written < size:
                    self._pwrite(at + q * stride + written, row[written:])
            self._put(self._fingerprints, index * 32, fp.encode().ljust(32, b"\0"))
            checksum = np.array([zlib.crc32(columns.data)], dtype=self._checksums.dtype)
            self._put(self._checksums, index * checksum.itemsize, checksum.tobytes())
            self._put(self._done, index, b"\x01")  # last: only a complete chunk counts as done
        except OSError as err:
            raise write_failed(self.path, err, f"writing chunk {index} of", kept=self._kept()) from None
        self.done.add(index)
        log.info("ifunc: chunk %d/%d written to %s", index + 1, self.n_chunks, self.path)

    def _put(self, dataset, at: int, data: bytes) -> None:
        """Write ``data`` at byte ``at`` of a contiguous, allocated dataset."""
        self._pwrite(dataset.id.get_offset() + at, memoryview(data))

    def _pwrite(self, offset: int, view: memoryview) -> None:
        """Write the bytes of ``view`` at byte ``offset`` of the file (a short write is continued or fails)."""
        fd = self._raw.fileno()
        while view.nbytes:
            written = os.pwrite(fd, view, offset)
            if not written:
                raise OSError(errno.EIO, "the file accepted no more bytes")
            view, offset = view[written:], offset + written

    def _kept(self) -> str:
        return (
            f"the {len(self.done)} chunks already completed are kept (a chunk is marked done only after its scores "
            "are written), and re-running the same call resumes at the first unfinished one"
        )

    def read(self, index: int) -> np.ndarray:
        """The stored columns of chunk ``index``, ``[n_query, width]``, checked against their checksum."""
        start = index * self.chunk_size
        columns = self._scores[:, start : start + self.chunk_size]
        _verify(self.path, index, columns, int(self._checksums[index]))
        return columns

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recorded_chunk_size(path) -> int | None:
    """The chunk size recorded in the score store at ``path``; None when there is none (or no readable one).

    A run with the default chunk size adopts it to resume the file: the default depends on the memory available
    at the time, so a rerun would otherwise compute another one. Whatever is wrong with an unreadable file is
    left for :class:`ScoreWriter` to report.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with _h5open(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return None
            return int(read_meta(f)["chunk_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_store(path) -> None:
    """Delete a score store if it exists, only while no other process has it open (else BlockingIOError)."""
    path = Path(path)
    _check_path(path)
    with _exclusive(path):
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading
