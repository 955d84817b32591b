"""Retrain on many subsets and measure each model, storing every outcome as it is finished (resumable).

The file is an ifunc score store (:class:`ifunc.store.ScoreWriter`, metadata ``kind = "retraining outcomes"``)
holding one row ``[1, m·q]`` cut into ``m`` chunks of ``q`` cells: chunk ``s`` is subset ``s``'s outcomes. The store
gives everything a long retraining run needs: each chunk is written at fixed offsets with its fingerprint (the
subset's indices) and CRC-32, then marked done, so a killed run loses at most the subset it was on and earlier rows
are never rewritten; the metadata (a fingerprint of all subsets, ``m``, ``n``, ``q``) must match for a resume; the
HDF5 lock keeps a second writer out; a finished row is checked against its CRC-32 when a resume reads it. ``q``
is the chunk size, which :func:`ifunc.store.recorded_chunk_size` reads back before anything is retrained.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .._progress import progress_bar
from ..store import ScoreWriter, fingerprint, recorded_chunk_size
from .metrics import _mask

__all__ = ["retrain"]

KIND = "retraining outcomes"  #: the ``kind`` recorded in the metadata of an outcome file


def _outcome(value, s: int, q: int | None) -> torch.Tensor:
    """``measure``'s result for subset ``s`` as a finite float64 vector ``[q]`` (a number counts as ``[1]``)."""
    try:
        row = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"retrain: measure must return a tensor [q], got {type(value).__name__} ({err})") from None
    if row.dtype == torch.bool:
        row = row.to(torch.float64)  # per-query correctness: 1.0 / 0.0
    if row.is_complex() or row.dim() > 1:
        raise ValueError(
            f"retrain: measure must return a real vector [q] (one measurement per query), got {row.dtype} of shape "
            f"{tuple(row.shape)} for subset {s}; flatten it or reduce it to one number per query"
        )
    row = row.reshape(-1).to("cpu", torch.float64)
    if q is not None and len(row) != q:
        raise ValueError(
            f"retrain: measure returned {len(row)} outcomes for subset {s}, but the subsets before it (or the out= "
            f"file) have q={q}; measure the same queries every time, or start a new file (overwrite=True or another "
            "path)"
        )
    if not len(row) or not torch.isfinite(row).all():
        raise ValueError(
            f"retrain: measure returned {'no outcome' if not len(row) else 'a non-finite outcome'} for subset {s} "
            f"({row.tolist()[:8]}); did training on that subset diverge? Nothing was stored for it"
        )
    return row


def _writer(path: Path, meta: dict, m: int, q: int, overwrite: bool) -> ScoreWriter:
    try:
        return ScoreWriter(
            path,
            n_query=1,
            n_train=m * q,
            chunk_size=q,
            meta=dict(meta, n_outcomes=q),
            dtype=cast(Any, np.float64),  # ScoreWriter's dtype is unannotated: pyright infers float32
            overwrite=overwrite,
        )
    except ValueError as err:
        raise ValueError(f"retrain: {err}") from None


