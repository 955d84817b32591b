"""HDF5 stores for score matrices: written chunk by chunk, resumable after a crash, validated on open.

Layout of a score file (``format = "ifunc-scores"``)::

    /scores   [n_query, n_train]   contiguous, allocated when the file is created
    /done     [n_chunks] uint8     1 once a chunk's columns are written and flushed
    attrs     metadata (JSON): method, damping, fingerprints of parameters / queries / train data,
              chunk size, ifunc and torch versions

Crash safety comes from the layout: both datasets are contiguous and fully allocated at creation (the file
is created under a temporary name and renamed into place), so writing a chunk only overwrites raw bytes at
fixed offsets and never touches HDF5 metadata. A chunk is marked done only after its data is flushed; a
process killed mid-chunk leaves that chunk unmarked, and the next run recomputes it and nothing else.
All disk I/O of ifunc lives in this module.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ._data import fingerprint
from ._version import __version__

__all__ = ["ScoreWriter", "load_scores", "top_k", "fingerprint", "remove_store", "part_path", "merge_parts",
           "write_tensor_groups", "read_tensor_groups"]

FORMAT = "ifunc-scores"
log = logging.getLogger("ifunc")


def _h5py():
    import h5py

    return h5py


def _describe_difference(found: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k) and k != "versions")
    return "; ".join(f"{k}: file has {found.get(k)!r}, this call has {wanted.get(k)!r}" for k in keys)


class ScoreWriter:
    """Open (or create) a score store for writing ``[n_query, n_train]`` in column chunks.

    Args:
      path: the ``.h5`` file.
      n_query, n_train, chunk_size: shape of the score matrix and width of a column chunk.
      meta: JSON-serialisable metadata; an existing file must carry the same values (except versions).
      dtype: numpy dtype of the stored scores.
      overwrite: replace an existing file instead of resuming it.

    Raises:
      ValueError: the existing file is not an ifunc score store, is unreadable (truncated), or was made
        by another model / method / query set / chunking (the message lists the differences). The file is
        never modified in that case.
    """

    def __init__(self, path, *, n_query: int, n_train: int, chunk_size: int, meta: dict[str, Any],
                 dtype=np.float32, overwrite: bool = False):
        self.path = Path(path)
        self.chunk_size = int(chunk_size)
        self.n_chunks = -(-n_train // self.chunk_size)
        wanted = dict(meta, n_query=n_query, n_train=n_train, chunk_size=self.chunk_size,
                      dtype=np.dtype(dtype).name)
        h5py = _h5py()
        if self.path.exists() and not overwrite:
            self._validate(wanted)
        else:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with h5py.File(tmp, "w") as f:
                space = h5py.h5s.create_simple((n_query, n_train))
                plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                plist.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
                h5py.h5d.create(f.id, b"scores", h5py.h5t.py_create(np.dtype(dtype)), space, plist)
                f.create_dataset("done", data=np.zeros(self.n_chunks, dtype=np.uint8))
                f.attrs["format"] = FORMAT
                f.attrs["meta"] = json.dumps(wanted, sort_keys=True)
            os.replace(tmp, self.path)
        self._file = h5py.File(self.path, "r+")
        self._scores = self._file["scores"]
        self._done = self._file["done"]
        self.done = set(np.nonzero(self._done[...])[0].tolist())
        if self.done:
            log.info("ifunc: resuming %s: %d of %d chunks already done", self.path, len(self.done), self.n_chunks)

    def _validate(self, wanted: dict) -> None:
        h5py = _h5py()
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format")
                found = json.loads(f.attrs["meta"]) if fmt == FORMAT else None
                ok = fmt == FORMAT and "scores" in f and "done" in f
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(
                f"{self.path} cannot be read as an ifunc score store ({err}); it may be truncated. It was left "
                "untouched: pass overwrite=True to replace it, or choose another path"
            ) from None
        if not ok:
            raise ValueError(f"{self.path} is not an ifunc score store; it was left untouched (overwrite=True "
                             "replaces it)")
        differences = _describe_difference(found, wanted)
        if differences:
            raise ValueError(
                f"{self.path} holds scores from a different run ({differences}); refusing to mix them. Use "
                "overwrite=True to start over, or another path"
            )

    def write(self, index: int, columns: np.ndarray) -> None:
        """Write chunk ``index`` (``[n_query, width]``), flush, then mark it done and flush again."""
        start = index * self.chunk_size
        self._scores[:, start:start + columns.shape[1]] = columns
        self._file.flush()
        self._done[index] = 1
        self._file.flush()
        self.done.add(index)
        log.info("ifunc: chunk %d/%d written to %s", index + 1, self.n_chunks, self.path)

    def read(self, index: int) -> np.ndarray:
        """The stored columns of chunk ``index``, ``[n_query, width]`` (used to merge per-rank stores)."""
        start = index * self.chunk_size
        return self._scores[:, start:start + self.chunk_size]

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def remove_store(path) -> None:
    """Delete a score store if it exists (a merged per-rank part, or before ``overwrite=True``)."""
    Path(path).unlink(missing_ok=True)


def _open(path, fmt: str, what: str):
    """An open read-only HDF5 file of format ``fmt``; ValueError naming ``what`` when unreadable or another format."""
    try:
        f = _h5py().File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} cannot be read as an ifunc {what} ({err})") from None
    if f.attrs.get("format") != fmt:
        f.close()
        raise ValueError(f"{path} is not an ifunc {what}")
    return f


def _open_complete(path):
    f = _open(path, FORMAT, "score store")
    done = f["done"][...]
    if not done.all():
        missing = int((done == 0).sum())
        f.close()
        raise ValueError(f"{path} is incomplete ({missing} of {len(done)} chunks missing): re-run the same "
                         "attribute(..., out=path) call to finish it")
    return f


def load_scores(path, *, lazy: bool = False):
    """Read a finished score store.

    Returns:
      ``np.ndarray [n_query, n_train]``; with ``lazy=True`` the read-only ``h5py.Dataset`` (its file stays
      open until the dataset is garbage collected or ``ds.file.close()`` is called).

    Raises:
      ValueError: not a score store, unreadable, or incomplete.
    """
    f = _open_complete(path)
    if lazy:
        return f["scores"]
    with f:
        return f["scores"][...]


def top_k(path, k: int, *, block: int = 65536, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest (or lowest) scoring training examples per query, reading ``block`` columns at a time.

    Returns:
      ``(values [n_query, k], indices [n_query, k])`` without ever loading the whole matrix.
    """
    with _open_complete(path) as f:
        ds = f["scores"]
        n_query, n_train = ds.shape
        if not 1 <= k <= n_train:
            raise ValueError(f"k must be in [1, n_train={n_train}], got {k}")
        best_v = torch.empty(n_query, 0)
        best_i = torch.empty(n_query, 0, dtype=torch.long)
        for start in range(0, n_train, block):
            vals = torch.from_numpy(ds[:, start:start + block]).to(torch.float64)
            idx = torch.arange(start, start + vals.shape[1]).expand(n_query, -1)
            cat_v = torch.cat([best_v, vals], dim=1)
            cat_i = torch.cat([best_i, idx], dim=1)
            keep = cat_v.topk(min(k, cat_v.shape[1]), dim=1, largest=largest)
            best_v, best_i = keep.values, cat_i.gather(1, keep.indices)
        return best_v, best_i


