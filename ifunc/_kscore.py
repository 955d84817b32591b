"""Fast scoring for Kronecker-family closures, used by :func:`ifunc.attribute` and :func:`ifunc.self_influence`.

Queries are preconditioned once per layer, ``Q̃_l = (G_l + λ)^{-1} ∇_{W_l} f``; a training example's
contribution is then ``Σ_t g_tᵀ Q̃_l a_t`` from captured inputs ``a`` and output-gradients ``g`` — no
per-example gradient of the whole model. The queries stay in the layer's eigenbasis
(``R̃ = (Q_Sᵀ ∇_W f Q_A) / (Λ + λ)``) and the training ``g, a`` are rotated instead (``g̃ = Q_Sᵀ g``,
``ã = Q_Aᵀ a``, so ``gᵀ Q̃ a = g̃ᵀ R̃ ã``). Per layer and train chunk the cheaper of three contractions is
chosen by a flop count:

* direct, full rank (``T = 1``): ``((Q̃ a) ⊙ g)`` summed — ``q·b·out·in``;
* direct, rank ``r`` (``query_rank=r``; ``Q̃ ≈ Σ_r σ u vᵀ``): ``Σ_{t,r} σ (g_tᵀu)(vᵀa_t)`` —
  ``q·b·T·r·(out+in)``;
* per-example gradient: ``DW = Σ_t g_t a_tᵀ`` then one matmul — ``b·T·out·in + q·b·out·in``.

Parameters outside the Kronecker layers (diagonal blocks) use ``vmap(grad)`` per-example gradients of
those parameters only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._data import DataSource, batch_size
from ._types import Data, LossFn, Measurement, Params
from .capture import layer_capture, requiring_grad
from .ihvp.kfactors import fallback_grads, one_thread
from .ihvp.kronecker import KronBlock, KroneckerState

__all__ = ["kronecker_state", "kronecker_prepare", "kronecker_chunk_scores", "kronecker_self_influence",
           "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 256


def kronecker_state(ihvp) -> KroneckerState | None:
    """The fast-scoring state of a Kronecker-family closure built with ``model=``, else None."""
    info = getattr(ihvp, "info", None)
    state = info.get("kronecker") if isinstance(info, dict) else None
    return state if isinstance(state, KroneckerState) and state.model is not None else None


def _low_rank(Qt: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2):
    """Per query, rank-``r`` factors of ``Q̃ [q, out, in]``: ``(U σ [q, out, r], V [q, r, in])``.

    Exact truncated SVD when ``r + oversample >= min(out, in)``; otherwise a randomized range finder
    (Halko et al. 2011) with ``power_iters`` subspace iterations and a fixed internal seed (deterministic,
    the global RNG untouched), ``O(q·out·in·(r + oversample))`` instead of a full SVD per query.
    """
    q, o, i = Qt.shape
    r = min(rank, o, i)
    k = r + oversample
    with one_thread():
        if k >= min(o, i):
            U, s, Vh = torch.linalg.svd(Qt, full_matrices=False)
            return U[..., :r] * s[:, None, :r], Vh[:, :r]
        gen = torch.Generator(device=Qt.device).manual_seed(0)
        omega = torch.randn(i, k, generator=gen, dtype=Qt.dtype, device=Qt.device)
        Y = torch.linalg.qr(Qt @ omega).Q  # [q, o, k]
        for _ in range(power_iters):
            Z = torch.linalg.qr(Qt.transpose(1, 2) @ Y).Q  # [q, i, k]
            Y = torch.linalg.qr(Qt @ Z).Q
        B = Y.transpose(1, 2) @ Qt  # [q, k, i]
        Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
        U = Y @ Ub[..., :r]
    return U * s[:, None, :r], Vh[:, :r]


def _layer_scores(Qt, lr, a, g) -> torch.Tensor:
    """``scores[q, b] = Σ_t g_{b,t}ᵀ Q̃_q a_{b,t}`` choosing the cheapest contraction."""
    q, o, i = Qt.shape
    b, T = a.shape[0], a.shape[1]
    cost_perex = b * T * o * i + q * b * o * i
    if lr is not None:
        U, V = lr
        r = U.shape[-1]
        if q * b * T * r * (o + i) < cost_perex:
            gu = torch.einsum("bto,qor->qbtr", g, U)
            av = torch.einsum("bti,qri->qbtr", a, V)
            return (gu * av).sum(dim=(2, 3))
    elif T == 1:
        Qa = (Qt.reshape(q * o, i) @ a[:, 0].T).reshape(q, o, b)
        return (Qa * g[:, 0].T.unsqueeze(0)).sum(dim=1)
    DW = torch.einsum("bto,bti->boi", g, a).reshape(b, o * i)
    return Qt.reshape(q, o * i) @ DW.T


def capture_chunk(loss, params, state: KroneckerState, batch):
    """For one train batch: ``({module: (a, g)}, {param: per-example grads})`` of the training loss."""
    layers = [blk.spec for blk in state.blocks]
    fb_names = [d.name for d in state.diags]
    p = requiring_grad(params)
    with layer_capture(state.model, layers) as rec, torch.enable_grad():
        value = loss(p, batch)
    rec.check()
    gs = rec.output_grads(value, retain_graph=False)
    ag = {s.name: (rec.activations(s, gs[s.name].dtype), gs[s.name]) for s in layers}
    fb = fallback_grads(loss, params, batch, fb_names) if fb_names else {}
    return ag, fb


def _train_chunks(loss, params, state: KroneckerState, train: Data, chunk_size):
    for batch in DataSource(train, name="train").chunks(chunk_size or DEFAULT_CHUNK):
        yield capture_chunk(loss, params, state, batch)


def _check(G: torch.Tensor, what: str, offset: int = 0):
    bad = ~torch.isfinite(G.reshape(G.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"non-finite gradient for example {offset + int(bad.nonzero()[0])} of {what}; check "
                         "that example's inputs")


class Prepared(NamedTuple):
    """Preconditioned queries: diagonal-block columns ``[q, Σ sizes]`` and, per layer, ``R̃`` in its eigenbasis."""

    diag: torch.Tensor  #: ``[q, Σ_diag numel]`` preconditioned query columns of the diagonal blocks
    layers: dict  #: module -> ``(R̃ [q, out, in(+1)], low-rank factors or None)``


def kronecker_prepare(loss: LossFn, params: Params, ihvp, query: Data, *,
                      measurement: Measurement | None = None, chunk_size: int | None = None,
                      max_memory: int | None = None, query_rank: int | None = None) -> Prepared:
    """Query gradients preconditioned once per layer, kept in the layer's eigenbasis.

    ``R̃_q = (Q_Sᵀ ∇_W f(z_q) Q_A) / (Λ + λ)``, so that ``g_tᵀ Q̃_q a_t = (Q_Sᵀ g_t)ᵀ R̃_q (Q_Aᵀ a_t)``: the
    rotation back to parameter space is never formed (training inputs are rotated instead, which costs
    ``b·T·(out² + in²)`` rather than ``q·(out² in + out in²)``). Query gradients are captured layer by layer
    like the training ones (``∇_W f = Σ_t g_t a_tᵀ``), so the flat ``[q, d]`` gradient is never formed;
    ``measurement`` must, like the loss, be a sum over examples that do not interact.
    """
    state = kronecker_state(ihvp)
    if query_rank is not None and (not isinstance(query_rank, int) or query_rank < 1):
        raise ValueError(f"query_rank must be a positive int or None, got {query_rank!r}")
    func = measurement or loss
    parts: dict[str, list] = {blk.spec.name: [] for blk in state.blocks}
    cols: list[list] = [[] for _ in state.diags]
    seen = 0
    for batch in DataSource(query, name="query").chunks(chunk_size or DEFAULT_CHUNK):
        ag, fb = capture_chunk(func, params, state, batch)  # query gradients of f, layer by layer
        with torch.no_grad():
            for blk, lam in zip(state.blocks, state.block_damping):
                a, g = ag[blk.spec.name]
                _check(g, "query", seen)
                if blk.Q_S is not None:
                    g, a = g @ blk.Q_S, a @ blk.Q_A
                parts[blk.spec.name].append(torch.einsum("bto,bti->boi", g, a) / (blk.lam + lam))
            for j, (d, lam) in enumerate(zip(state.diags, state.diag_damping)):
                G = fb[d.name].reshape(fb[d.name].shape[0], -1)
                _check(G, "query", seen)
                cols[j].append(G / (d.diag + lam))
            seen += batch_size(batch)
    with torch.no_grad():
        layers = {}
        for name, chunks in parts.items():
            R = torch.cat(chunks)
            lr = _low_rank(R, query_rank) if query_rank is not None else None
            layers[name] = (lr[0] @ lr[1] if lr is not None else R, lr)
        n_q = next(iter(layers.values()))[0].shape[0] if layers else sum(c.shape[0] for c in cols[0])
        diag = torch.cat([torch.cat(c) for c in cols], dim=1) if cols else \
            ihvp._like.new_zeros(n_q, 0)
    return Prepared(diag, layers)


def kronecker_chunk_scores(loss: LossFn, params: Params, ihvp, prepared: Prepared, batch, *,
                           per_module: bool = False, offset: int = 0) -> torch.Tensor:
    """Scores of one train batch: ``[n_modules or 1, n_query, b]``; ``offset`` = index of its first example."""
    state = kronecker_state(ihvp)
    ag, fb = capture_chunk(loss, params, state, batch)
    group = {m: j for j, m in enumerate(state.modules)}
    with torch.no_grad():
        b = next(iter(ag.values()))[0].shape[0] if ag else next(iter(fb.values())).shape[0]
        out = prepared.diag.new_zeros(len(state.modules) if per_module else 1, prepared.diag.shape[0], b)
        for blk in state.blocks:
            a, g = ag[blk.spec.name]
            _check(g, "train", offset)
            if blk.Q_S is not None:
                g, a = g @ blk.Q_S, a @ blk.Q_A
            out[group[blk.spec.name] if per_module else 0] += _layer_scores(*prepared.layers[blk.spec.name], a, g)
        start = 0
        for d in state.diags:
            G = fb[d.name].reshape(b, -1)
            _check(G, "train", offset)
            stop = start + G.shape[1]
            out[group[d.group] if per_module else 0] += prepared.diag[:, start:stop] @ G.T
            start = stop
    return out


def kronecker_self_influence(loss: LossFn, params: Params, ihvp, train: Data, *,
                             chunk_size: int | None = None, per_module: bool = False) -> torch.Tensor:
    """``s[i] = Σ_l Σ (Q_Sᵀ DW_i Q_A)² / (Λ + λ)`` (+ diagonal blocks), ``[n_train]`` or ``[n_modules, n_train]``."""
    state = kronecker_state(ihvp)
    group = {m: j for j, m in enumerate(state.modules)}
    out = []
    for ag, fb in _train_chunks(loss, params, state, train, chunk_size):
        with torch.no_grad():
            b = next(iter(ag.values()))[0].shape[0] if ag else next(iter(fb.values())).shape[0]
            s = ihvp._like.new_zeros(len(state.modules), b)
            for blk, lam in zip(state.blocks, state.block_damping):
                a, g = ag[blk.spec.name]
                s[group[blk.spec.name]] += _per_example_quadratic(blk, a, g, lam)
            for d, lam in zip(state.diags, state.diag_damping):
                G = fb[d.name].reshape(b, -1)
                s[group[d.group]] += (G * G / (d.diag + lam)).sum(dim=1)
        out.append(s)
    s = torch.cat(out, dim=1)
    return s if per_module else s.sum(dim=0)


def _per_example_quadratic(blk: KronBlock, a, g, lam: float) -> torch.Tensor:
    """``Σ (Q_Sᵀ DW_i Q_A)² / (Λ + λ)`` for every example of the chunk, ``[b]``."""
    if blk.Q_S is not None:
        g, a = g @ blk.Q_S, a @ blk.Q_A
    inv = 1.0 / (blk.lam + lam)
    if a.shape[1] == 1:  # (g̃ ⊗ ã)² weighted: (g̃²) inv (ã²)ᵀ, one matmul
        return ((g[:, 0] ** 2) @ inv * (a[:, 0] ** 2)).sum(dim=1)
    R = torch.einsum("bto,bti->boi", g, a)
    return (R * R * inv).sum(dim=(1, 2))
