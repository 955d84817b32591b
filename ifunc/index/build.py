"""Building a gradient index: every training gradient projected once, written chunk by chunk to a score store.

:func:`build_index` is the one scoring loop (:func:`ifunc._score_loop.run_chunks`) with a "scorer" that returns the
projected per-example gradients ``[dim, b]`` of a chunk and the default sinks of :func:`ifunc.attribute`'s ``out=``:
a resumable HDF5 score store (:mod:`ifunc.store`) with ``dim`` rows and one column per training example, per-chunk
fingerprints of the training data and checksums of the columns, resumed after a crash without recomputing a
finished chunk, written per rank and merged by rank 0 under ``torchrun``. With ``model=`` a chunk is one captured
forward/backward: each Kronecker layer's inputs ``a`` and output gradients ``g`` are projected as
``Σ_t (P_o g_t)(P_a a_t)ᵀ`` (no per-example gradient of the layer is formed) and the other parameters'
per-example gradients by the dense sign hash; without a model, the per-example gradients of every parameter
(``vmap(grad)``) by the sign hash. The projection's matrices and codes are drawn once per build
(:func:`~ifunc.index.projection.hold_draws`), not once per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import optree
import torch

from .._batches import batch_size
from .._chunks import check_chunk_size
from .._data import DataSource, params_fingerprint
from .._identity import run_identity
from .._score_loop import agreed_chunk, run_chunks
from .._sinks import default_sink
from .._types import Data, LossFn, Params
from .._version import __version__
from ..functional import structure
from ..grads import chunk_size_for, iter_per_sample_grads
from ..ihvp import check_same_data, ihvp_identity, rank_partition, solve_dtype
from ..ihvp.kronecker.budget import capture_chunk_size
from ..ihvp.kronecker.fit import split_excluded
from ..ihvp.kronecker.score import capture_chunk
from .handle import INDEX_KIND, GradientIndex, open_index, projection_digest
from .projection import Projection, hold_draws, make_projection, project_captured, project_flat

HELD_BYTES = 2**28  #: most bytes of dense sign-hash codes a build holds (8 per coordinate); the rest drawn per chunk
CACHED_BYTES = 2**26  #: most bytes of draws a query cache keeps between calls (larger ones are drawn per call)

__all__ = ["build_index", "query_projector"]


class _Plan(NamedTuple):
    """The projection, and the Kronecker closure whose layers a chunk's capture records (None without a model)."""

    projection: Projection
    closure: Any


def _plan(params: Params, model, modules, exclude: Sequence[str], **sizes) -> _Plan:
    """The projection of ``params`` (excluded ones left out) and, with ``model``, the closure that captures it."""
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if exclude and not isinstance(params, dict):
        raise TypeError("build_index: exclude= names entries of a dict of parameters; params is not a dict")
    excluded = split_excluded(params, exclude)[1] if exclude else ()  # module prefixes -> parameter names
    if model is None:
        if modules is not None:
            raise ValueError("build_index: modules= chooses layers of model=; pass model= too, or drop modules=")
        return _Plan(make_projection(params, (), exclude=excluded, **sizes), None)
    if not isinstance(params, dict):
        raise TypeError("build_index: with model= params must be the dict of ifunc.params_of(model)")
    closure: Any = ihvp_identity(params, model=model, modules=modules, exclude=exclude)  # a KroneckerIHVP
    specs = [blk.spec for blk in closure.blocks]
    return _Plan(make_projection(params, specs, exclude=excluded, **sizes), closure)


def query_projector(
    loss: LossFn, params: Params, projection: Projection, model, *, cache: dict | None = None
) -> Callable[[Any, int], torch.Tensor]:
    """``compute(batch, offset) -> [dim, b]``: ``P ∇ loss`` per example of a query batch, as the index's rows were made.

    The layers of ``projection`` are captured in ``model`` (``Σ_t (P_o g_t)(P_a a_t)ᵀ``, no per-example gradient of a
    layer is formed) and the other parameters go through the dense sign hash, exactly as :func:`build_index`
    projects a training example; ``loss`` may be a measurement (a sum over the batch's examples).

    ``cache``: a dict kept by the caller across calls (:func:`~ifunc.index.curvature.ihvp_projected`'s closure keeps
    one): the capture of ``model``'s layers, checked against the projection once, with its probe of each callable
    (example dims, weight uses; see :mod:`ifunc.ihvp.kronecker.capture`), and the drawn matrices per dtype and device.
    A later query with the same callable then costs one captured forward/backward of its batch. Nothing in it
    depends on the parameters' values.

    Raises:
      ValueError: ``model`` does not hold the projection's layers (names, shapes, tracked bias) or parameters.
    """
    if not isinstance(params, dict):
        raise TypeError("with model= params must be the dict of ifunc.params_of(model)")
    cache = {} if cache is None else cache
    if not projection.layers:
        return _projector(loss, params, _Plan(projection, None), name="query", cache=cache)
    if "capture" not in cache:
        closure: Any = ihvp_identity(
            params, model=model, modules=[L.name for L in projection.layers], exclude=list(projection.excluded)
        )
        found = [(s.name, s.weight, s.bias, s.out_features, s.in_features) for s in (b.spec for b in closure.blocks)]
        want = [(L.name, L.weight, L.bias, L.out_features, L.in_features) for L in projection.layers]
        dense = {d.name for d in closure.diags}
        if found != want or dense != {name for name, _ in projection.dense}:
            raise ValueError(
                f"model= does not hold the index's layers and parameters (index: layers {want}, dense "
                f"{sorted(name for name, _ in projection.dense)}; this model: layers {found}, dense {sorted(dense)}): "
                "pass the model the index was built with"
            )
        cache["capture"] = closure
    return _projector(loss, params, _Plan(projection, cache["capture"]), name="query", cache=cache)


