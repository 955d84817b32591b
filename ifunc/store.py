"""HDF5 stores for score matrices: written chunk by chunk, resumable after a crash, checked on every read.

Layout of a score file (``format = "ifunc-scores"``, ``version = 2``), ``n_chunks = ⌈n_train / s⌉`` for the
chunk size ``s``; chunk ``c`` is the columns ``[c·s, min((c+1)·s, n_train))``::

    /scores        float32 [n_query, n_train]  contiguous, allocated when the file is created
    /done          uint8   [n_chunks]          1 once chunk c's columns, fingerprint and checksum are flushed
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
chunk only overwrites raw bytes at fixed offsets and never touches HDF5 metadata. A chunk is marked done
only after its data is flushed; a process killed mid-chunk leaves that chunk unmarked, and the next run
recomputes it and nothing else.

Trust:

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
All disk I/O of ifunc lives in this module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import fingerprint
from ._version import __version__

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be replaced there anyway
    fcntl = None

__all__ = [
    "ScoreWriter",
    "load_scores",
    "top_k",
    "fingerprint",
    "check_fingerprint",
    "remove_store",
    "part_path",
    "merge_parts",
    "write_tensor_groups",
    "read_tensor_groups",
]

FORMAT = "ifunc-scores"
VERSION = 2
RTOL = 1e-6  #: relative tolerance for floats of the meta
log = logging.getLogger("ifunc")
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}


def _h5py():
    import h5py

    return h5py


# ---------------------------------------------------------------- locks


def _lock_errno(err: OSError) -> int | None:
    """The errno of HDF5's "unable to lock file, errno = N" (h5py raises it as an OSError), else None."""
    found = re.search(r"unable to lock file, errno = (\d+)", str(err))
    return int(found.group(1)) if found else None


def _busy(path, *, writer: bool) -> BlockingIOError:
    if writer:
        text = (
            f"another process is writing {path} (it holds the HDF5 file lock): wait until it has finished, "
            "or give this run another path. overwrite=True does not help: a file that another process has "
            "open is never replaced"
        )
    else:
        text = (
            f"another process (or an open handle in this one, e.g. load_scores(..., lazy=True)) has {path} "
            "open for reading; close it, or give this run another path"
        )
    return BlockingIOError(errno.EAGAIN, text)


def _no_locks(path, err) -> OSError:
    return OSError(
        errno.ENOLCK,
        f"{path}: this file system does not support file locks ({err}); set the "
        "environment variable HDF5_USE_FILE_LOCKING=FALSE and make sure that only one "
        "process writes the file",
    )


def _readable(path) -> bool:
    try:
        _h5py().File(path, "r").close()
        return True
    except OSError:
        return False


def _h5open(path, mode: str) -> Any:
    """``h5py.File(path, mode)``; a lock held by another process raises :class:`BlockingIOError` saying who holds it."""
    try:
        return _h5py().File(path, mode)
    except OSError as err:
        code = _lock_errno(err)
        if code is None:
            raise
        if code in _NO_LOCKS:
            raise _no_locks(path, err) from None
        raise _busy(path, writer=mode == "r" or not _readable(path)) from None


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file at ``path`` (if there is one): nobody has it open while we replace it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock HDF5 itself takes
            except OSError as err:
                if err.errno not in _NO_LOCKS:
                    raise _busy(path, writer=not _readable(path)) from None
        yield
    finally:
        os.close(fd)


def _create(path: Path, build: Callable, *, replace: bool) -> Any:
    """A new HDF5 file at ``path``, returned open ``r+`` (locked) after ``build(file)`` filled it.

    It is built under a unique temporary name in the same directory and locked before it appears at
    ``path``. ``replace``: an existing file is replaced, only while nobody has it open; otherwise
    :class:`FileExistsError` if a file appeared at ``path`` meanwhile. The temporary name never survives.
    """
    h5py = _h5py()
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    f: Any = None
    try:
        with h5py.File(tmp, "x") as new:  # created by us alone (O_EXCL), with the usual permissions
            build(new)
        f = h5py.File(tmp, "r+")
        try:
            os.link(tmp, path)  # atomic, and only if nothing is at `path`: never replaces a file unlocked
        except FileExistsError:
            if not replace:
                raise
            with _exclusive(path):
                os.replace(tmp, path)
        except OSError:  # no hard links on this file system
            if path.exists() and not replace:
                raise FileExistsError(path) from None
            with _exclusive(path):
                os.replace(tmp, path)
        return f
    except BaseException:
        if f is not None:
            f.close()
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"out={str(path)!r} is a directory; give a file path, e.g. {str(path / 'scores.h5')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"the directory of {path} does not exist; create it first")


# ---------------------------------------------------------------- meta


