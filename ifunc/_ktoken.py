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
position, so shared modules keep true per-token scores. Parameters outside the tracked layers (diagonal
blocks: embeddings, LayerNorms, ...) have no per-token decomposition from layer hooks: the closure must be
built without them (``exclude=``), so that per-token scores always sum to the pairwise scores of the same
closure.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._data import batch_size
from ._kscore import Prepared, _check, kronecker_state
from .capture import layer_capture, requiring_grad

__all__ = ["check_per_token", "token_chunk_scores"]

_BUDGET = 1 << 24  # elements of the largest temporary (query block × positions × features)


def check_per_token(ihvp) -> None:
    """Raise unless ``ihvp`` is a Kronecker-family closure whose every block is a tracked layer."""
    state = kronecker_state(ihvp)
    if state is None:
        raise ValueError("per_token=True needs a Kronecker-family closure built with model= (ifunc.ihvp_ekfac, "
                         "ihvp_kfac, ihvp_diagonal or ihvp_identity): per-token scores come from layer hooks")
    if not state.blocks:
        raise ValueError("per_token=True: the closure tracks no layer (nn.Linear, nn.Conv2d, Conv1D)")
    if state.diags:
        names = [d.name for d in state.diags]
        raise ValueError(
            f"per_token=True: parameters {names} have diagonal blocks (no tracked layer uses them), and layer "
            "hooks give them no per-token decomposition. Build the closure without them so that per-token "
            f"scores sum to its pairwise scores: e.g. ifunc.ihvp_ekfac(..., exclude={names}) or "
            "ifunc.language.untracked(model, params, modules=...) for the list; ihvp_identity takes exclude= too"
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


def _capture(loss, params, state, batch):
    """``{layer: (a [b, kT, in(+1)], g [b, kT, out], [positions of each of the k calls])}``."""
    layers = [blk.spec for blk in state.blocks]
    p = requiring_grad(params)
    with layer_capture(state.model, layers) as rec, torch.enable_grad():
        value = loss(p, batch)
    rec.check()
    calls = {s.name: [x.reshape(x.shape[0], -1, x.shape[-1]).shape[1] for x in rec.inputs[s.name]]
             for s in layers}
    gs = rec.output_grads(value, retain_graph=False)
    return {s.name: (rec.activations(s, gs[s.name].dtype), gs[s.name], calls[s.name]) for s in layers}


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
    for s in range(0, q, step):  # q·bP·o·i multiply-adds, the temporary on the smaller side
        Rs = R[s:s + step]
        if i <= o:
            out[s:s + step] = (torch.matmul(G, Rs) * A).sum(-1)
        else:
            out[s:s + step] = (torch.matmul(A, Rs.transpose(1, 2)) * G).sum(-1)
    return out.reshape(q, b, P)


def token_chunk_scores(loss, params, ihvp, prepared: Prepared, batch, *,
                       token_mask: Callable | None = None) -> torch.Tensor:
    """Per-token scores of one train batch, ``[n_query, b, T]`` (sum over T = the pairwise scores)."""
    state = kronecker_state(ihvp)
    captured = _capture(loss, params, state, batch)
    T = _positions({name: calls for name, (_, _, calls) in captured.items()})
    b = batch_size(batch)
    with torch.no_grad():
        out = prepared.diag.new_zeros(prepared.diag.shape[0], b, T)
        for blk in state.blocks:
            a, g, calls = captured[blk.spec.name]
            _check(g, "train")
            if blk.Q_S is not None:
                g, a = g @ blk.Q_S, a @ blk.Q_A
            s = _layer_token_scores(*prepared.layers[blk.spec.name], a, g)
            out += s.reshape(s.shape[0], b, len(calls), T).sum(2)  # a module called k times: sum its calls
        if token_mask is not None:
            mask = token_mask(batch)
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, T):
                raise ValueError(f"token_mask(batch) must return a tensor [batch, T] = [{b}, {T}] (1 = real "
                                 f"token, 0 = padding), got {getattr(mask, 'shape', type(mask).__name__)}")
            out = out * mask.to(device=out.device, dtype=torch.bool)
    return out