def _bytes(draw) -> int:
    parts = draw if isinstance(draw, tuple) else (draw,)
    return sum(t.numel() * t.element_size() for t in parts)


def _projector(
    loss: LossFn, params: Params, plan: _Plan, *, name: str = "train", cache: dict | None = None
) -> Callable[[Any, int], torch.Tensor]:
    """``compute(batch, offset) -> [dim, b]``: the projected gradients of a chunk's examples, one per column.

    The gradients (captured ``a, g`` or per-example) are projected in the parameters' dtype, at least float32.

    The projection's draws are held for the projector's life, or in ``cache`` (per dtype and device) across calls
    when they take at most ``CACHED_BYTES``.
    """
    P = plan.projection
    first = optree.tree_leaves(params, namespace="ifunc")[0]
    work = solve_dtype(first.dtype)  # a half-precision model's gradients are projected in float32
    key = ("draws", work, str(first.device))
    held = None if cache is None else cache.get(key)
    if held is None:
        held = hold_draws(P, dtype=work, device=first.device, max_bytes=HELD_BYTES)
        if cache is not None and sum(_bytes(v) for v in held.values()) <= CACHED_BYTES:
            cache[key] = held

    def captured(batch, offset: int) -> torch.Tensor:
        layers, dense = capture_chunk(loss, params, plan.closure, batch, name=name, offset=offset)
        with torch.no_grad():
            return project_captured(P, layers, dense, held=held).T

    def per_example(batch, offset: int) -> torch.Tensor:
        b = batch_size(batch)
        (G,) = iter_per_sample_grads(loss, params, batch, chunk_size=b, name=name, offset=offset)  # [b, d]
        with torch.no_grad():
            return project_flat(P, G.to(work), params, held=held).T

    return per_example if plan.closure is None else captured