def _plain(meta: dict) -> dict:
    """``meta`` as it reads back from the file (tuples become lists)."""
    return json.loads(json.dumps(meta, sort_keys=True))


def _same(a, b) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= RTOL * max(abs(a), abs(b))
    return a == b


def _differences(found, wanted, where: str = "") -> Iterator[str]:
    if isinstance(found, dict) and isinstance(wanted, dict):
        for k in sorted(set(found) | set(wanted)):
            if where or k != "versions":
                yield from _differences(
                    found.get(k, "<absent>"), wanted.get(k, "<absent>"), f"{where}.{k}" if where else k
                )
    elif isinstance(found, list) and isinstance(wanted, list) and len(found) == len(wanted):
        for i, (a, b) in enumerate(zip(found, wanted)):
            yield from _differences(a, b, f"{where}[{i}]")
    elif not _same(found, wanted):
        yield f"{where}: file has {_short(found)}, this call has {_short(wanted)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe_difference(found: dict, wanted: dict) -> str:
    diffs = list(_differences(found, wanted))
    more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return "; ".join(diffs[:6]) + more


def _read_meta(f) -> dict:
    raw = f["meta"][()] if "meta" in f else f.attrs["meta"]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def check_fingerprint(path, index: int, recorded: str, found: str) -> None:
    """Raise unless chunk ``index`` of the training data hashes to what the store recorded for it."""
    if recorded != found:
        raise ValueError(
            f"{path}: chunk {index} of the training data differs from the one whose scores the file holds "
            f"(fingerprint {found}, recorded {recorded}): the training data changed since the file was written, "
            "and resuming would mix scores of two data sets. Use overwrite=True to start over, or another path"
        )


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
        wanted = _plain(dict(meta, n_query=n_query, n_train=n_train, chunk_size=self.chunk_size, dtype=self.dtype.name))
        self._file: Any = None
        if overwrite or not self.path.exists():
            try:
                self._file = _create(self.path, lambda f: self._layout(f, wanted, n_query), replace=overwrite)
            except FileExistsError:  # another process created it since we looked
                pass
        if self._file is None:
            self._file = self._open_existing(wanted, refuse_resume)
        elif refuse_resume:
            warnings.warn(f"{self.path} cannot be resumed if this run stops: {refuse_resume}", stacklevel=5)
        self.read_only = self._file.mode == "r"
        self._scores, self._done = self._file["scores"], self._file["done"]
        self._fingerprints, self._checksums = self._file["fingerprints"], self._file["checksums"]
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
        """Write chunk ``index`` (``[n_query, width]``) with its fingerprint and checksum, flush, mark it done."""
        start = index * self.chunk_size
        width = min(self.chunk_size, self.n_train - start)
        columns = np.ascontiguousarray(columns, dtype=self.dtype)
        if columns.shape[1:] != (width,):
            raise ValueError(f"chunk {index} of {self.path} has {width} columns, got {columns.shape[1:]}")
        self._scores[:, start : start + width] = columns
        self._fingerprints[index] = fp.encode()
        self._checksums[index] = zlib.crc32(columns.data)
        self._file.flush()
        self._done[index] = 1
        self._file.flush()
        self.done.add(index)
        log.info("ifunc: chunk %d/%d written to %s", index + 1, self.n_chunks, self.path)

    def read(self, index: int) -> np.ndarray:
        """The stored columns of chunk ``index``, ``[n_query, width]``, checked against their checksum."""
        start = index * self.chunk_size
        columns = self._scores[:, start : start + self.chunk_size]
        _verify(self.path, index, columns, int(self._checksums[index]))
        return columns

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _validate(f, path, wanted: dict, refuse_resume: str | None) -> None:
    if f.attrs.get("format") != FORMAT or "scores" not in f or "done" not in f:
        raise ValueError(f"{path} is not an ifunc score store; it was left untouched (overwrite=True replaces it)")
    if f.attrs.get("version", 1) < VERSION:
        raise ValueError(
            f"{path} was written by an older ifunc (no per-chunk fingerprints), so resuming it cannot "
            "be checked; re-run with overwrite=True (load_scores still reads it)"
        )
    try:
        found = _read_meta(f)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"{path} has no readable metadata ({err}); it was left untouched (overwrite=True replaces it)"
        ) from None
    differences = _describe_difference(found, wanted)
    if differences:
        raise ValueError(
            f"{path} holds scores from a different run ({differences}); refusing to mix them. Use "
            "overwrite=True to start over, or another path"
        )
    if refuse_resume:
        raise ValueError(f"{path} exists and {refuse_resume}; use overwrite=True to start over, or another path")


def remove_store(path) -> None:
    """Delete a score store if it exists, only while no other process has it open (else BlockingIOError)."""
    path = Path(path)
    _check_path(path)
    with _exclusive(path):
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading


