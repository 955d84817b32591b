"""Influence scores: pairwise ``[n_query, n_train]`` and self-influence ``[n_train]``.

One loop serves every case: a *scorer* turns a chunk of training examples into score columns (the generic
scorer from per-example gradients and one block solve of the queries, or the Kronecker contractions of a
:class:`ifunc.KroneckerIHVP`), and a *sink* (:mod:`ifunc._sinks`) keeps them in memory, writes them to a
resumable store, or shares them across ``torchrun`` ranks.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import distributed
from ._data import DataSource, batch_size, check_chunk_size, iter_chunks, n_chunks
from ._progress import progress_bar
from ._scorers import generic_scorer, kronecker_scorer, solve, train_chunk_size
from ._sinks import GatherSink, MemorySink, RankStoreSink, StoreSink, resumed_chunk_size, store_meta
from ._types import Data, LossFn, Measurement, Params
from .functional import structure
from .grads import chunk_size_for, iter_per_sample_grads
from .ihvp._operator import check_same_data
from .ihvp.kronecker.score import kronecker_self_terms, scorable
from .ihvp.kronecker.tokens import check_per_token

__all__ = ["attribute", "self_influence"]


def _score_loop(source: DataSource, chunk: int, compute: Callable, sink, *, desc: str, progress):
    """The one scoring loop: every chunk in order, computed where the sink wants it."""
    shown = progress if distributed.world()[0] == 0 else False  # one bar, on rank 0
    with sink:
        for index, offset, batch in progress_bar(
            iter_chunks(source, chunk), total=n_chunks(source, chunk), desc=desc, progress=shown
        ):
            sink.seen(index, batch)  # first: a store checks a chunk it has against its fingerprint
            if sink.wants(index):
                sink.put(index, _finite(compute(batch, offset), offset))
        return sink.result()


def check_score_dtype(dtype) -> None:
    """TypeError unless ``dtype`` is None or a floating-point ``torch.dtype`` (an int dtype would truncate scores)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64, torch.bfloat16, ...), got "
            f"{dtype!r}: integer, bool and complex dtypes would truncate or distort the scores"
        )


def _finite(block: torch.Tensor, offset: int) -> torch.Tensor:
    """``block`` unchanged, or a ValueError when the contraction itself overflowed (gradients were finite)."""
    if not bool(torch.isfinite(block).all()):
        raise ValueError(
            f"scores of the training chunk starting at example {offset} are inf/NaN although every gradient was "
            f"finite: the contraction overflowed in {block.dtype} (max {torch.finfo(block.dtype).max:.3g}); use "
            "float32 or bfloat16 (dtype=), or a loss scale that keeps gradients small"
        )
    return block


