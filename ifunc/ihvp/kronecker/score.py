"""Pairwise, per-module and self-influence scores of Kronecker-family closures, without per-example gradients.

Used by :class:`~ifunc.ihvp.kronecker.scorer.KroneckerScorer`, the scorer of a :class:`KroneckerIHVP` built with
``model=`` (``ihvp`` below: such a closure).

Queries are preconditioned once per layer, ``Q̃_l = (G_l + λ)^{-1} ∇_{W_l} f``; a training example's
contribution is then ``Σ_t g_tᵀ Q̃_l a_t`` from captured inputs ``a`` and output-gradients ``g`` — no
per-example gradient of the whole model. The queries are preconditioned in the layer's eigenbasis
(``R̃ = (Q_Sᵀ ∇_W f Q_A) / (Λ + λ)``) and rotated back once, ``Q̃ = Q_S R̃ Q_Aᵀ`` (``q·out·in·(out + in)``), so the
training ``g, a`` are used as captured: rotating them instead would cost ``n·T·(out² + in²)`` over the train
data, more than the contraction itself for a language model. Per layer and train chunk the cheaper of three
contractions is chosen by a flop count:

* direct, full rank (``T = 1``): ``((Q̃ a) ⊙ g)`` summed — ``q·b·out·in``;
* direct, rank ``r`` (``query_rank=r``; ``Q̃ ≈ Σ_r σ u vᵀ``): ``Σ_{t,r} σ (g_tᵀu)(vᵀa_t)`` —
  ``q·b·T·r·(out+in)``;
* per-example gradient: ``DW = Σ_t g_t a_tᵀ`` then one matmul — ``b·T·out·in + q·b·out·in``.

An ``nn.Embedding`` layer (one-hot inputs ``a_t = e_{x_t}``) is contracted by gathering the query's columns,
``Σ_t g_tᵀ Q̃[:, x_t]`` (``q·b·T·out``), and its queries, self terms and eigenbasis skip the identity ``Q_A``
(:mod:`ifunc.ihvp.kronecker._onehot`; each layer kind says how, :mod:`ifunc.ihvp.kronecker.layers`).

Parameters outside the Kronecker layers (diagonal blocks) use ``vmap(grad)`` per-example gradients of
those parameters only.

A NaN/inf in a training example's captured ``a`` or ``g`` reaches every one of its scores, so a chunk checks its
``[q, b]`` block (or self terms) once and inspects the captured values, to name the example, only when that block is
not finite (:func:`check_outputs`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._batches import batch_size
from ..._chunks import iter_chunks
from ..._data import as_source
from ..._memory import release_free_memory
from ..._types import Data, LossFn, Measurement, Params
from ...grads import batch_grads, check_finite, check_summed
from ._kernels import damped_div, low_rank
from .blocks import from_eigenbasis
from .budget import capture_chunk_size, check_chunk_size
from .capture import UseCheck, layer_capture, probe_layers, requiring_grad
from .layers import kind_of

__all__ = [
    "capture_chunk",
    "check_outputs",
    "PreparedQueries",
    "kronecker_prepare",
    "kronecker_chunk_scores",
    "kronecker_self_terms",
]


def checked(loss, params, ihvp, batch) -> UseCheck:
    """What :func:`probe_layers` found of ``loss``'s use of the closure's layers, checked once per callable.

    A closure fitted from data holds the fit's check of its loss; any other callable (a measurement, another loss),
    and every callable of a closure built from factors (loaded, or fitted elsewhere) or by :func:`ifunc.ihvp_identity`,
    is checked on the first two examples of ``batch``, the first it captures, and the result kept in the closure (keyed
    by the callable's identity). Example dims found on one example are settled on the first batch of two or more.
    """
    check = ihvp.probe.get(id(loss))
    if check is None or check.func is not loss:
        check = probe_layers(loss, params, ihvp.model, [blk.spec for blk in ihvp.blocks], batch)
        ihvp.probe[id(loss)] = check
    else:
        check.ready(loss, params, ihvp.model, batch)
    return check


def capture_chunk(loss, params, ihvp, batch, *, name: str, offset: int, check: bool = True):
    """For one batch: ``({module: (a, g)}, {param: per-example grads})`` of ``loss``; NaN/inf raise by example.

    Returned in the closure's dtype (a half-precision model's, computed in its own dtype, cast to float32).
    ``check=False`` leaves the captured ``g`` unchecked for a caller that checks what it computes from them instead
    (:func:`check_outputs`); the diagonal blocks' per-example gradients are checked either way.
    """
    use = checked(loss, params, ihvp, batch)
    diag_names = [d.name for d in ihvp.diags]
    inputs_grads = {}
    if use.layers:
        p = requiring_grad(params)
        with layer_capture(ihvp.model, use.layers, examples=batch_size(batch)) as rec, torch.enable_grad():
            value = loss(p, batch)
        rec.check()
        gs = rec.output_grads(value, retain_graph=False, wrt=use.wrt(p))
        if check:
            check_finite(list(gs.values()), name, offset)
        inputs_grads = {s.name: (rec.activations(s, gs[s.name].dtype), gs[s.name]) for s in use.layers}
        use.observe(loss, params, ihvp.model, batch, rec, inputs_grads)  # in the model's dtype, as computed
        kinds = {s.name: kind_of(s) for s in use.layers}
        inputs_grads = {k: (kinds[k].cast(a, ihvp.dtype), g.to(ihvp.dtype)) for k, (a, g) in inputs_grads.items()}
    diag = batch_grads(loss, params, batch, wrt=diag_names, name=name, offset=offset) if diag_names else {}
    return inputs_grads, {k: v.to(ihvp.dtype) for k, v in diag.items()}


class PreparedQueries(NamedTuple):
    """Preconditioned queries: diagonal-block columns ``[q, Σ sizes]`` and, per layer, ``Q̃`` in parameter space."""

    diag: torch.Tensor  #: ``[q, Σ_diag numel]`` preconditioned query columns of the diagonal blocks
    #: module -> ``(Q̃ [q, out, in(+1)], its rank-r factors (U σ [q, out, r], V [q, r, in(+1)]) or None)``
    layers: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]
    #: ``[q]``: each query's own ``∇f(z_q)ᵀ (G + λ)^{-1} ∇f(z_q)`` (exact, also with ``query_rank``)
    terms: torch.Tensor


def kronecker_prepare(
    loss: LossFn,
    params: Params,
    ihvp,
    query: Data,
    *,
    measurement: Measurement | None = None,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    query_rank: int | None = None,
    eigenbasis: bool = False,
) -> PreparedQueries:
    """Query gradients preconditioned once per layer, returned in parameter space (or left in the eigenbasis).

    ``Q̃_q = Q_S [(Q_Sᵀ ∇_W f(z_q) Q_A) / (Λ + λ)] Q_Aᵀ``, so that a training position contributes ``g_tᵀ Q̃_q a_t``
    with its captured ``g_t, a_t`` (rotating the queries back costs ``q·out·in·(out + in)`` once; rotating the
    training inputs instead would cost ``n·T·(out² + in²)``). ``query_rank=r`` truncates each ``Q̃_q`` to its
    best rank-``r`` approximation (computed in the eigenbasis, where it is the same). Query gradients are captured
    layer by layer like the training ones (``∇_W f = Σ_t g_t a_tᵀ``), so the flat ``[q, d]`` gradient is never formed;
    ``measurement`` must, like the loss, be a sum over examples that do not interact. ``eigenbasis=True`` (without
    ``query_rank``) skips the rotation back: each layer's first entry is ``R = (Q_Sᵀ ∇_W f Q_A) / (Λ + λ)``, with
    ``Q̃ = Q_S R Q_Aᵀ`` (for a caller that maps ``Q̃`` on, e.g. projects it, more cheaply through its factors).
    """
    if eigenbasis and query_rank is not None:
        raise ValueError("kronecker_prepare: eigenbasis=True keeps whole queries; drop query_rank")
    if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1):
        raise ValueError(f"query_rank must be a positive int or None, got {query_rank!r}")
    check_chunk_size(chunk_size)
    func = measurement or loss
    parts: dict[str, list] = {blk.spec.name: [] for blk in ihvp.blocks}
    cols: list[list] = [[] for _ in ihvp.diags]
    terms: list[torch.Tensor] = []  # per query chunk, [b]
    queries = as_source(query, name="query", ordered=True)
    what = "loss(params, batch)" if measurement is None else "measurement(params, batch)"  # the callable passed
    check_summed(func, params, queries, what)  # before the probe, whose rows assume it
    layers = checked(func, params, ihvp, queries.head(2)).layers
    step = chunk_size or capture_chunk_size(
        func, params, ihvp.model, layers, queries, max_memory=max_memory, what="Kronecker query gradients"
    )
    for _, offset, batch, _ in iter_chunks(queries, step):
        layer_parts, diag = capture_chunk(func, params, ihvp, batch, name="query", offset=offset)
        with torch.no_grad():
            t = torch.zeros(batch_size(batch), dtype=ihvp.dtype, device=ihvp.device)
            for blk, lam in zip(ihvp.blocks, ihvp.block_damping):
                a, g = layer_parts[blk.spec.name]
                if blk.Q_S is not None:
                    g = g @ blk.Q_S
                if blk.Q_A is not None:
                    a = a @ blk.Q_A
                rotated = kind_of(blk.spec).contract(g, a, blk.spec.columns)
                R = damped_div(rotated, blk.eigenvalues, lam)
                t += (rotated * R).flatten(1).sum(dim=1)
                del rotated
                if query_rank is None and not eigenbasis:  # to parameter space: Q_S R Q_Aᵀ
                    R = from_eigenbasis(blk, R)
                parts[blk.spec.name].append(R)  # (the rank-r truncation is taken in the eigenbasis, below)
                del a, g, R
                release_free_memory()  # this layer's temporaries: what is held grows by one layer's queries only
            for j, (d, lam) in enumerate(zip(ihvp.diags, ihvp.diag_damping)):
                G = diag[d.name].reshape(diag[d.name].shape[0], -1)
                cols[j].append(damped_div(G, d.diag, lam))
                t += (G * cols[j][-1]).sum(dim=1)
            terms.append(t)
    with torch.no_grad():
        layers = {}
        for blk in ihvp.blocks:  # one layer's chunks at a time: the queries are held once, plus one layer
            chunks = parts.pop(blk.spec.name)
            R = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            del chunks
            factors = None
            if query_rank is not None:
                U, V = low_rank(R, query_rank)  # the factors back to parameter space: Q_S U, V Q_Aᵀ
                factors = (U if blk.Q_S is None else blk.Q_S @ U, V if blk.Q_A is None else V @ blk.Q_A.T)
                R = factors[0] @ factors[1]
            layers[blk.spec.name] = (R, factors)
            # the freed chunks sit in the C heap, sized unlike the concatenation: return them layer by layer
            release_free_memory()
        n_q = next(iter(layers.values()))[0].shape[0] if layers else sum(c.shape[0] for c in cols[0])
        diag = (
            torch.cat([torch.cat(c) for c in cols], dim=1)
            if cols
            else torch.zeros(n_q, 0, dtype=ihvp.dtype, device=ihvp.device)
        )
    return PreparedQueries(diag, layers, torch.cat(terms))


def check_outputs(outputs: list[torch.Tensor], layers: dict, offset: int) -> None:
    """Raise naming the first training example whose captured ``a`` or ``g`` has a NaN/inf, when ``outputs`` do.

    One ``isfinite`` over what a chunk's capture produced (its ``[q, b]`` score block, its ``[b]`` self terms) stands
    in for a check of every captured ``g``: each score or term of example ``i`` is a sum of products with every entry
    of its ``a_{i,t}`` and ``g_{i,t}``, and a NaN/inf in a factor makes the product non-finite whatever the other
    factor is (``0·NaN = 0·inf = NaN``), so a non-finite gradient ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` always shows. Only
    then (or for an empty block, which shows nothing) are ``layers`` (``{module: (a, g, ...)}``) inspected, by example.
    Outputs that are non-finite although every captured value is finite are left to the caller: the contraction
    overflowed (:func:`ifunc._score_loop.run_chunks` says so).

    Raises:
      ValueError: ``non-finite gradient for example {offset + i} of train data``, ``i`` the first such example.
    """
    if all(t.numel() and bool(torch.isfinite(t).all()) for t in outputs):
        return
    tensors = [t for parts in layers.values() for t in parts[:2] if t.is_floating_point()]
    check_finite(tensors, "train", offset)


def kronecker_chunk_scores(
    loss: LossFn, params: Params, ihvp, prepared: PreparedQueries, batch, *, per_module: bool = False, offset: int = 0
) -> torch.Tensor:
    """Scores of one train batch: ``[n_modules or 1, n_query, b]``; ``offset`` = index of its first example.

    A NaN/inf in a captured gradient raises by example (checked on the scores, :func:`check_outputs`).
    """
    captured = capture_chunk(loss, params, ihvp, batch, name="train", offset=offset, check=False)
    block = _chunk_scores(ihvp, prepared, batch, captured, per_module)
    check_outputs([block], captured[0], offset)
    return block


def kronecker_chunk_and_self_terms(
    loss: LossFn, params: Params, ihvp, prepared: PreparedQueries, batch, *, per_module: bool = False, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kronecker_chunk_scores(...), kronecker_self_terms(...))`` of one train batch from one capture."""
    captured = capture_chunk(loss, params, ihvp, batch, name="train", offset=offset, check=False)
    block, terms = (
        _chunk_scores(ihvp, prepared, batch, captured, per_module),
        _self_terms(ihvp, batch, captured, per_module),
    )
    check_outputs([block, terms], captured[0], offset)
    return block, terms


def _chunk_scores(ihvp, prepared: PreparedQueries, batch, captured, per_module: bool) -> torch.Tensor:
    """``[n_modules or 1, n_query, b]``: each layer contracted in the prepared queries' dtype (``attribute(dtype=)``),
    the layers summed in at least float32."""
    layer_parts, diag = captured
    group = {m: j for j, m in enumerate(ihvp.modules)}
    dt = prepared.diag.dtype  # of the contraction
    with torch.no_grad():
        b = batch_size(batch)
        shape = (len(ihvp.modules) if per_module else 1, prepared.diag.shape[0], b)
        out = prepared.diag.new_zeros(shape, dtype=torch.promote_types(dt, torch.float32))
        for blk in ihvp.blocks:  # the prepared queries are in parameter space: g, a as captured
            a, g = layer_parts[blk.spec.name]
            kind = kind_of(blk.spec)
            scores = kind.scores(*prepared.layers[blk.spec.name], kind.cast(a, dt), g.to(dt))
            out[group[blk.spec.name] if per_module else 0] += scores
        start = 0
        for d in ihvp.diags:
            G = diag[d.name].reshape(b, -1).to(dt)
            stop = start + G.shape[1]
            out[group[d.group] if per_module else 0] += prepared.diag[:, start:stop] @ G.T
            start = stop
    return out


def kronecker_self_terms(
    loss: LossFn, params: Params, ihvp, batch, *, per_module: bool = False, offset: int = 0
) -> torch.Tensor:
    """``s[i] = Σ_l Σ (Q_Sᵀ DW_i Q_A)² / (Λ + λ)`` (+ diagonal blocks) of one train batch: ``[n_modules or 1, b]``.

    A NaN/inf in a captured gradient raises by example (checked on the terms, :func:`check_outputs`).
    """
    captured = capture_chunk(loss, params, ihvp, batch, name="train", offset=offset, check=False)
    terms = _self_terms(ihvp, batch, captured, per_module)
    check_outputs([terms], captured[0], offset)
    return terms


def _self_terms(ihvp, batch, captured, per_module: bool) -> torch.Tensor:
    layer_parts, diag = captured
    group = {m: j for j, m in enumerate(ihvp.modules)}
    with torch.no_grad():
        b = batch_size(batch)
        s = torch.zeros(len(ihvp.modules), b, dtype=ihvp.dtype, device=ihvp.device)
        for blk, lam in zip(ihvp.blocks, ihvp.block_damping):
            a, g = layer_parts[blk.spec.name]
            s[group[blk.spec.name]] += kind_of(blk.spec).quadratic(blk.eigenvalues, blk.Q_S, blk.Q_A, a, g, lam)
        for d, lam in zip(ihvp.diags, ihvp.diag_damping):
            G = diag[d.name].reshape(b, -1)
            s[group[d.group]] += damped_div(G * G, d.diag, lam).sum(dim=1)
    return s if per_module else s.sum(dim=0, keepdim=True)
