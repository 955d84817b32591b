"""What goes wrong on disk: writes the disk refuses (named errors), and temporaries a killed process left behind.

HDF5 reports a refused write (no space, a file-size limit) as ``RuntimeError: ... file write failed ... errno = 27``
and then again, on close, as "Can't decrement id ref count"; :func:`write_failed` turns it into one
:class:`OSError` that says what happened, to which file, what is kept and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "reserve",
    "is_write_failure",
    "write_failed",
    "close_quietly",
    "temporary_name",
    "is_temporary",
    "remove_stale_temporaries",
]

_FAILED_WRITE = re.compile(r"errno = (\d+)")
_DISK = {
    errno.EFBIG: "a file-size limit (ulimit -f) was reached",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
}


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = _FAILED_WRITE.search(str(err))
    return int(found.group(1)) if found else None


def is_write_failure(err: BaseException) -> bool:
    """True for an error of writing bytes to disk (no space, a file-size limit, an I/O error), as h5py reports it."""
    return _errno_of(err) in (*_DISK, errno.EIO) or "write failed" in str(err)


def write_failed(path, err: BaseException, doing: str, *, kept: str) -> OSError:
    """The named OSError of a write that the disk refused: what happened, where, what is kept, what to do."""
    code = _errno_of(err) or errno.EIO
    cause = _DISK.get(code, os.strerror(code))
    detail = " ".join(str(err).split())
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    return OSError(
        code,
        f"{doing} {path} failed: {cause} ({detail}); {kept}. Free space or raise the limit, then re-run the same call",
    )


def reserve(path: Path, nbytes: int) -> None:
    """Raise the disk's refusal now if ``nbytes`` cannot be written beside ``path`` (space, a file-size limit).

    HDF5 cannot recover from a write the disk refuses: its cache fails again on close, and freeing the file's
    objects then can crash the process. So a new file's size is tried first with a probe under a temporary name
    (blocks reserved with ``posix_fallocate`` and the last byte written), which is removed at once.

    Raises:
      OSError: the disk or the process's file-size limit refused the probe (``errno`` ENOSPC, EFBIG, ...).
    """
    probe = path.with_name(temporary_name(path))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return  # no probe possible here: the creation itself will report what is wrong
    try:
        if nbytes > 0 and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if nbytes > 0:
            os.lseek(fd, nbytes - 1, os.SEEK_SET)
            os.write(fd, b"\0")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def close_quietly(f) -> None:
    """Close an h5py file whose writes failed (HDF5 retries them on close and fails again: that is not news)."""
    with contextlib.suppress(OSError, RuntimeError):
        f.close()


def temporary_name(path: Path) -> str:
    """``<name>.<pid>-<12 hex>.tmp``: unique, and recognisably ifunc's (:func:`remove_stale_temporaries`)."""
    return f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"


def _temporary_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"{re.escape(path.name)}\.(?:(\d+)-)?[0-9a-f]{{12}}\.tmp")


def is_temporary(path: Path) -> bool:
    """True for a name that :func:`temporary_name` gives (of any target)."""
    return re.fullmatch(r".+\.(?:\d+-)?[0-9a-f]{12}\.tmp", path.name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` that a killed ifunc process left behind; returns what was removed.

    Only names of :func:`temporary_name` for this ``path`` are considered, and only when their process is gone
    and nobody holds their lock (a save in progress holds it from the file's creation on). Best effort: a file
    that cannot be removed is left where it is.
    """
    path = Path(path)
    pattern, removed = _temporary_pattern(path), []
    try:
        candidates = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return removed
    for tmp in candidates:
        pid = pattern.fullmatch(tmp.name).group(1)  # pyright: ignore[reportOptionalMemberAccess]
        if pid is not None and _alive(int(pid)):
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer has it open
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
