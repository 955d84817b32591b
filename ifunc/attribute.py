"""Influence scores: pairwise ``[n_query, n_train]`` and self-influence ``[n_train]``.

Both are the one loop of :mod:`ifunc._score_loop`: chunks of training examples × the closure's scorer
(``ihvp.scorer``: the generic one, or the Kronecker family's captured contractions) × a sink
(:mod:`ifunc._sinks`: memory, a resumable store, or shared across ``torchrun`` ranks). Nothing here knows a method.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from . import distributed
from ._chunks import Partition, check_chunk_size, iter_chunks
from ._data import DataSource
from ._errors import CostWarning
from ._score_loop import Normalized, agreed_chunk, check_normalize, run_chunks
from ._sinks import GatherSink, MemorySink, Sink, default_sink
from ._store_meta import store_meta
from ._types import Data, LossFn, Measurement, Params
from .ihvp import ScoreOptions, check_same_data, rank_partition, scorer_for
from .index import GradientIndex, IndexScorer, ProjectedScorer, check_index_params, index_source

__all__ = ["attribute", "self_influence"]


def check_score_dtype(dtype) -> None:
    """TypeError unless ``dtype`` is None or a floating-point ``torch.dtype`` (an int dtype would truncate scores)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64, torch.bfloat16, ...), got "
            f"{dtype!r}: integer, bool and complex dtypes would truncate or distort the scores"
        )


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
    sink: Sink | None = None,
    normalize: str | None = None,
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
      train, query: batch, list of batches, Dataset or DataLoader. ``train`` may also be a gradient index
        (:func:`ifunc.build_index` / :func:`ifunc.open_index`): no training example is read; the closure's
        preconditioned queries are projected like the stored gradients and multiplied with them (equal to the
        scores from the data where the projection is the identity, equal in expectation otherwise). The index
        holds the gradients of the loss it was built with, at the parameters it was built at (other ``params``
        are refused; ``loss`` is then used for the closure only), through the parameters it holds: those it was
        built with ``exclude=`` contribute nothing. With ``ihvp = ifunc.ihvp_projected(index)`` (the curvature of the
        index's own coordinates) the raw query gradients are projected and that closure applied to them instead;
        such a closure with ordinary training data is refused (``TypeError``).
      measurement: ``f(params, batch) -> scalar`` for the queries; default ``loss``.
      chunk_size, max_memory: examples per chunk, or a byte budget for the tensors a chunk holds (default: half
        the available memory, and at most 1 GiB of per-example tensors; see :mod:`ifunc._memory`).
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
      dtype: dtype of the returned scores and of the columns a sink receives, and the precision of the score
        contraction (default: the closure's dtype, which is the parameters' and float32 for ``torch.bfloat16`` /
        ``torch.float16`` parameters; a score store keeps float32). The preconditioned queries and each chunk's
        training gradients are cast to it before they meet: the generic scorer's ``[n_query, d] × [d, chunk]``
        products, and the Kronecker family's per-layer ``Σ_t g_tᵀ Q̃ a_t`` (each layer in ``dtype``, the layers
        summed in float32). ``torch.bfloat16`` halves the memory traffic of these products and keeps about 3
        significant digits, so use it for ranking, not for exact values (measured in docs/language-models.md,
        "Half precision"). Gradients, the iHVP solve and self terms stay in the closure's dtype.
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
      sink: where the columns go instead of memory or ``out=``: any object with the sink protocol of
        :mod:`ifunc._sinks` (``chunk_size``, ``open``, ``seen``, ``wants``, ``put``, ``result``, ``close``);
        the call returns its ``result()``.
      normalize: None (raw scores), ``"cosine"`` or ``"relatif"``: keep high-norm (high-loss, unusual) training
        examples from topping every list. With the self terms ``t_i = ∇ℓ(z_i)ᵀ (H + λI)^{-1} ∇ℓ(z_i)`` (exactly
        :func:`self_influence`'s values) and ``t_q = ∇f(z_q)ᵀ (H + λI)^{-1} ∇f(z_q)``, ``"cosine"`` returns
        ``s[q, i] / (√t_q √t_i)``, the cosine of the two gradients in the metric ``(H + λI)^{-1}`` (in
        ``[-1, 1]`` for an exact closure), and ``"relatif"`` (RelatIF's loss-relative form, Barshan et al. 2020)
        returns ``s[q, i] / √t_i``, which keeps the query's scale and ranks each query's list like the cosine. An
        example (or query) with zero gradient has ``t = 0`` and scores 0, never NaN; a negative ``t`` (a curvature
        that is not positive definite) raises ``ValueError``. ``per_token`` and ``per_module`` columns are divided
        by the whole example's terms, so they still sum to the normalised scores. The train terms are taken from
        the same capture as each chunk's scores where the scorer can (the generic scorer: one gradient pass and
        one ``[b, d]`` block solve per chunk; a Kronecker closure with ``model=``: its per-layer self terms, from the
        same capture), computed per chunk by the rank that scores it; under ``torchrun`` a
        closure whose solve is collective (CG, LiSSA, a custom callable) first computes every chunk's terms in a
        pass of its own, every rank taking part. CG and LiSSA run one iterative solve per training example for
        them (a :class:`ifunc.CostWarning` says so), as :func:`self_influence` does. From a gradient index,
        ``"relatif"`` needs ``ihvp = ifunc.ihvp_projected(index)`` (the rows' own ``r_iᵀ (F̃ + λI)^{-1} r_i``); a
        parameter-space closure with an index cannot normalise (``NotImplementedError``). A score store records
        the normalisation and refuses to resume under another; top-k sinks rank the normalised scores.

    How a chunk is scored is the closure's: ``ihvp.scorer(loss, params, options)``. A Kronecker-family closure
    built with ``model=`` (``ihvp_ekfac``, ``ihvp_kfac``, ``ihvp_diagonal``, ``ihvp_identity``) preconditions the
    queries per layer and contracts them with captured layer inputs / output-gradients of the training
    examples (``Σ_t g_tᵀ Q̃ a_t``), with no per-example gradient of the whole model; the result is the same as
    the generic scorer's.

    Memory: the query gradients ``[n_query, d]``, one chunk of training gradients and the output (with
    ``normalize``, the chunk's solved gradients too: chunks are cut to fit both); the
    training data streams (any DataLoader), so with ``out=`` peak memory does not grow with ``n_train``.

    Under ``torchrun`` (a default process group), train chunk ``i`` is scored on rank ``i mod W`` and every
    rank returns the full matrix; with ``out=`` each rank writes a resumable ``out.rank{r}of{W}`` that rank 0
    merges into ``out``. Every rank passes the same data (see ``ifunc.distributed``).

    ``train`` and ``query`` are read in order: a shuffling DataLoader is refused (its columns would be in a
    random order).

    Half-precision models (``torch.bfloat16``, ``torch.float16`` parameters) run their forward and backward passes in
    their own dtype; everything summed or solved (curvature statistics, the solve, the contraction unless ``dtype=``
    asks for less) runs in float32, and the scores come back in float32.

    Returns:
      ``[n_query, n_train]`` tensor in ``dtype`` (default the closure's: the parameters' dtype, float32 for
      half-precision parameters; ``[n_query, n_train, T]`` with ``per_token``); with ``out=`` the path of the
      finished store.

    Raises:
      ValueError: an unknown ``normalize``, a negative self term under ``normalize``, and the bad inputs named
        above (shapes, a shuffling loader, a store of another run).
      NotImplementedError: combinations not supported yet (``per_token`` with ``out=`` or ``torchrun``;
        ``normalize`` from a gradient index without ``ihvp_projected``'s closure).

    Example:
      >>> scores = ifunc.attribute(loss, params, ihvp, (x_tr, y_tr), (x_te, y_te))
      >>> scores.topk(5, dim=1).indices     # most helpful training examples per query
      >>> cos = ifunc.attribute(loss, params, ihvp, (x_tr, y_tr), (x_te, y_te), normalize="cosine")
    """
    check_score_dtype(dtype)
    how = check_normalize(normalize)
    if token_mask is not None and not per_token:
        raise ValueError("token_mask= applies to per-token scores; pass per_token=True")
    if per_token and (per_module or out is not None or distributed.active()):
        raise NotImplementedError(
            "per_token=True cannot be combined with per_module=True, out= or "
            "torch.distributed yet; compute per-token scores for a slice of the train set"
        )
    if out is not None and per_module:
        raise NotImplementedError("per_module=True cannot be written to a score store yet; drop out= or per_module")
    if sink is not None and out is not None:
        raise ValueError("pass either out= (a score store) or sink=, not both")
    if identity is not None and out is None:
        raise ValueError("identity= names what defines the scores of a score store; it needs out=")
    chunk_size = check_chunk_size(chunk_size)  # None, or a positive int
    _refuse_index_path(train)
    if isinstance(query, GradientIndex):
        raise TypeError(
            f"query is the gradient index {query.path}: an index holds training gradients, so it goes where the "
            "training data goes: attribute(loss, params, ihvp, index, query)"
        )
    queries = DataSource(query, name="query", ordered=True)
    options = ScoreOptions(measurement, max_memory, dtype, query_rank, per_module, per_token, token_mask)
    scorer = scorer_for(ihvp, loss, params, options)  # refuses options the closure cannot score
    query_terms = None  # for normalize="cosine" when the scorer gives no query terms of its own
    if isinstance(train, GradientIndex):  # the index stands where the training data stood: no gradient pass
        if query_rank is not None or per_module or per_token:
            raise NotImplementedError("a gradient index scores whole queries: drop query_rank=, per_module, per_token")
        if how is not None:
            _check_index_normalize(how, scorer)
        check_index_params(train, params)
        source, scorer = index_source(train), IndexScorer(scorer, train, params)
        if how == "cosine" and not callable(getattr(scorer, "query_terms", None)):
            raise NotImplementedError(
                "normalize='cosine' from a gradient index needs the queries' own p_qᵀ (F̃ + λI)^{-1} p_q in the "
                "index's projected space, which the index scorer does not give yet; use normalize='relatif' (the "
                "rows' self terms only), or pass the training data instead of the index (any closure)"
            )
    else:
        source = DataSource(train, name="train", ordered=True)
        query_terms = _query_terms(ihvp, measurement or loss, params, max_memory)
    if how is not None:
        scorer = Normalized(scorer, how, tokens=per_token, query_terms=query_terms)
        _note_cost(scorer.inner, ihvp, source, f"attribute(normalize={how!r})", " (the self terms it divides by)")
    check_same_data(source, params)  # every rank: all the data, the same params (no-op without a process group)
    if sink is None:
        meta, resume = None, {}
        if out is not None:  # before any work: an unidentifiable loss is refused at once
            meta, resume = store_meta(loss, params, ihvp, queries, measurement, query_rank, dtype, identity, how)
        sink = default_sink(out, tokens=per_token, meta=meta, overwrite=overwrite, resume=resume)
    chunk_size = chunk_size or sink.chunk_size()  # a resumed store's own: the default follows free memory
    n_query = scorer.prepare(queries, chunk_size)
    chunk = agreed_chunk(chunk_size, lambda: scorer.chunk_size(source, pairs=True))
    if isinstance(scorer, Normalized) and scorer.needs_terms_pass():
        scorer.terms_pass(source, chunk, progress=progress)
    desc = "ifunc per-token scores" if per_token else "ifunc scores"
    compute = scorer.chunk if dtype is None else lambda batch, offset: scorer.chunk(batch, offset).to(dtype)
    return run_chunks(source, chunk, rank_partition(), compute, sink, n_query=n_query, desc=desc, progress=progress)


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
    chunks through the closure's scorer: the generic one solves each chunk of gradients as one ``[c, d]``
    block, the Kronecker family contracts per layer. ``progress`` as in :func:`attribute`. ``per_module=True``
    (Kronecker family only) returns ``[n_modules, n_train]``, one row per block of ``ihvp.info["modules"]``,
    summing to the total. Under ``torchrun`` a scorer whose solve is collective (the generic one with CG, LiSSA
    or a custom callable) runs every chunk on every rank with its examples split over the ranks; other scorers
    (the Kronecker family, the generic one with a factorised closure) run chunk ``i`` on one rank and the terms
    are all-gathered.

    Cost: a closure with a cheap per-example quadratic form answers in about one gradient pass: a Kronecker
    closure built with ``model=`` (per layer, no solve), a factorised one (``ihvp_explicit``, ``ihvp_arnoldi``,
    ``ihvp_nystrom``, ``ihvp_datainf``: one ``[c, d]`` product with what it holds per chunk) or a gradient index
    with ``ihvp_projected``. CG and LiSSA have none: they run one iterative solve per training example (a block
    of ``c`` right-hand sides per chunk, each step a pass of curvature products over their data; e.g. minutes for
    a few thousand parameters and examples), and the call first emits one :class:`ifunc.CostWarning` naming the
    number of solves and these fast ways.

    ``train`` may be a gradient index (:func:`ifunc.open_index`) with the closure of its projected space,
    ``ifunc.ihvp_projected(index)``: then ``s[i] = r_iᵀ (F̃ + λI)^{-1} r_i`` from the stored rows ``r_i`` alone, read
    chunk by chunk (no training example is read). A parameter-space closure cannot score an index's self-influence
    (it would need the full training gradients): ``NotImplementedError``.

    Args:
      loss, params, ihvp, train: as in :func:`attribute`.
      chunk_size, max_memory, progress: as in :func:`attribute`.
      per_module: Kronecker family only: one row per block of the closure.

    Returns:
      ``[n_train]`` (``[n_modules, n_train]`` with ``per_module``) in the closure's dtype (the parameters', float32
      for half-precision parameters).

    Raises:
      NotImplementedError: a gradient index with a parameter-space closure, or with ``per_module``.

    Warns:
      ifunc.CostWarning: the closure runs one iterative solve per training example (CG, LiSSA).

    Example:
      >>> surprise = ifunc.self_influence(loss, params, ihvp, (x_tr, y_tr))
      >>> surprise.topk(10).indices        # the most self-influential (often mislabelled) examples
    """
    chunk_size = check_chunk_size(chunk_size)  # None, or a positive int
    _refuse_index_path(train)
    if isinstance(train, GradientIndex):  # the stored rows stand where the training gradients stood
        if per_module:
            raise NotImplementedError("self-influence from a gradient index is per example only: drop per_module")
        check_index_params(train, params)
        source = index_source(train)
        check_same_data(source, params)
        inner = scorer_for(ihvp, loss, params, ScoreOptions(max_memory=max_memory))
        scorer = IndexScorer(inner, train, params, self_influence=True)  # refuses a parameter-space closure
    else:
        source = DataSource(train, name="train", ordered=True)
        check_same_data(source, params)
        scorer = scorer_for(ihvp, loss, params, ScoreOptions(max_memory=max_memory, per_module=per_module))
        _note_cost(scorer, ihvp, source, "self_influence", "")
    chunk = agreed_chunk(chunk_size, lambda: scorer.chunk_size(source, pairs=False))
    partition = Partition() if scorer.splits_examples else rank_partition()
    sink = GatherSink() if distributed.active() else MemorySink()
    s = run_chunks(
        source, chunk, partition, scorer.self_terms, sink, n_query=0, desc="ifunc self-influence", progress=progress
    )
    return s if per_module else s[0]


def _refuse_index_path(train) -> None:
    """TypeError when ``train`` is a file path (an index's, most likely): the data or the opened index goes there."""
    if isinstance(train, (str, os.PathLike)):
        raise TypeError(
            f"train is the path {str(train)!r}; a gradient index goes in as its handle, ifunc.open_index(path) (or "
            "what ifunc.build_index returned), and training data as batches, a Dataset or a DataLoader"
        )


def _check_index_normalize(how: str, scorer) -> None:
    """NotImplementedError unless the index's training self terms exist: the closure of its projected space."""
    if not isinstance(scorer, ProjectedScorer):
        raise NotImplementedError(
            f"normalize={how!r} from a gradient index divides by the rows' self terms, which a parameter-space "
            "closure cannot give from the index (it would need (H + λI)^{-1} of every full training gradient); use "
            "the index's own curvature, ihvp = ifunc.ihvp_projected(index), or pass the training data instead of "
            "the index (any closure)"
        )


def _query_terms(ihvp, func, params, max_memory) -> Callable[[DataSource, int | None], torch.Tensor]:
    """``(query, chunk_size) -> [n_query]``: the queries' ``∇f(z_q)ᵀ (H + λI)^{-1} ∇f(z_q)`` as the closure's own
    self terms of ``func`` on the query data (for a scorer without ``query_terms()``: a capture of the queries)."""

    def terms(query: DataSource, chunk_size: int | None) -> torch.Tensor:
        scorer = scorer_for(ihvp, func, params, ScoreOptions(max_memory=max_memory))
        step = agreed_chunk(chunk_size, lambda: scorer.chunk_size(query, pairs=False))
        return torch.cat([scorer.self_terms(c.batch, c.offset).sum(dim=0) for c in iter_chunks(query, step)])

    return terms


def _note_cost(scorer, ihvp, source: DataSource, who: str, why: str) -> None:
    """One :class:`CostWarning` (rank 0) when ``scorer`` runs an iterative solve per training example."""
    if getattr(scorer, "iterative", False) is not True or distributed.world()[0] != 0:
        return
    n = source.cheap_count()
    count = "one iterative solve per training example" if n is None else f"{n} iterative solves, one per example"
    warnings.warn(
        f"{who} solves (H + λI)^{{-1}} g_i for every training example{why}, and this {getattr(ihvp, 'name', '')} "
        f"closure has no cheap per-example quadratic form: the call runs {count}, each many curvature products "
        "over the closure's data. Fast ways: a Kronecker closure built with model= (ifunc.ihvp_ekfac(loss, params, "
        "data, model=model)), a factorised one (ifunc.ihvp_arnoldi, ifunc.ihvp_nystrom), or a gradient index with "
        "its own curvature (index = ifunc.build_index(...), ifunc.ihvp_projected(index), the index as train)",
        CostWarning,
        stacklevel=3,
    )
