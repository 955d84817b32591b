"""Per-token scores of Kronecker-family closures (``ifunc.attribute(..., per_token=True)``, through their scorer).

For a tracked layer ``l`` applied at positions ``t = 1..T`` of a training sequence, the per-example weight
gradient is ``DW_l = Σ_t g_t a_tᵀ`` (``a_t`` the layer input with a 1 appended for a tracked bias, ``g_t`` the
gradient of the summed loss with respect to the layer output). With the preconditioned query
``Q̃_l = (G_l + λ)^{-1} ∇_{W_l} f`` the pairwise score is linear in ``DW_l``, so it splits exactly over
positions:

``score[q, i] = Σ_l ⟨Q̃_l, DW_l⟩ = Σ_t Σ_l g_{l,t}ᵀ Q̃_l a_{l,t} = Σ_t s[q, i, t]``.

``s[q, i, t]`` is the contribution of the gradient that flows through position ``t`` (its own loss term
and every later term that reads it) — the per-token decomposition of Grosse et al. (2023, §5.3). It is
computed from the captured ``a`` and ``g`` and the query preconditioned once in parameter space
(:func:`~ifunc.ihvp.kronecker.score.kronecker_prepare`); no per-token or per-example gradient is materialised.
A module called ``k`` times per forward (a shared block, a layer reused at several depths) contributes the sum
of its ``k`` calls at each position, so shared modules keep true per-token scores. A tracked ``nn.Embedding``
(one-hot inputs) contributes ``g_tᵀ Q̃[:, x_t]`` at position ``t``, a gathered column of its query (0 at a padding
position).

Parameters with diagonal blocks (preconditioned query ``q̃ = ∇f / (diag + λ)``) are split over positions
the same way, from hooks on the modules that use them: ``nn.Linear`` / ``Conv1D`` (``g_tᵀ Q̃ a_t`` and
``q̃_bᵀ g_t``), ``nn.Embedding`` (``q̃[x_t] · g_t``; a tied LM head is a Linear use of the same weight, so a
weight-tied model keeps true per-token scores), ``nn.LayerNorm`` (``q̃_wᵀ (g_t ⊙ x̂_t)``, ``q̃_bᵀ g_t``) and
RMSNorm (Llama-style, found by duck typing: ``q̃_wᵀ (g_t ⊙ x̂_t)`` with ``x̂ = x / rms(x)``).
A position embedding read with ``arange(T)`` (GPT-2's ``wpe``, nanoGPT) has no example dimension: the capture
broadcasts its output to the batch, so row ``t`` contributes ``q̃[t] · g_{i,t}`` to position ``t`` of example
``i``. Each train chunk checks ``Σ_t`` of these against the per-example-gradient scores of the same
parameters and raises, naming the parameter, when a use is missed (a parameter used outside such modules, or
in a way the hooks do not see): ``exclude=`` it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..._batches import batch_size, slice_batch
from ...grads import batch_grads
from .capture import layer_capture, requiring_grad
from .layers import kind_of
from .score import PreparedQueries, check_outputs, checked
from .uses import NotSplittable, UseKind, use_kind

__all__ = ["check_per_token", "token_chunk_scores"]


def check_per_token(ihvp) -> None:
    """Raise unless every block of the Kronecker-family closure ``ihvp`` can be split per token by hooks."""
    state = ihvp
    if not state.blocks:
        raise ValueError("per_token=True: the closure tracks no layer (nn.Linear, nn.Conv2d, Conv1D, nn.Embedding)")
    bad = [f"{d.name} (in a {type(m).__name__})" for d, (_, m, _) in _diag_uses(state) if use_kind(m) is None]
    bad += [f"{d.name} (used by no module)" for d in state.diags if not any(u[0] is d for u in _diag_uses(state))]
    if bad:
        names = [b.split(" ")[0] for b in bad]
        raise ValueError(
            f"per_token=True: parameters {bad} have diagonal blocks used outside nn.Linear, Conv1D, nn.Embedding, "
            "nn.LayerNorm and RMSNorm, so their gradient has no per-token split from hooks. Build the closure without "
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
    return [
        blk.spec.name
        for blk in state.blocks
        if len(owners.get(id(getattr(named[blk.spec.name], "weight", None)), [])) > 1
    ]


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


def _split(module) -> UseKind:
    """The per-token split of a module that :func:`check_per_token` accepted."""
    kind = use_kind(module)
    assert kind is not None  # check_per_token refused every diagonal-block use without a per-token split
    return kind


def _positions(calls: dict[str, list[int]]) -> int:
    sizes = {n for c in calls.values() for n in c}
    if len(sizes) != 1:
        raise ValueError(
            "per_token=True: every call of every tracked layer must see the same number of positions T per "
            f"example; got {calls} (positions per call). Track only the token-wise layers with modules= (a "
            "head applied to a pooled vector has no tokens)"
        )
    return sizes.pop()


def _shared_uses(loss, params, ihvp, batch, uses, check) -> set[str]:
    """The modules using diagonal-block parameters whose calls are shared by the batch (a position table read with
    ``arange(T)``), found once per callable (:func:`_find_shared`) on the first batch of two or more examples.

    Empty while batches hold one example: widening a ``[T]`` lookup to ``[1, T]`` then changes nothing.
    """
    if check.uses is None and batch_size(batch) > 1:
        check.uses = _find_shared(loss, params, ihvp.model, batch, uses)
    return check.uses or set()


def _call_shapes(loss, params, model, batch, extra) -> dict[str, list[tuple[tuple, tuple, bool]]]:
    """Per module ``[(input shape, output shape, an index lookup?)]`` of each call on ``batch`` (no gradient)."""
    named = dict(model.named_modules())
    with layer_capture(model, [], extra) as rec, torch.no_grad():
        loss(params, batch)
    lookup = {m: _split(named[m]).name == "embedding" for m in extra}
    return {
        m: [(tuple(x.shape), tuple(y.shape), lookup[m] and not x.is_floating_point()) for x, y in rec.calls[m]]
        for m in extra
    }


def _moved(one: tuple, two: tuple) -> list[int] | None:
    """Dimensions whose size differs between one and two examples (None: the number of dimensions differs)."""
    return [d for d in range(len(one)) if one[d] != two[d]] if len(one) == len(two) else None


def _find_shared(loss, params, model, batch, uses) -> set[str]:
    """Uses shared by the batch, from the call shapes on one and two examples; every other use must take its
    examples along dimension 0 of its input and output (sequence-first modules are refused, naming the fix)."""
    extra = list(dict.fromkeys(mn for _, (mn, _, _) in uses))
    one, two = (_call_shapes(loss, params, model, slice_batch(batch, 0, k), extra) for k in (1, 2))
    named, shared = dict(model.named_modules()), set()
    for mn in extra:
        for (x1, y1, lookup), (x2, y2, _) in zip(one.get(mn, []), two.get(mn, [])):
            moved = (_moved(x1, x2), _moved(y1, y2))
            if moved == ([], []) and lookup and (len(x1) == 1 or (len(x1) == 2 and x1[0] == 1)):
                shared.add(mn)  # an index lookup shared by the batch: widened to the examples by the hook
            elif moved != ([0], [0]):
                names = sorted({d.name for d, (n, _, _) in uses if n == mn})
                how = (
                    "is called on a tensor shared by the whole batch"
                    if moved == ([], [])
                    else ("does not take its examples along dimension 0 (sequence-first?)")
                )
                raise ValueError(
                    f"per_token=True: {mn!r} ({type(named[mn]).__name__}, using the diagonal-block parameters "
                    f"{names}) {how}: input {x1} and output {y1} for one example, {x2} and {y2} for two. Per-token "
                    "scores of diagonal-block parameters need batch-first modules ([batch, T, ...], e.g. "
                    f"batch_first=True) or a position lookup of arange(T); build the closure with exclude={names}"
                )
    return shared


def _capture(loss, params, ihvp, batch, uses, offset: int):
    """Tracked layers ``{name: (a, g, [positions per call])}`` and diagonal-block uses ``{module: [(x, y, gy)]}``."""
    check = checked(loss, params, ihvp, batch)
    shared = _shared_uses(loss, params, ihvp, batch, uses, check)
    extra = list(dict.fromkeys(mn for _, (mn, _, _) in uses))
    p = requiring_grad(params)
    b = batch_size(batch)  # uses shared by the batch (position embeddings) are broadcast to the b examples
    widen = shared if b > 1 else extra  # one example: widening a [T] lookup to [1, T] changes nothing
    with layer_capture(ihvp.model, check.layers, extra, examples=b, widen=widen) as rec, torch.enable_grad():
        value = loss(p, batch)
    rec.check()
    gs = rec.output_grads(value, retain_graph=False, wrt=check.wrt(p))  # NaN/inf: checked on the scores
    captured = {s.name: (rec.activations(s, gs[s.name].dtype), gs[s.name], rec.positions(s)) for s in check.layers}
    check.observe(loss, params, ihvp.model, batch, rec, {n: (a, g) for n, (a, g, _) in captured.items()})
    return captured, rec.call_grads()


def token_chunk_scores(
    loss, params, ihvp, prepared: PreparedQueries, batch, *, token_mask: Callable | None = None, offset: int = 0
) -> torch.Tensor:
    """Per-token scores of one train batch, ``[n_query, b, T]`` (sum over T = the pairwise scores).

    A NaN/inf in a captured gradient raises by example (checked on the scores, :func:`~.score.check_outputs`).
    """
    state = ihvp
    uses = _diag_uses(state)
    captured, used = _capture(loss, params, state, batch, uses, offset)
    b = batch_size(batch)
    for d, (mn, _m, _) in uses:
        for x, y, _ in used[mn]:
            if x.dim() < 2 or y.dim() < 3 or x.shape[0] != b or y.shape[0] != b:
                raise ValueError(
                    f"per_token=True: the use of {d.name!r} by {mn!r} cannot be split per example (input "
                    f"{tuple(x.shape)}, output {tuple(y.shape)}: no leading dimension of the {b} examples, and not a "
                    f"lookup shared by the whole batch); build the closure with exclude={[d.name]}"
                )
    calls = {name: c for name, (_, _, c) in captured.items()}
    calls.update({mn: [_split(m).positions(x, y) for x, y, _ in used[mn]] for _, (mn, m, _) in uses})
    T = _positions(calls)
    with torch.no_grad():
        dt = prepared.diag.dtype  # of the contraction; positions and layers are summed in at least float32
        out = prepared.diag.new_zeros(prepared.diag.shape[0], b, T, dtype=torch.promote_types(dt, torch.float32))
        for blk in state.blocks:
            a, g, c = captured[blk.spec.name]  # the prepared queries are in parameter space: g, a as captured
            kind = kind_of(blk.spec)
            s = kind.token_scores(*prepared.layers[blk.spec.name], kind.cast(a, dt), g.to(dt))
            out += s.reshape(s.shape[0], b, len(c), T).sum(2)  # a module called k times: sum its calls
        check_outputs([out], captured, offset)  # before the mask: a NaN/inf at a masked position raises too
        if state.diags:
            out += _diag_token_scores(loss, params, state, prepared, batch, uses, used, b, T, offset)
        if token_mask is not None:
            mask = token_mask(batch)
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, T):
                raise ValueError(
                    f"token_mask(batch) must return a tensor [batch, T] = [{b}, {T}] (1 = real "
                    f"token, 0 = padding), got {getattr(mask, 'shape', type(mask).__name__)}"
                )
            out = out * mask.to(device=out.device, dtype=torch.bool)
    return out


def _diag_token_scores(loss, params, state, prepared, batch, uses, used, b, T, offset: int) -> torch.Tensor:
    """Diagonal-block contributions per position, checked against the per-example-gradient scores."""
    n = prepared.diag.shape[0]
    cols, start = {}, 0
    for d in state.diags:
        stop = start + d.diag.numel()
        cols[d.name] = prepared.diag[:, start:stop].reshape(n, *params[d.name].shape)
        start = stop
    per_param = {d.name: prepared.diag.new_zeros(n, b, T) for d in state.diags}
    for d, (mn, m, role) in uses:
        for x, _y, gy in used[mn]:
            dt = prepared.diag.dtype  # the module's input and output gradient in the queries' dtype (ids stay ints)
            x = x.to(dt) if x.is_floating_point() else x
            try:
                per_param[d.name] += _split(m).token_scores(m, role, cols[d.name], x, gy.to(dt), b)
            except NotSplittable as err:
                raise ValueError(
                    f"per_token=True: the use of {d.name!r} by {mn!r} cannot be split per example: "
                    f"{err}; exclude={[d.name]} it from the closure"
                ) from None
    with torch.enable_grad():
        G = batch_grads(loss, params, batch, wrt=[d.name for d in state.diags], name="train", offset=offset)
    total = prepared.diag.new_zeros(n, b, T)
    for d in state.diags:
        Gd = G[d.name].reshape(b, -1)
        # a gradient summed in the model's dtype, or a split contracted in dtype=, differs from the other by its
        # rounding: 1e-4 in float32 and float64, 4 units of a half dtype's roundoff (bfloat16 ε = 2^-7: 0.031) of
        # Σ|q̃||g|
        eps = max(torch.finfo(Gd.dtype).eps, torch.finfo(prepared.diag.dtype).eps)
        tol = max(1e-4, 4 * eps)
        Gd = Gd.to(prepared.diag.dtype)
        ref = cols[d.name].reshape(n, -1) @ Gd.T
        got = per_param[d.name].sum(-1)
        scale = float(ref.abs().max()) if tol == 1e-4 else float((cols[d.name].reshape(n, -1).abs() @ Gd.abs().T).max())
        if float((got - ref).abs().max()) > tol * scale + 1e-12:
            raise ValueError(
                f"per_token=True: the per-token split of {d.name!r} misses part of its gradient (it is used outside "
                "nn.Linear / Conv1D / nn.Embedding / nn.LayerNorm / RMSNorm calls, or its output is changed "
                f"in a way the hooks do not see); build the closure with exclude={[d.name]}"
            )
        total += per_param[d.name]
    return total
