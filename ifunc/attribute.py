"""Influence scores: pairwise ``[n_query, n_train]`` and self-influence ``[n_train]``."""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

from . import distributed
from ._version import __version__ as _version
from ._data import DataSource, batch_size as _batch_size
from ._progress import progress_bar
from ._kscore import (DEFAULT_CHUNK, kronecker_chunk_scores, kronecker_prepare, kronecker_self_influence,
                      kronecker_state)
from ._ktoken import check_per_token, token_chunk_scores
from ._types import Data, LossFn, Measurement, Params
from .functional import flatten
from .grads import chunk_size_for, iter_per_sample_grads, per_sample_grads
from .ihvp._base import IHVP

__all__ = ["attribute", "self_influence"]

log = logging.getLogger("ifunc")


def _check_ihvp(ihvp, d: int):
    if not callable(ihvp):
        raise TypeError(f"ihvp must be a callable v -> (H + λI)^{{-1}} v (e.g. ifunc.ihvp_cg(...)), got {ihvp!r}")
    if isinstance(ihvp, IHVP) and ihvp.dim != d:
        raise ValueError(f"ihvp was built for {ihvp.dim} parameters but params have {d}")


def _solve(ihvp, V: torch.Tensor) -> torch.Tensor:
    return ihvp.solve(V) if isinstance(ihvp, IHVP) else ihvp(V)


def _progress(iterable, *, total, desc, progress):
    return progress_bar(iterable, total=total, desc=desc, progress=progress)


class _Scorer(NamedTuple):
    """Scores of one chunk of training examples against the prepared queries."""

    chunk: int  #: examples per chunk
    score: Callable  #: (batch, offset) -> [n_query, b] (or [n_modules, n_query, b])
    meta: dict


def _generic_scorer(loss, params, ihvp, query, measurement, chunk_size, max_memory, dtype) -> _Scorer:
    Q = per_sample_grads(measurement or loss, params, query, chunk_size=chunk_size, max_memory=max_memory)
    Q = distributed.same(Q)  # rank 0's bits on every rank: the solve may be distributed (no-op on one process)
    _check_ihvp(ihvp, Q.shape[1])
    with torch.no_grad():
        Qp = _solve(ihvp, Q)
    Qp = Qp.to(dtype or Qp.dtype)
    chunk = chunk_size or chunk_size_for(Q.shape[1], Q.element_size(), max_memory=max_memory)

    def score(batch, offset):
        cols = [Qp @ G.to(Qp.dtype).T for G in iter_per_sample_grads(loss, params, batch, chunk_size=chunk,
                                                                     name="train", offset=offset)]
        return torch.cat(cols, dim=1)

    return _Scorer(chunk, score, {"n_query": Qp.shape[0]})


def _kronecker_scorer(loss, params, ihvp, query, measurement, chunk_size, max_memory, query_rank,
                      per_module) -> _Scorer:
    prepared = kronecker_prepare(loss, params, ihvp, query, measurement=measurement, chunk_size=chunk_size,
                                 max_memory=max_memory, query_rank=query_rank)
    prepared = distributed.same(prepared)  # identical preconditioned queries on every rank

    def score(batch, offset):
        out = kronecker_chunk_scores(loss, params, ihvp, prepared, batch, per_module=per_module, offset=offset)
        return out if per_module else out[0]

    return _Scorer(chunk_size or DEFAULT_CHUNK, score, {"n_query": prepared[0].shape[0]})


def _run_meta(loss, params, ihvp, query, measurement, query_rank) -> dict:
    info = getattr(ihvp, "info", {}) or {}
    simple = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))}
    query_leaves = [t for b in DataSource(query, name="query") for t in _leaves(b)]
    return {
        "method": getattr(ihvp, "name", type(ihvp).__name__),
        "damping": getattr(ihvp, "damping", None),
        "method_info": simple,
        "measurement": _name_of(measurement or loss),
        "query_rank": query_rank,
        "params": _store().fingerprint([flatten(params)[0]]),
        "query": _store().fingerprint(query_leaves),
        "versions": {"ifunc": _version, "torch": torch.__version__},
    }


