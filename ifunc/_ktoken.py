"""Per-token influence for Kronecker-family closures, used by ``ifunc.attribute(..., per_token=True)``.

For a tracked layer ``l`` applied at positions ``t = 1..T`` of a training sequence, the per-example weight
gradient is ``DW_l = Σ_t g_t a_tᵀ`` (``a_t`` the layer input with a 1 appended for a tracked bias, ``g_t`` the
gradient of the summed loss with respect to the layer output). With the preconditioned query
``Q̃_l = (G_l + λ)^{-1} ∇_{W_l} f`` the pairwise score is linear in ``DW_l``, so it splits exactly over
positions:

``score[q, i] = Σ_l ⟨Q̃_l, DW_l⟩ = Σ_t Σ_l g_{l,t}ᵀ Q̃_l a_{l,t} = Σ_t s[q, i, t]``.

``s[q, i, t]`` is the contribution of the gradient that flows through position ``t`` (its own loss term
and every later term that reads it) — the per-token decomposition of Grosse et al. (2023, §5.3). It is
computed from captured ``a`` and ``g`` in the layer's eigenbasis (``g̃ = Q_Sᵀ g``, ``ã = Q_Aᵀ a``,
``s = g̃ᵀ R̃ ã``); no per-token or per-example gradient is materialised. A module called ``k`` times per
forward (a shared block, a layer reused at several depths) contributes the sum of its ``k`` calls at each
position, so shared modules keep true per-token scores.

Parameters with diagonal blocks (preconditioned query ``q̃ = ∇f / (diag + λ)``) are split over positions
the same way, from hooks on the modules that use them: ``nn.Linear`` / ``Conv1D`` (``g_tᵀ Q̃ a_t`` and
``q̃_bᵀ g_t``), ``nn.Embedding`` (``q̃[x_t] · g_t``; a tied LM head is a Linear use of the same weight, so a
weight-tied model keeps true per-token scores) and ``nn.LayerNorm`` (``q̃_wᵀ (g_t ⊙ x̂_t)``, ``q̃_bᵀ g_t``).
Each train chunk checks ``Σ_t`` of these against the per-example-gradient scores of the same parameters and
raises, naming the parameter, when a use is missed (a parameter used outside such modules, an output
without a per-example leading dimension such as a position embedding of ``arange(T)``): ``exclude=`` it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._data import batch_size
from ._kscore import Prepared, _check, kronecker_state
from .capture import _kind, layer_capture, requiring_grad
from .ihvp.kfactors import fallback_grads

__all__ = ["check_per_token", "token_chunk_scores"]

_BUDGET = 1 << 25  # elements of the largest temporary (query block × positions × features)


def check_per_token(ihvp) -> None:
    """Raise unless every block of the Kronecker-family closure ``ihvp`` can be split per token by hooks."""
    state = kronecker_state(ihvp)
    if state is None:
        raise ValueError("per_token=True needs a Kronecker-family closure built with model= (ifunc.ihvp_ekfac, "
                         "ihvp_kfac, ihvp_diagonal or ihvp_identity): per-token scores come from layer hooks")
    if not state.blocks:
        raise ValueError("per_token=True: the closure tracks no layer (nn.Linear, nn.Conv2d, Conv1D)")
    bad = [f"{d.name} (in a {type(m).__name__})" for d, (_, m, _) in _diag_uses(state) if _use_kind(m) is None]
    bad += [f"{d.name} (used by no module)" for d in state.diags
            if not any(u[0] is d for u in _diag_uses(state))]
    if bad:
        names = [b.split(" ")[0] for b in bad]
        raise ValueError(
            f"per_token=True: parameters {bad} have diagonal blocks used outside nn.Linear, Conv1D, nn.Embedding "
            "and nn.LayerNorm, so their gradient has no per-token split from hooks. Build the closure without "
            f"them, e.g. ifunc.ihvp_ekfac(..., exclude={names}) (ihvp_identity takes exclude= too)"
        )
    tied = _tied(state)
    if tied:
        raise ValueError(
            f"per_token=True: the weights of {tied} are tied to other modules, whose use of them layer hooks "
            "do not see; untie them, or leave those layers out with modules=/exclude="
        )


def _tied(state) -> list[str]:
    """Tracked layers whose weight Parameter another module also holds (e.g. a tied embedding/LM head)."""
    owners: dict[int, list[str]] = {}
    for name, module in state.model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    named = dict(state.model.named_modules())
    return [blk.spec.name for blk in state.blocks
            if len(owners.get(id(getattr(named[blk.spec.name], "weight", None)), [])) > 1]


def _use_kind(module: nn.Module) -> str | None:
    if _kind(module) in ("linear", "conv1d"):
        return _kind(module)
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return None


def _diag_uses(state) -> list:
    """``[(DiagBlock, (module name, module, role)), ...]``: every module that holds a diagonal-block parameter."""
    canon = {id(p): n for n, p in state.model.named_parameters()}  # de-duplicated names, as params_of
    diag = {d.name: d for d in state.diags}
    uses = []
    for mn, m in state.model.named_modules():
        for role, p in m._parameters.items():
            if p is not None and canon.get(id(p)) in diag:
                uses.append((diag[canon[id(p)]], (mn, m, role)))
    return uses


def _capture(loss, params, state, batch, uses):
    """Tracked layers ``{name: (a, g, [positions per call])}`` and diagonal-block uses ``{module: [(x, y, gy)]}``."""
    layers = [blk.spec for blk in state.blocks]
    modules = {mn: m for _, (mn, m, _) in uses}
    seen: dict[str, list] = {mn: [] for mn in modules}
    handles = []

    def make_hook(mn):
        def hook(module, inputs, output):
            seen[mn].append((inputs[0].detach(), output))
        return hook

    p = requiring_grad(params)
    try:
        for mn, m in modules.items():
            handles.append(m.register_forward_hook(make_hook(mn)))
        with layer_capture(state.model, layers) as rec, torch.enable_grad():
            value = loss(p, batch)
    finally:
        for h in handles:
            h.remove()
    rec.check()
    outs = [o for s in layers for o in rec.outputs[s.name]] + [y for mn in seen for _, y in seen[mn]]
    if any(not o.requires_grad for o in outs):
        raise ValueError("per_token=True: a hooked module's output does not depend on params")
    grads = torch.autograd.grad(value, outs, allow_unused=True)
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)]
    k = 0
    captured = {}
    for s in layers:
        calls, parts = [], []
        for x in rec.inputs[s.name]:
            g = grads[k]
            k += 1
            if s.kind == "conv2d":
                g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
            parts.append(g.reshape(g.shape[0], -1, g.shape[-1]))
            calls.append(x.reshape(x.shape[0], -1, x.shape[-1]).shape[1])
        g = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        captured[s.name] = (rec.activations(s, g.dtype), g, calls)
    used = {}
    for mn in seen:
        used[mn] = []
        for x, y in seen[mn]:
            used[mn].append((x, y.detach(), grads[k]))
            k += 1
    return captured, used


def _use_scores(kind: str, module, role: str, q: torch.Tensor, x, gy, b: int) -> torch.Tensor:
    """``[n_query, b, positions]`` contributions of one call of ``module`` to a diagonal-block parameter.

    ``q [n_query, *shape]`` is the preconditioned query of the parameter in its own shape.
    """
    if gy.shape[0] != b or (kind != "embedding" and x.shape[0] != b):
        raise _Missed(f"its output has leading dimension {gy.shape[0]}, not the {b} examples")
    n = q.shape[0]
    if kind in ("linear", "conv1d"):
        G = gy.reshape(b, -1, gy.shape[-1])
        if role == "bias":
            return torch.einsum("bpo,qo->qbp", G, q)
        W = q.transpose(1, 2) if kind == "conv1d" else q  # [n, out, in]
        return _layer_token_scores(W, None, x.reshape(b, -1, x.shape[-1]).to(G.dtype), G)
    if kind == "embedding":
        ids = x.reshape(b, -1)
        G = gy.reshape(b, ids.shape[1], -1)
        if module.padding_idx is not None:  # F.embedding sends no gradient to the padding row
            G = G * (ids != module.padding_idx).unsqueeze(-1)
        out = G.new_empty(n, b, ids.shape[1])
        step = max(1, _BUDGET // max(1, G.numel()))
        for s in range(0, n, step):
            out[s:s + step] = (q[s:s + step][:, ids] * G).sum(-1)
        return out
    dims = len(module.normalized_shape)  # layernorm
    G = gy.reshape(b, -1, *module.normalized_shape).flatten(2)
    if role == "bias":
        return torch.einsum("bpc,qc->qbp", G, q.reshape(n, -1))
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return torch.einsum("bpc,qc->qbp", G * xhat.reshape(b, -1, *x.shape[x.dim() - dims:]).flatten(2),
                        q.reshape(n, -1))


class _Missed(ValueError):
    pass


def _positions(calls: dict[str, list[int]]) -> int:
    sizes = {n for c in calls.values() for n in c}
    if len(sizes) != 1:
        raise ValueError(
            "per_token=True: every call of every tracked layer must see the same number of positions T per "
            f"example; got {calls} (positions per call). Track only the token-wise layers with modules= (a "
            "head applied to a pooled vector has no tokens)"
        )
    return sizes.pop()


def _layer_token_scores(R: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``s[q, b, p] = g_{b,p}ᵀ R_q a_{b,p}`` (``R [q, o, i]``; ``lr`` its rank-r factors or None)."""
    q, o, i = R.shape
    b, P = a.shape[0], a.shape[1]
    A, G = a.reshape(b * P, i), g.reshape(b * P, o)
    out = R.new_empty(q, b * P)
    if lr is not None and lr[0].shape[-1] * (o + i) < o * i:  # Σ_r (gᵀu_r)(v_rᵀa): q·bP·r·(o+i)
        U, V = lr
        step = max(1, _BUDGET // (b * P * U.shape[-1]))
        for s in range(0, q, step):
            gu = torch.matmul(G, U[s:s + step])  # [qs, bP, r]
            av = torch.matmul(A, V[s:s + step].transpose(1, 2))
            out[s:s + step] = (gu * av).sum(-1)
        return out.reshape(q, b, P)
    step = max(1, _BUDGET // (b * P * min(o, i)))
    for s in range(0, q, step):  # q·bP·o·i multiply-adds: one GEMM per query block, the reduction a bmm
        Rs = R[s:s + step]
        k = Rs.shape[0]
        if i <= o:  # X[p, (k, i)] = G_p R_k, then Σ_i X[p, k, i] A[p, i]
            X = (G @ Rs.permute(1, 0, 2).reshape(o, k * i)).view(b * P, k, i)
            out[s:s + k] = torch.bmm(X, A.unsqueeze(-1)).squeeze(-1).T
        else:
            X = (A @ Rs.permute(2, 0, 1).reshape(i, k * o)).view(b * P, k, o)
            out[s:s + k] = torch.bmm(X, G.unsqueeze(-1)).squeeze(-1).T
    return out.reshape(q, b, P)


def token_chunk_scores(loss, params, ihvp, prepared: Prepared, batch, *,
                       token_mask: Callable | None = None) -> torch.Tensor:
    """Per-token scores of one train batch, ``[n_query, b, T]`` (sum over T = the pairwise scores)."""
    state = kronecker_state(ihvp)
    uses = _diag_uses(state)
    captured, used = _capture(loss, params, state, batch, uses)
    b = batch_size(batch)
    for d, (mn, m, _) in uses:
        for x, y, _ in used[mn]:
            if x.dim() < 2 or y.dim() < 3 or x.shape[0] != b or y.shape[0] != b:
                raise ValueError(
                    f"per_token=True: the use of {d.name!r} by {mn!r} cannot be split per example (input "
                    f"{tuple(x.shape)}, output {tuple(y.shape)}: no leading dimension of the {b} examples, e.g. a "
                    f"position embedding of arange(T)); build the closure with exclude={[d.name]}")
    calls = {name: c for name, (_, _, c) in captured.items()}
    calls.update({mn: [y.reshape(y.shape[0], -1, y.shape[-1]).shape[1] if _use_kind(m) != "embedding"
                       else x[0].numel() for x, y, _ in used[mn]] for _, (mn, m, _) in uses})
    T = _positions(calls)
    with torch.no_grad():
        out = prepared.diag.new_zeros(prepared.diag.shape[0], b, T)
        for blk in state.blocks:
            a, g, c = captured[blk.spec.name]
            _check(g, "train")
            if blk.Q_S is not None:
                g, a = g @ blk.Q_S, a @ blk.Q_A
            s = _layer_token_scores(*prepared.layers[blk.spec.name], a, g)
            out += s.reshape(s.shape[0], b, len(c), T).sum(2)  # a module called k times: sum its calls
        if state.diags:
            out += _diag_token_scores(loss, params, state, prepared, batch, uses, used, b, T)
        if token_mask is not None:
            mask = token_mask(batch)
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, T):
                raise ValueError(f"token_mask(batch) must return a tensor [batch, T] = [{b}, {T}] (1 = real "
                                 f"token, 0 = padding), got {getattr(mask, 'shape', type(mask).__name__)}")
            out = out * mask.to(device=out.device, dtype=torch.bool)
    return out


def _diag_token_scores(loss, params, state, prepared, batch, uses, used, b, T) -> torch.Tensor:
    """Diagonal-block contributions per position, checked against the per-example-gradient scores."""
    n = prepared.diag.shape[0]
    cols, start = {}, 0
    for d in state.diags:
        stop = start + d.diag.numel()
        cols[d.name] = prepared.diag[:, start:stop].reshape(n, *params[d.name].shape)
        start = stop
    per_param = {d.name: prepared.diag.new_zeros(n, b, T) for d in state.diags}
    for d, (mn, m, role) in uses:
        for x, y, gy in used[mn]:
            try:
                per_param[d.name] += _use_scores(_use_kind(m), m, role, cols[d.name], x, gy, b)
            except _Missed as err:
                raise ValueError(f"per_token=True: the use of {d.name!r} by {mn!r} cannot be split per example: "
                                 f"{err}; exclude={[d.name]} it from the closure") from None
    with torch.enable_grad():
        G = fallback_grads(loss, params, batch, [d.name for d in state.diags])
    total = prepared.diag.new_zeros(n, b, T)
    for d in state.diags:
        ref = cols[d.name].reshape(n, -1) @ G[d.name].reshape(b, -1).T
        got = per_param[d.name].sum(-1)
        if float((got - ref).abs().max()) > 1e-4 * float(ref.abs().max()) + 1e-12:
            raise ValueError(
                f"per_token=True: the per-token split of {d.name!r} misses part of its gradient (it is used outside "
                "nn.Linear / Conv1D / nn.Embedding / nn.LayerNorm calls with a per-example leading dimension, "
                f"e.g. a position embedding of arange(T)); build the closure with exclude={[d.name]}")
        total += per_param[d.name]
    return total