def _default_chunk(loss, params, plan: _Plan, source: DataSource, max_memory: int | None) -> Callable[[], int]:
    """The default examples per chunk: the Kronecker capture's budget, or that of ``vmap(grad)``."""
    P, closure = plan.projection, plan.closure
    dense = sum(numel for _, numel in P.dense)
    # the dense sign hash: codes held for the build (int64), plus one block drawn per chunk beyond those
    fixed = 8 * (min(dense, HELD_BYTES // 8) + (min(P.block, dense) if 8 * dense > HELD_BYTES else 0))
    fixed = fixed if 0 < P.k_dense < dense else 0
    if closure is None or not P.layers:
        return lambda: chunk_size_for(loss, params, source, max_memory=max_memory, name="train", fixed=fixed)
    itemsize = optree.tree_leaves(params, namespace="ifunc")[0].element_size()
    diag = dense
    widest = max(L.k_o + L.k_a for L in P.layers)

    def extra(T: int) -> int:  # the projected rows, the diagonal gradients and their 2k sums, one layer's a, g
        return itemsize * (P.dim + 2 * P.k_dense + diag + T * widest)

    return lambda: capture_chunk_size(
        loss,
        params,
        closure.model,
        [blk.spec for blk in closure.blocks],
        source,
        max_memory=max_memory,
        what="gradient index",
        extra_per_example=extra,
        fixed=fixed,
    )


def build_index(
    loss: LossFn,
    params: Params,
    train: Data,
    out,
    *,
    model: torch.nn.Module | None = None,
    modules=None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    layer_size: int | tuple[int, int] = 16,
    dense_size: int = 256,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    overwrite: bool = False,
    identity: str | None = None,
    progress: bool | None = None,
) -> GradientIndex:
    """Project every training gradient once and store it: the gradient index of ``train`` at ``params``.

    Row ``i`` of the index is ``P(∇ℓ(z_i))``, the random projection (:mod:`ifunc.index.projection`, fixed by
    ``seed`` and the sizes) of example ``i``'s gradient: per Kronecker layer ``vec(P_o G_i P_aᵀ)`` (``k_o·k_a``
    values, row-major, ``G_i = Σ_t g_t a_tᵀ`` never formed), layers in order, then the sign hash ``S [k_dense,
    d_rest]`` applied to the other parameters' gradients. Inner products are preserved in expectation,
    ``E⟨P(x), P(y)⟩ = ⟨x, y⟩``, so a later query needs one product ``[q, dim] × [dim, n]`` instead of a pass over
    the training data.

    Stored (an :func:`ifunc.attribute`-style score store, read with :func:`ifunc.index.open_index`): ``scores
    [dim, n]`` float32 (column ``i`` = row ``i`` of the index, examples in data order), written in chunks of
    ``chunk_size`` examples, each with the fingerprint of its training data and a CRC-32; metadata ``kind =
    "gradient index"``, the projection's description (seed, layers and sizes, dense parameters), the excluded
    parameters, a fingerprint of the parameters and content hashes of the loss and the model (or ``identity``).
    A rerun of the same call resumes at the first unfinished chunk (never recomputing a finished one; the default
    chunk size adopts the file's); a rerun with another seed, sizes, parameters, loss, model or layers, or with
    other training data in a finished chunk, is refused and the file left untouched (``overwrite=True`` replaces
    it). Under ``torchrun`` chunk ``i`` is computed by rank ``i mod W`` into ``out.rank{r}of{W}``, merged by rank 0.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch's examples.
      params: a dict from :func:`ifunc.params_of` (required with ``model``), or any pytree / flat vector ``[d]``.
      train: batch, list of batches, Dataset or DataLoader (read in order; a shuffling loader is refused).
      out: path of the index file (HDF5).
      model: the module ``loss`` calls: its supported layers (``modules=`` chooses them) are projected from captured
        ``a, g``; the other parameters densely. Without it every parameter's per-example gradient is formed by
        ``vmap(grad)`` (``d`` numbers per example in memory, many times slower): pass it when the model has
        ``nn.Linear`` / ``nn.Conv2d`` / ``Conv1D`` layers.
      exclude: parameter or module names left out of the index (no coordinates; recorded).
      seed, layer_size, dense_size: the projection: ``layer_size`` is ``k`` (``(k, k)`` capped at each layer's
        ``(out, in)``) or ``(k_o, k_a)``; ``dense_size`` is ``k_dense``. Each stored example costs ``4·dim`` bytes;
        the build's time hardly depends on the sizes (one capture or ``vmap(grad)`` pass dominates).
      chunk_size, max_memory: examples per chunk, or a byte budget for what a chunk holds (default: the budget of
        :func:`ifunc.attribute`).
      overwrite, identity, progress: as in :func:`ifunc.attribute` with ``out=``.

    Returns:
      The finished index (:class:`~ifunc.index.handle.GradientIndex`), ``n`` rows of ``dim`` coordinates.

    Raises:
      ValueError: the file holds another run's index, another training set, or is not a score store (named; left
        untouched); bad options. TypeError: ``exclude``/``model`` with params that are not a dict.
      UnidentifiableError: the loss or model has no stable identity (pass ``identity=``).

    Example:
      >>> index = ifunc.build_index(loss, params, train, "train.idx.h5", model=model, layer_size=32)
      >>> index.n, index.dim                     # one row per training example
      (50000, 1024)
    """
    if out is None:
        raise ValueError("build_index: out= must be the path of the index file")
    chunk_size = check_chunk_size(chunk_size)
    source = DataSource(train, name="train", ordered=True)
    check_same_data(source, params)  # every rank: all the data, the same params (no-op without a process group)
    plan = _plan(params, model, modules, exclude, seed=seed, layer_size=layer_size, dense_size=dense_size)
    meta = {
        "kind": INDEX_KIND,
        "projection": plan.projection.describe(),
        "projection_sha256": projection_digest(plan.projection),
        "params": params_fingerprint(params),
        "params_dtype": str(structure(params).dtypes[0]),
        "defined_by": run_identity(loss, None, model, identity, tracked=params if isinstance(params, dict) else None),
        "versions": {"ifunc": __version__, "torch": torch.__version__},
    }
    sink = default_sink(out, tokens=False, meta=meta, overwrite=overwrite, resume={})
    chunk_size = chunk_size or sink.chunk_size()  # a resumed index's own: the default follows free memory
    chunk = agreed_chunk(chunk_size, _default_chunk(loss, params, plan, source, max_memory))
    compute = _projector(loss, params, plan)
    run_chunks(
        source,
        chunk,
        rank_partition(),
        compute,
        sink,
        n_query=plan.projection.dim,
        desc="ifunc gradient index",
        progress=progress,
    )
    return open_index(out)