def _name_of(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _leaves(batch):
    import optree

    return [t for t in optree.tree_leaves(batch, namespace="ifunc") if isinstance(t, torch.Tensor)]


def _store():
    from . import store

    return store


def attribute(loss: LossFn, params: Params, ihvp, train: Data, query: Data, *,
              measurement: Measurement | None = None, chunk_size: int | None = None,
              max_memory: int | None = None, query_rank: int | None = None,
              per_module: bool = False, out=None, overwrite: bool = False, progress: bool | None = None,
              dtype: torch.dtype | None = None, per_token: bool = False, token_mask: Callable | None = None):
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
      out: path of an HDF5 score store. Columns are written chunk by chunk (float32) and each chunk is
        recorded as done only after its data is flushed; calling again with the same arguments resumes at
        the first unfinished chunk and never recomputes a finished one. The file records the method,
        damping and fingerprints of the parameters, queries and training data, and a call that differs is
        refused. Read it with :func:`ifunc.load_scores` or :func:`ifunc.top_k`.
      overwrite: with ``out``, replace an existing file instead of resuming it.
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
        from hooks on the modules that use them (``nn.Linear``, ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm``,
        so a tied embedding / LM head keeps true per-token scores) and checked against their per-example
        gradients; a parameter used otherwise (a free parameter, a position embedding of ``arange(T)``) is
        refused by name: ``exclude=`` it (:func:`ifunc.language.untracked` lists all non-layer parameters).
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

    Returns:
      ``[n_query, n_train]`` tensor in the parameters' dtype (``[n_query, n_train, T]`` with ``per_token``);
      with ``out=`` the path of the finished store.

    Example:
      >>> scores = ifunc.attribute(loss, params, ihvp, (x_tr, y_tr), (x_te, y_te))
      >>> scores.topk(5, dim=1).indices     # most helpful training examples per query
    """
    if per_token:
        return _per_token(loss, params, ihvp, train, query, measurement=measurement, chunk_size=chunk_size,
                          max_memory=max_memory, query_rank=query_rank, token_mask=token_mask, progress=progress,
                          dtype=dtype, unsupported=per_module or out is not None)
    if token_mask is not None:
        raise ValueError("token_mask= applies to per-token scores; pass per_token=True")
    kron = kronecker_state(ihvp) is not None
    if not kron and (query_rank is not None or per_module):
        raise ValueError("query_rank= and per_module=True need a Kronecker-family closure built with model= "
                         "(ifunc.ihvp_ekfac / ihvp_kfac / ihvp_diagonal / ihvp_identity)")
    if out is not None and per_module:
        raise NotImplementedError("per_module=True cannot be written to a score store yet; drop out= or "
                                  "per_module")
    source = DataSource(train, name="train")
    distributed.check_data(source)  # every rank must hold all the data (no-op without a process group)
    if out is not None:
        n_train = source.count()
        meta = _run_meta(loss, params, ihvp, query, measurement, query_rank)
    if kron:
        scorer = _kronecker_scorer(loss, params, ihvp, query, measurement, chunk_size, max_memory, query_rank,
                                   per_module)
    else:
        scorer = _generic_scorer(loss, params, ihvp, query, measurement, chunk_size, max_memory, dtype)
    chunks = source.chunks(scorer.chunk)
    total = source.cheap_count()
    total = -(-total // scorer.chunk) if total is not None else None
    shown = progress if distributed.world()[0] == 0 else False  # one bar, on rank 0
    if out is None and distributed.active():  # train chunks sharded over the ranks, columns all-gathered
        scores = distributed.gather_chunks(chunks, scorer.score, wrap=lambda it: _progress(
            it, total=total, desc="ifunc scores", progress=shown))
        return scores.to(dtype) if dtype is not None else scores
    if out is None:
        columns, offset = [], 0
        for batch in _progress(chunks, total=total, desc="ifunc scores", progress=progress):
            columns.append(scorer.score(batch, offset))
            offset += _batch_size(batch)
        scores = torch.cat(columns, dim=-1)
        return scores.to(dtype) if dtype is not None else scores

    first = next(iter(source.chunks(scorer.chunk)))
    meta["train"] = _store().fingerprint(_leaves(first))
    if distributed.active():  # one resumable store per rank, merged into `out` by rank 0
        return distributed.scores_to_store(
            out, chunks, scorer.score, n_query=scorer.meta["n_query"], n_train=n_train, chunk=scorer.chunk,
            meta=meta, overwrite=overwrite,
            wrap=lambda it, n: _progress(it, total=n, desc="ifunc scores", progress=shown))
    with _store().ScoreWriter(out, n_query=scorer.meta["n_query"], n_train=n_train, chunk_size=scorer.chunk,
                              meta=meta, overwrite=overwrite) as writer:
        offset = 0
        for index, batch in enumerate(_progress(chunks, total=writer.n_chunks, desc="ifunc scores",
                                                progress=progress)):
            b = _batch_size(batch)
            if index not in writer.done:
                cols = scorer.score(batch, offset)
                writer.write(index, cols.detach().to("cpu", torch.float32).numpy())
            offset += b
        if len(writer.done) != writer.n_chunks:
            raise ValueError(f"train data yielded fewer chunks than the {writer.n_chunks} recorded in {out}")
    return out


def _per_token(loss, params, ihvp, train, query, *, measurement, chunk_size, max_memory, query_rank, token_mask,
               progress, dtype, unsupported) -> torch.Tensor:
    """``[n_query, n_train, T]`` per-token scores (see :func:`attribute`)."""
    if unsupported or distributed.active():
        raise NotImplementedError("per_token=True cannot be combined with per_module=True, out= or "
                                  "torch.distributed yet; compute per-token scores for a slice of the train set")
    check_per_token(ihvp)
    prepared = kronecker_prepare(loss, params, ihvp, query, measurement=measurement, chunk_size=chunk_size,
                                 max_memory=max_memory, query_rank=query_rank)
    source = DataSource(train, name="train")
    step = chunk_size or DEFAULT_CHUNK
    total = source.cheap_count()
    parts = [token_chunk_scores(loss, params, ihvp, prepared, batch, token_mask=token_mask)
             for batch in _progress(source.chunks(step), total=None if total is None else -(-total // step),
                                    desc="ifunc per-token scores", progress=progress)]
    T = max(p.shape[-1] for p in parts)
    scores = torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[-1])) for p in parts], dim=1)
    return scores.to(dtype) if dtype is not None else scores


def self_influence(loss: LossFn, params: Params, ihvp, train: Data, *, chunk_size: int | None = None,
                   max_memory: int | None = None, progress: bool | None = None,
                   per_module: bool = False) -> torch.Tensor:
    """Self-influence ``s[i] = ∇ℓ(z_i)ᵀ (H + λI)^{-1} ∇ℓ(z_i)``, ``[n_train]``.

    Large values flag examples the model finds surprising (often mislabelled). Training data streams in
    chunks; each chunk of gradients is solved as one ``[c, d]`` block (Kronecker-family closures use
    per-layer contractions instead). ``progress`` as in :func:`attribute`. ``per_module=True`` (Kronecker
    family only) returns ``[n_modules, n_train]``, one row per block of ``ihvp.info["modules"]``, summing
    to the total.
    """
    if kronecker_state(ihvp) is not None:
        if distributed.active():  # train chunks sharded over the ranks, entries all-gathered
            step = chunk_size or DEFAULT_CHUNK
            return distributed.gather_chunks(DataSource(train, name="train").chunks(step), lambda b, _: (
                kronecker_self_influence(loss, params, ihvp, b, chunk_size=step, per_module=per_module)))
        return kronecker_self_influence(loss, params, ihvp, train, chunk_size=chunk_size, per_module=per_module)
    if per_module:
        raise ValueError("per_module=True needs a Kronecker-family closure built with model= "
                         "(ifunc.ihvp_ekfac / ihvp_kfac / ihvp_diagonal / ihvp_identity)")
    source = DataSource(train, name="train")
    d = flatten(params)[0]
    chunk = chunk_size or chunk_size_for(d.numel(), d.element_size(), max_memory=max_memory)
    total = source.cheap_count()
    if distributed.active():  # gradients sharded by chunk, solved jointly (the solve may itself be distributed)
        step = max(1, chunk // distributed.world()[1])
        grads = lambda batch, offset: torch.cat(list(iter_per_sample_grads(  # noqa: E731
            loss, params, batch, chunk_size=step, name="train", offset=offset)))
        return distributed.solve_rounds(source.chunks(step), grads, lambda G: _self_terms(ihvp, G), d.numel())
    out, offset = [], 0
    for batch in _progress(source.chunks(chunk), total=None if total is None else -(-total // chunk),
                           desc="ifunc self-influence", progress=progress):
        for G in iter_per_sample_grads(loss, params, batch, chunk_size=chunk, name="train", offset=offset):
            out.append(_self_terms(ihvp, G))
            offset += G.shape[0]
    return torch.cat(out)


def _self_terms(ihvp, G: torch.Tensor) -> torch.Tensor:
    """``[b]``: ``gᵢᵀ (H + λI)^{-1} gᵢ`` for the rows of ``G [b, d]``."""
    _check_ihvp(ihvp, G.shape[1])
    with torch.no_grad():
        return (G * _solve(ihvp, G)).sum(dim=1)
