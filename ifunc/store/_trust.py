"""What a score store must pass before it is resumed or read: the checks, each raising a ``ValueError``.

* :func:`_validate`: an existing file is an ifunc score store of the current format version, with readable metadata
  equal to this run's (:func:`ifunc.store._meta.describe_difference`: floats to a relative 1e-6) and datasets
  shaped as that metadata says; the message names every difference, and the file is left untouched.
* :func:`check_fingerprint`: a chunk a resumed run skips holds the same training data as when it was written.
* :func:`_verify`: a chunk's stored columns match their CRC-32 checksum (on every read, unless ``verify=False``).

The layout they check (``FORMAT``, ``VERSION``) is described in :mod:`ifunc.store.scores`, which writes it.
"""

from __future__ import annotations

import zlib

import numpy as np

from ._meta import describe_difference, read_meta

__all__ = ["check_fingerprint", "FORMAT", "VERSION"]


FORMAT = "ifunc-scores"


VERSION = 2


def check_fingerprint(path, index: int, recorded: str, found: str) -> None:
    """Raise unless chunk ``index`` of the training data hashes to what the store recorded for it."""
    if recorded != found:
        raise ValueError(
            f"{path}: chunk {index} of the training data differs from the one whose scores the file holds "
            f"(fingerprint {found}, recorded {recorded}): the training data changed since the file was written, "
            "and resuming would mix scores of two data sets. Use overwrite=True to start over, or another path"
        )


def _verify(path, index: int, columns: np.ndarray, expected: int) -> None:
    if zlib.crc32(np.ascontiguousarray(columns).data) != expected:
        raise ValueError(
            f"{path}: chunk {index} fails its checksum: its scores were changed or damaged after they were "
            "written. Re-run the attribute(..., out=path) call with overwrite=True to recompute them, or read the "
            "file unchecked with verify=False"
        )


def _validate(f, path, wanted: dict, refuse_resume: str | None) -> None:
    if f.attrs.get("format") != FORMAT or "scores" not in f or "done" not in f:
        raise ValueError(f"{path} is not an ifunc score store; it was left untouched (overwrite=True replaces it)")
    version = f.attrs.get("version", 1)
    if not isinstance(version, (int, np.integer)):
        raise ValueError(
            f"{path} is damaged (its format version is {version!r}); it was left untouched (overwrite=True replaces it)"
        )
    if version < VERSION:
        raise ValueError(
            f"{path} was written by an older ifunc (no per-chunk fingerprints), so resuming it cannot "
            "be checked; re-run with overwrite=True (load_scores still reads it)"
        )
    try:
        found = read_meta(f)
        if not isinstance(found, dict):
            raise ValueError(f"a {type(found).__name__} where a JSON object belongs")
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"{path} has no readable metadata ({err}); it was left untouched (overwrite=True replaces it)"
        ) from None
    if found.get("kind") != wanted.get("kind"):  # e.g. a gradient index where attribute's scores were stored
        found_kind, wanted_kind = found.get("kind") or "score store", wanted.get("kind") or "score store"
        raise ValueError(
            f"{path} is a {found_kind} file, not a {wanted_kind} file: this call would mix the two, so it was left "
            "untouched. Use another path, or overwrite=True to replace it"
        )
    differences = describe_difference(found, wanted)
    if differences:
        hint = ""
        if found.get("chunk_size") != wanted.get("chunk_size"):
            hint = (
                f"; the chunk size is part of the file's layout: drop chunk_size= (a resumed run adopts the file's), "
                f"or pass chunk_size={found.get('chunk_size')}"
            )
        raise ValueError(
            f"{path} holds scores from a different run ({differences}){hint}; refusing to mix them. Use "
            "overwrite=True to start over, or another path"
        )
    n_chunks = -(-int(wanted["n_train"]) // int(wanted["chunk_size"]))
    layout = {"scores": (wanted["n_query"], wanted["n_train"]), "done": (n_chunks,), "fingerprints": (n_chunks,)}
    layout["checksums"] = (n_chunks,)
    damaged = [k for k, shape in layout.items() if k not in f or tuple(f[k].shape) != tuple(shape)]
    if damaged:  # never write at offsets past a dataset's end
        raise ValueError(
            f"{path} is damaged: its datasets {damaged} are missing or not shaped as its metadata says "
            f"({layout}); it was left untouched (overwrite=True replaces it)"
        )
    if refuse_resume:
        raise ValueError(f"{path} exists and {refuse_resume}; use overwrite=True to start over, or another path")