def part_path(out, rank: int, size: int) -> Path:
    """File of one rank's columns: ``out.rank{r}of{W}``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}of{size}")


def merge_parts(out, size: int, final_args: dict, part_args) -> None:
    """Copy the finished chunks of the per-rank stores ``out.rank{r}of{W}`` into ``out``, then delete them.

    Rank ``r``'s local chunk ``j`` is global chunk ``j·W + r``. Resumable: chunks already in ``out`` are not
    copied again. ``part_args(r)`` gives the :class:`ScoreWriter` arguments of rank ``r``'s store.

    Raises:
      ValueError: chunks are still missing after the merge (a rank did not finish).
    """
    with ScoreWriter(out, **final_args) as final:
        for r in range(size):
            path = part_path(out, r, size)
            if not path.exists():
                continue
            with ScoreWriter(path, **part_args(r)) as part:
                for j in sorted(part.done):
                    if j * size + r not in final.done:
                        final.write(j * size + r, part.read(j))
        missing = final.n_chunks - len(final.done)
        n_chunks = final.n_chunks
    if missing:
        raise ValueError(f"{out}: {missing} of {n_chunks} chunks are missing after the merge")
    for r in range(size):
        remove_store(part_path(out, r, size))


def write_tensor_groups(path, fmt: str, meta: dict, groups: dict[str, dict[str, torch.Tensor | None]], *,
                        overwrite: bool = False) -> None:
    """Write named groups of tensors with JSON metadata to HDF5, under a temporary name renamed into place.

    A group name may hold ``/`` (nested HDF5 groups). ``None`` entries are skipped. The versions of ifunc and torch are added to ``meta``. An existing file is
    never half-overwritten.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    h5py = _h5py()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = fmt
            f.attrs["meta"] = json.dumps(dict(meta, versions={"ifunc": __version__, "torch": torch.__version__}),
                                         sort_keys=True)
            for group, tensors in groups.items():
                g = f.create_group(group)
                for name, value in tensors.items():
                    if value is not None:
                        g.create_dataset(name, data=value.detach().cpu().numpy())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


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