def _open(path, fmt: str, what: str) -> Any:
    """An open read-only HDF5 file of format ``fmt``; ValueError naming ``what`` when unreadable or another format."""
    try:
        f = _h5open(path, "r")
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno == errno.ENOLCK:
            raise
        raise ValueError(f"{path} cannot be read as an ifunc {what} ({err})") from None
    if f.attrs.get("format") != fmt:
        f.close()
        raise ValueError(f"{path} is not an ifunc {what}")
    return f


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


def _verify(path, index: int, columns: np.ndarray, expected: int) -> None:
    if zlib.crc32(np.ascontiguousarray(columns).data) != expected:
        raise ValueError(
            f"{path}: chunk {index} fails its checksum: its scores were changed or damaged after they were "
            "written. Re-run the attribute(..., out=path) call with overwrite=True to recompute them, or read the "
            "file unchecked with verify=False"
        )


def _chunk_checks(f, path, verify: bool) -> tuple[int, np.ndarray | None]:
    """``(chunk size, checksums)``; checksums None when not verifying, or for a version 1 file (with a warning)."""
    chunk = int(_read_meta(f)["chunk_size"])
    if not verify:
        return chunk, None
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
      ValueError: not a score store, unreadable, incomplete, or a chunk fails its checksum (named).
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
    """
    with _open_complete(path) as f:
        ds = f["scores"]
        n_query, n_train = ds.shape
        if not 1 <= k <= n_train:
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


def part_path(out, rank: int, size: int) -> Path:
    """File of one rank's columns: ``out.rank{r}of{W}``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}of{size}")


def merge_parts(out, size: int, final_args: dict, part_args) -> None:
    """Copy the finished chunks of the per-rank stores ``out.rank{r}of{W}`` into ``out``, then delete them.

    Rank ``r``'s local chunk ``j`` is global chunk ``j·W + r``; its columns are checked against their
    checksum and copied with their fingerprint. Resumable: chunks already in ``out`` are not copied again.
    ``part_args(r)`` gives the :class:`ScoreWriter` arguments of rank ``r``'s store.

    Raises:
      ValueError: chunks are still missing after the merge (a rank did not finish).
    """
    with ScoreWriter(out, **final_args) as final:
        for r in range(size):
            path = part_path(out, r, size)
            if final.read_only or not path.exists():
                continue
            with ScoreWriter(path, **part_args(r)) as part:
                for j in sorted(part.done):
                    if j * size + r not in final.done:
                        final.write(j * size + r, part.read(j), part.fingerprint(j))
        missing = final.n_chunks - len(final.done)
        n_chunks = final.n_chunks
    if missing:
        raise ValueError(f"{out}: {missing} of {n_chunks} chunks are missing after the merge")
    for r in range(size):
        remove_store(part_path(out, r, size))


# ---------------------------------------------------------------- tensor files (Kronecker factors)


def write_tensor_groups(
    path, fmt: str, meta: dict, groups: dict[str, dict[str, torch.Tensor | None]], *, overwrite: bool = False
) -> None:
    """Write named groups of tensors with JSON metadata to HDF5, under a temporary name moved into place.

    A group name may hold ``/`` (nested HDF5 groups). ``None`` entries are skipped. The versions of ifunc and
    torch are added to ``meta``. An existing file is never half-overwritten, nor replaced while another
    process has it open.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      BlockingIOError: ``overwrite`` and another process has ``path`` open.
    """
    path = Path(path)
    _check_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    def build(f):
        f.attrs["format"] = fmt
        f.attrs["meta"] = json.dumps(
            dict(meta, versions={"ifunc": __version__, "torch": torch.__version__}), sort_keys=True
        )
        for group, tensors in groups.items():
            g = f.create_group(group)
            for name, value in tensors.items():
                if value is not None:
                    g.create_dataset(name, data=value.detach().cpu().numpy())

    try:
        _create(path, build, replace=overwrite).close()
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None


def read_tensor_groups(path, fmt: str, what: str) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """``(meta, {group: {name: array}})`` of a file written by :func:`write_tensor_groups` in format ``fmt``.

    Raises:
      ValueError: unreadable, or not a file of that format (``what`` names it in the message).
    """
    h5py = _h5py()
    with _open(path, fmt, what) as f:
        meta = json.loads(f.attrs["meta"])
        groups: dict[str, dict[str, np.ndarray]] = {}

        def collect(node, prefix):
            for key, value in node.items():
                if isinstance(value, h5py.Dataset):
                    groups.setdefault(prefix, {})[key] = value[...]
                else:
                    groups.setdefault(f"{prefix}/{key}" if prefix else key, {})
                    collect(value, f"{prefix}/{key}" if prefix else key)

        collect(f, "")
        return meta, groups