def attribute(
    loss: LossFn,
    params: Params,
    ihvp,
    train: Data,
    query: Data,
    *,
    measurement: Measurement | None = None,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    query_rank: int | None = None,
    per_module: bool = False,
    out=None,
    overwrite: bool = False,
    identity: str | None = None,
    progress: bool | None = None,
    dtype: torch.dtype | None = None,
    per_token: bool = False,
    token_mask: Callable | None = None,
):
    """Pairwise influence scores of training examples on query measurements.

    ``scores[q, i] = ∇f(z_q)ᵀ (H + λI)^{-1} ∇ℓ(z_i)``, with ``f`` the measurement (default: the loss) and
    ``ℓ`` the training loss of one example: the first-order *decrease* of ``f(z_q)`` when example ``i`` is
    up-weighted. Positive = helpful. If ``H`` is the curvature of the mean training loss over ``n``
    examples, removing example ``i`` changes ``f(z_q)`` by about ``+scores[q, i] / n``.

    Query gradients are preconditioned once, as one ``[n_query, d]`` block solve; training gradients then
    stream in chunks (``vmap(grad)``) and each chunk costs one matrix product.

    Args:
      loss: training loss ``loss(params, batch) -> scalar`` summed over the batch.
      params: pytree or flat vector ``[d]``.
      ihvp: a closure from any ``ifunc.ihvp_*`` (or any callable ``[k, d] -> [k, d]``).
      train, query: batch, list of batches, Dataset or DataLoader.
      measurement: ``f(params, batch) -> scalar`` for the queries; default ``loss``.
      chunk_size, max_memory: examples per gradient chunk, or a byte budget (default 1 GiB).
      query_rank: Kronecker family only: compress each preconditioned query to rank ``r`` per layer
        (SVD), trading accuracy for speed.
      per_module: Kronecker family only: return ``[n_modules, n_query, n_train]``, one slice per block of
        ``ihvp.info["modules"]``, summing to the total.
      out: path of an HDF5 score store (a file, not a directory). Columns are written chunk by chunk
        (float32, with a checksum) and each chunk is recorded as done only after its data is flushed;
        calling again with the same arguments resumes at the first unfinished chunk and never recomputes a
        finished one, and on a finished store is a no-op that opens it read-only. The file records what
        defines the scores (method, damping per block, settings, curvature summaries, fingerprints of the
        parameters and queries, content hashes of the loss, the measurement and the model: their code, closures,
        referenced globals and module structure, see ``identity``) and a fingerprint of every training chunk; a
        call that differs, or whose training data differs in a finished chunk, is refused. With the default
        ``chunk_size`` a call that resumes a file adopts the chunk size recorded in it (the default follows the
        memory available, which changes between runs); an explicit different one is refused. A custom callable
        ``ihvp`` is resumable only with an ``identity`` attribute (a string). Another process writing the same
        file is refused (:class:`BlockingIOError`); a write the disk refuses (full, a file-size limit) raises
        :class:`OSError` naming the file, keeping every finished chunk. Read it with :func:`ifunc.load_scores` or
        :func:`ifunc.top_k`.
      overwrite: with ``out``, replace an existing file instead of resuming it (never one that another
        process has open).
      identity: with ``out``, a string recorded instead of the content hashes of the loss, measurement and
        model, for code that cannot be hashed stably (an object whose ``repr`` holds a memory address: the
        refusal names its path, e.g. ``loss -> closure 'model' -> attribute 'foo'``). Change it whenever the
        loss, the measurement or the model changes: the store cannot check them then.
      progress: show a tqdm bar over train chunks (``None``: only on a terminal; ``False``: never).
      dtype: precision of the contraction of preconditioned queries with training gradients and of the
        returned scores (default: the parameters' dtype). Gradients and the iHVP solve stay in the
        parameters' dtype, eigendecompositions in float64. ``torch.bfloat16`` halves the memory traffic of
        the dominant ``[n_query, d] × [d, chunk]`` products; it keeps about 3 significant digits (score
        rankings correlate > 0.99 with float64 in our tests), so use it for ranking, not for exact values.
      per_token: Kronecker family only: return ``[n_query, n_train, T]``, the contribution of each position
        ``t`` of each training sequence, ``s[q, i, t] = Σ_l g_{l,t}ᵀ Q̃_l a_{l,t}`` over the tracked layers
        (no per-token gradient is formed); ``s.sum(-1)`` equals the pairwise scores. A module called several
        times per forward contributes all its calls at each position. Diagonal-block parameters are split
        from hooks on the modules that use them (``nn.Linear``, ``Conv1D``, ``nn.Embedding`` — a position
        embedding of ``arange(T)`` included: row ``t`` goes to position ``t`` —, ``nn.LayerNorm`` and RMSNorm,
        so a tied embedding / LM head keeps true per-token scores) and checked against their per-example
        gradients; a parameter used otherwise (a free parameter) is refused by name: ``exclude=`` it
        (:func:`ifunc.language.untracked` lists all non-layer parameters).
        Chunks of different lengths are padded with zeros at the end to the longest ``T``.
      token_mask: with ``per_token``: ``token_mask(batch) -> [b, T]`` (1 = real token, 0 = padding); masked
        positions get exactly 0.

    When ``ihvp`` is a Kronecker-family closure built with ``model=`` (``ihvp_ekfac``, ``ihvp_kfac``,
    ``ihvp_diagonal``, ``ihvp_identity``), queries are preconditioned per layer and contracted with
    captured layer inputs / output-gradients of the training examples (``Σ_t g_tᵀ Q̃ a_t``), with no
    per-example gradient of the whole model; the result is the same as the generic path.

    Memory: the query gradients ``[n_query, d]``, one chunk of training gradients and the output; the
    training data streams (any DataLoader), so with ``out=`` peak memory does not grow with ``n_train``.

    Under ``torchrun`` (a default process group), train chunk ``i`` is scored on rank ``i mod W`` and every
    rank returns the full matrix; with ``out=`` each rank writes a resumable ``out.rank{r}of{W}`` that rank 0
    merges into ``out``. Every rank passes the same data (see ``ifunc.distributed``).

    ``train`` and ``query`` are read in order: a shuffling DataLoader is refused (its columns would be in a
    random order).

    Returns:
      ``[n_query, n_train]`` tensor in the parameters' dtype (``[n_query, n_train, T]`` with ``per_token``);
      with ``out=`` the path of the finished store.

    Example:
      >>> scores = ifunc.attribute(loss, params, ihvp, (x_tr, y_tr), (x_te, y_te))
      >>> scores.topk(5, dim=1).indices     # most helpful training examples per query
    """
    check_score_dtype(dtype)
    kron = scorable(ihvp)
    if not kron and (query_rank is not None or per_module):
        raise ValueError(
            "query_rank= and per_module=True need a Kronecker-family closure built with model= "
            "(ifunc.ihvp_ekfac / ihvp_kfac / ihvp_diagonal / ihvp_identity)"
        )
    if token_mask is not None and not per_token:
        raise ValueError("token_mask= applies to per-token scores; pass per_token=True")
    if per_token and (per_module or out is not None or distributed.active()):
        raise NotImplementedError(
            "per_token=True cannot be combined with per_module=True, out= or "
            "torch.distributed yet; compute per-token scores for a slice of the train set"
        )
    if out is not None and per_module:
        raise NotImplementedError("per_module=True cannot be written to a score store yet; drop out= or per_module")
    if per_token:
        check_per_token(ihvp)
    chunk_size = check_chunk_size(chunk_size)  # None, or a positive int
    source = DataSource(train, name="train", ordered=True)
    check_same_data(source, params)  # every rank: all the data, the same params (no-op without a process group)
    if out is not None:  # before any work: an unidentifiable loss is refused at once
        meta, resume = store_meta(loss, params, ihvp, query, measurement, query_rank, dtype, identity)
        if chunk_size is None and not overwrite:  # the default follows free memory: resume with the file's
            chunk_size = resumed_chunk_size(out)
    elif identity is not None:
        raise ValueError("identity= names what defines the scores of a score store; it needs out=")
    if kron:
        scorer = kronecker_scorer(
            loss,
            params,
            ihvp,
            train,
            query,
            measurement,
            chunk_size,
            max_memory,
            query_rank,
            per_module,
            per_token,
            token_mask,
        )
    else:
        scorer = generic_scorer(loss, params, ihvp, train, query, measurement, chunk_size, max_memory, dtype)
    chunk = scorer.chunk
    if chunk_size is None:  # every rank takes rank 0's: a default sized from each rank's free memory could differ
        chunk = int(distributed.broadcast_result(lambda: scorer.chunk))  # pyright: ignore[reportArgumentType]
    if out is None:
        sink = GatherSink() if distributed.active() else MemorySink(tokens=per_token)
    else:
        kind = RankStoreSink if distributed.active() else StoreSink
        sink = kind(
            out,
            n_query=scorer.n_query,
            n_train=source.count(),
            chunk=chunk,
            meta=meta,  # pyright: ignore[reportPossiblyUnboundVariable]  # set above when out is given
            overwrite=overwrite,
            **resume,  # pyright: ignore[reportPossiblyUnboundVariable]
        )
    desc = "ifunc per-token scores" if per_token else "ifunc scores"
    scores = _score_loop(source, chunk, scorer.score, sink, desc=desc, progress=progress)
    return scores.to(dtype) if dtype is not None and out is None else scores