def retrain(
    train_fn: Callable[[torch.Tensor], Any],
    measure: Callable[[Any], torch.Tensor | float],
    subsets: torch.Tensor,
    *,
    out=None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> torch.Tensor:
    """Retrain on each subset and measure the result: ``outcomes[s] = measure(train_fn(indices of S_s))``, ``[m, q]``.

    The ground truth of :func:`lds` (``subsets`` from :func:`random_subsets`) and of :func:`loo_correlation`
    (``subsets = ~torch.eye(n, dtype=torch.bool)[left_out]``). Subsets run in order, one at a time; a progress bar
    counts them. With ``out=PATH`` each subset's outcomes are written to an HDF5 file the moment they are measured,
    so a killed run, run again with the same arguments, retrains only the subsets it had not finished (a finished
    file returns its outcomes without calling ``train_fn`` at all). The file records the subsets (a fingerprint of
    the mask), ``m``, ``n`` and ``q`` and refuses a resume where any differs, naming it; it cannot know
    ``train_fn``/``measure``, so change the path when you change those. Stored in float64: a resumed run returns
    exactly what an uninterrupted one does (given a deterministic ``train_fn``).

    Args:
      train_fn: ``train_fn(indices) -> model``: trains on the examples ``indices`` (a sorted ``int64`` tensor
        ``[k]``) and returns anything ``measure`` takes (an ``nn.Module``, parameters, ...). Seed it yourself (per
        subset if wanted, e.g. from the indices): ``retrain`` never touches the RNG.
      measure: ``measure(model) -> [q]``: the measurements of the ``q`` queries (e.g. per-query losses,
        ``F.cross_entropy(model(x_q), y_q, reduction="none")``); the same ``q`` for every subset, finite. A
        number counts as ``q = 1``.
      subsets: bool mask ``[m, n]`` (row ``s`` marks subset ``s``'s examples), e.g. from :func:`random_subsets`.
      out: path of the ``.h5`` outcome file (created, or resumed); ``None`` keeps everything in memory.
      overwrite: replace an existing file instead of resuming it (refused while another process has it open).
      progress: show a tqdm bar over subsets (``None``: only on a terminal; ``False``: never).

    Returns:
      ``outcomes [m, q]`` float64: row ``s`` is ``measure(train_fn(subsets[s].nonzero().flatten()))``.

    Raises:
      TypeError: ``subsets`` not a bool mask ``[m, n]``, ``train_fn``/``measure`` not callable, a measure result
        that is no tensor.
      ValueError: a measure result that is not ``[q]``, not finite, or of another ``q`` than before or than the
        file's; an ``out`` file of other subsets, ``m``, ``n`` or ``q``, of another kind, unreadable, or with a
        damaged row (its checksum fails); ``out`` a directory, or in a missing directory.
      BlockingIOError: another process has ``out`` open.
      OSError: the disk refused a write (named; the rows already written are kept).

    Example:
      >>> masks = ifunc.evaluate.random_subsets(len(y), 100, generator=torch.Generator().manual_seed(1))
      >>> def train_fn(idx):
      ...     return fit(init_model(seed=0), x[idx], y[idx])
      >>> def measure(model):
      ...     return F.cross_entropy(model(x_q), y_q, reduction="none").detach()
      >>> outcomes = ifunc.evaluate.retrain(train_fn, measure, masks, out="retrain.h5")  # [100, q]
    """
    for name, fn in (("train_fn", train_fn), ("measure", measure)):
        if not callable(fn):
            raise TypeError(f"retrain: {name} must be callable, got {type(fn).__name__}")
    masks = _mask(subsets, "retrain")
    m, n = masks.shape
    if m == 0:
        raise ValueError("retrain: subsets holds no subset (m = 0)")
    indices = [row.nonzero().flatten() for row in masks]
    meta = {"kind": KIND, "subsets": fingerprint([masks]), "n_subsets": m, "n_examples": n}
    path = None if out is None else Path(out)
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        what = "is a directory; give a file path" if path.is_dir() else "is in a directory that does not exist"
        raise ValueError(f"retrain: out={str(path)!r} {what} (checked before any retraining)")
    writer: ScoreWriter | None = None
    q: int | None = None
    rows: list[torch.Tensor | None] = [None] * m
    bar = progress_bar(total=m, desc="retrain", progress=progress)

    def load_done(store: ScoreWriter) -> None:  # the rows a run before this one finished, each CRC-32 checked
        for s in sorted(store.done):
            if rows[s] is None:
                try:
                    store.check(s, fingerprint([indices[s]]))
                    rows[s] = torch.from_numpy(store.read(s)[0].copy())
                except ValueError as err:  # the subsets are in the meta, checked at open: this row is damaged
                    warnings.warn(
                        f"retrain: the stored outcome of subset {s} in {store.path} is damaged ("
                        f"{str(err).split(';')[0]}); that subset is retrained and its row written again, the other "
                        "rows are kept",
                        stacklevel=3,
                    )
                    continue
                bar.update(1)

    try:
        if path is not None and not overwrite and path.exists():
            q = recorded_chunk_size(path)  # the file's q; None: no outcome file, which ScoreWriter then names
            writer = _writer(path, meta, m, q if q is not None else 1, overwrite=False)
            if q is None:
                raise ValueError(f"retrain: {path} records no number of outcomes; pass overwrite=True or another path")
            load_done(writer)
        for s in range(m):
            if rows[s] is not None:
                continue
            row = _outcome(measure(train_fn(indices[s])), s, q)
            q = len(row)
            if path is not None:
                if writer is None:
                    writer = _writer(path, meta, m, q, overwrite=overwrite)
                    load_done(writer)  # empty, unless another process created the file since this run looked
                if rows[s] is not None:
                    continue
                writer.write(s, row.numpy()[None, :], fingerprint([indices[s]]))
            rows[s] = row
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return torch.stack([row for row in rows if row is not None])
