"""HDF5 primitives of the stores: locks, atomic creation, opening, and files of named tensor groups.

HDF5 locks a file with ``flock``: a writer holds it exclusively, readers share it. A new file is built under a
unique temporary name in the same directory, locked, and only then linked into place; a replacement happens
only while holding the lock of the file it replaces; the temporary name is removed whatever happens (and one
left by a killed process is removed by the next save or load of that path: :mod:`._disk`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ._disk import (
    close_quietly,
    is_temporary,
    is_write_failure,
    remove_stale_temporaries,
    reserve,
    temporary_name,
    write_failed,
)

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be replaced there anyway
    fcntl = None


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}
_HEADROOM = 1 << 16  #: bytes of HDF5 metadata (superblock, headers, JSON) a new file is allowed besides its data


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


def _create(path: Path, build: Callable, *, replace: bool, size: int) -> Any:
    """A new HDF5 file at ``path``, returned open ``r+`` (locked) after ``build(file)`` filled it.

    It is built under a unique temporary name in the same directory (:func:`temporary_name`), locked from its
    creation on, and only then linked into place. ``replace``: an existing file is replaced, only while nobody has
    it open; otherwise :class:`FileExistsError` if a file appeared at ``path`` meanwhile. The temporary name never
    survives, and a stale one that a killed process left beside ``path`` is removed first. ``size`` (bytes, an
    upper bound of the file's size) is tried on disk before HDF5 writes anything (:func:`reserve`).

    Raises:
      OSError: the disk refused the file (full, a file-size limit), named; nothing changed at ``path``.
    """
    h5py = _h5py()
    remove_stale_temporaries(path)
    try:
        reserve(path, size)
    except OSError as err:
        raise write_failed(path, err, "creating", kept="nothing changed at that path") from None
    tmp = path.with_name(temporary_name(path))
    f: Any = None
    try:
        f = h5py.File(tmp, "x")  # created by us alone (O_EXCL), locked by HDF5 until it is closed
        build(f)
        f.flush()
        try:
            os.link(tmp, path)  # atomic, and only if nothing is at `path`: never replaces a file unlocked
        except FileExistsError:
            if not replace:
                raise
            with _exclusive(path):
                os.replace(tmp, path)
        except OSError as err:  # no hard links on this file system
            if is_write_failure(err):
                raise
            if path.exists() and not replace:
                raise FileExistsError(path) from None
            with _exclusive(path):
                os.replace(tmp, path)
        return f
    except BaseException as err:
        if f is not None:
            close_quietly(f)
        if isinstance(err, (OSError, RuntimeError)) and is_write_failure(err):
            raise write_failed(path, err, "creating", kept="nothing changed at that path") from None
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"out={str(path)!r} is a directory; give a file path, e.g. {str(path / 'scores.h5')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"the directory of {path} does not exist; create it first")


# ---------------------------------------------------------------- meta


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

    size = sum(t.numel() * t.element_size() for ts in groups.values() for t in ts.values() if t is not None)
    try:
        _create(path, build, replace=overwrite, size=size + _HEADROOM + 256 * sum(map(len, groups.values()))).close()
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None


def read_tensor_groups(path, fmt: str, what: str) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """``(meta, {group: {name: array}})`` of a file written by :func:`write_tensor_groups` in format ``fmt``.

    A stale temporary that a killed save left beside ``path`` is removed first (best effort); a temporary itself
    is never read as such a file.

    Raises:
      ValueError: unreadable, damaged metadata, a temporary of an interrupted save, or not a file of that format
        (``what`` names it in the message).
    """
    h5py = _h5py()
    path = Path(path)
    if is_temporary(path):
        raise ValueError(
            f"{path} is a temporary file of an interrupted ifunc save, not an ifunc {what}; load the file it was "
            "written for (without the .<pid>-<hex>.tmp suffix), or save again"
        )
    remove_stale_temporaries(path)
    with _open(path, fmt, what) as f:
        try:
            meta = json.loads(f.attrs["meta"])
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{path}: the metadata of this ifunc {what} is damaged ({type(err).__name__}: {err}); save it again "
                "(overwrite=True)"
            ) from None
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