def self_influence(
    loss: LossFn,
    params: Params,
    ihvp,
    train: Data,
    *,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    per_module: bool = False,
) -> torch.Tensor:
    """Self-influence ``s[i] = ∇ℓ(z_i)ᵀ (H + λI)^{-1} ∇ℓ(z_i)``, ``[n_train]``.

    Large values flag examples the model finds surprising (often mislabelled). Training data streams in
    chunks; each chunk of gradients is solved as one ``[c, d]`` block (Kronecker-family closures use
    per-layer contractions instead). ``progress`` as in :func:`attribute`. ``per_module=True`` (Kronecker
    family only) returns ``[n_modules, n_train]``, one row per block of ``ihvp.info["modules"]``, summing
    to the total.
    """
    chunk_size = check_chunk_size(chunk_size)  # None, or a positive int
    source = DataSource(train, name="train", ordered=True)
    check_same_data(source, params)
    if scorable(ihvp):
        step = chunk_size or train_chunk_size(loss, params, ihvp, source, max_memory)
        compute = lambda batch, offset: kronecker_self_terms(  # noqa: E731
            loss, params, ihvp, batch, per_module=per_module, offset=offset
        )
        sink = GatherSink() if distributed.active() else MemorySink()
        s = _score_loop(source, step, compute, sink, desc="ifunc self-influence", progress=progress)
        return s if per_module else s[0]
    if per_module:
        raise ValueError(
            "per_module=True needs a Kronecker-family closure built with model= "
            "(ifunc.ihvp_ekfac / ihvp_kfac / ihvp_diagonal / ihvp_identity)"
        )
    d = structure(params).dim
    chunk = chunk_size or chunk_size_for(loss, params, source, max_memory=max_memory, name="train")
    if distributed.active():  # a round of W chunks at a time: the solve may itself be distributed
        chunk = max(1, chunk // distributed.world()[1])
    rank, size = distributed.world()
    out, held = [], []
    bar = progress_bar(
        iter_chunks(source, chunk),
        total=n_chunks(source, chunk),
        desc="ifunc self-influence",
        progress=progress if rank == 0 else False,
    )
    for index, offset, batch in bar:
        mine = index % size == rank
        G = (
            torch.cat(list(iter_per_sample_grads(loss, params, batch, chunk_size=chunk, name="train", offset=offset)))
            if mine
            else None
        )
        held.append((batch_size(batch), G))
        if len(held) == size:
            out.append(_self_round(ihvp, held, d))
            held = []
    if held:
        out.append(_self_round(ihvp, held, d))
    if not out:
        raise ValueError("the training data yielded no examples")
    return torch.cat(out)


def _self_round(ihvp, held: list, d: int) -> torch.Tensor:
    """``[Σ b]``: ``gᵢᵀ (H + λI)^{-1} gᵢ`` for one round of chunks, chunk ``r`` held by rank ``r``.

    Every rank solves the whole round (all-gathered in chunk order), so a solver whose products are
    all-reduced (CG, LiSSA) sees the same right-hand sides everywhere.
    """
    rank = distributed.world()[0]
    local = held[rank][1] if rank < len(held) else None
    G = distributed.gather_rows(local, [w for w, _ in held], d)
    return (G * solve(ihvp, G)).sum(dim=1)
