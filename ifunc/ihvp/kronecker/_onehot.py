"""Contraction kernels of one-hot inputs (``nn.Embedding``): token ids stand for ``a``, never ``[b, T, vocab]``.

An embedding ``E [vocab, dim]`` looked up at ids ``x_t`` is a layer with one-hot inputs ``a_t = e_{x_t}`` (size
``vocab``) and output gradients ``g_t = ∂ℓ/∂E[x_t]`` (size ``dim``). The ids ``x [b, T]`` carry ``a``; an id of
``-1`` marks a position whose input is zero (the padding row, which receives no gradient). In the weight-matrix
layout ``[out, in] = [dim, vocab]``:

* ``Σ_t a_t a_tᵀ = diag(counts)``: the input factor is a vector of token counts;
* ``DW_i = Σ_t g_t e_{x_t}ᵀ``: column ``v`` of an example's gradient is ``Σ_{t: x_t = v} g_t`` (a scatter-add of
  ``g`` over the example's distinct tokens, its *segments*);
* ``g_tᵀ Q̃ a_t = g_tᵀ Q̃[:, x_t]``: a gather of the query's columns.

Each kernel costs ``O(b·T·dim)`` (times the queries where there are some), never ``O(b·dim·vocab)``, except
:func:`onehot_grads`, whose result is that dense per-example gradient.
"""

from __future__ import annotations

import torch

from ._kernels import TOKEN_BUDGET, damped_div

__all__ = [
    "token_counts",
    "segments",
    "onehot_grads",
    "onehot_sq_sum",
    "onehot_quadratic",
    "onehot_scores",
    "onehot_token_scores",
]


def token_counts(ids: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_{i,t} a_{i,t}a_{i,t}ᵀ`` of one-hot inputs as its diagonal ``[vocab]``: how often each token occurs."""
    return torch.bincount(ids[ids >= 0], minlength=vocab).to(dtype)


def segments(ids: torch.Tensor, g: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero columns of every ``DW_i = Σ_t g_{i,t} e_{x_{i,t}}ᵀ``: ``(token [K], example [K], column [K, out])``.

    One row per distinct (example, token) pair: column ``token_k`` of ``DW_{example_k}`` is ``column_k``.
    """
    b = ids.shape[0]
    keep = ids >= 0
    key = (torch.arange(b, device=ids.device).unsqueeze(1) * vocab + ids)[keep]
    pairs, where = torch.unique(key, return_inverse=True)
    sums = g.new_zeros(len(pairs), g.shape[-1]).index_add_(0, where, g[keep])
    return pairs % vocab, pairs // vocab, sums


def onehot_grads(g: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-example gradients ``DW_i = Σ_t g_{i,t} e_{x_{i,t}}ᵀ``, dense ``[b, out, vocab]``."""
    tokens, example, cols = segments(ids, g, vocab)
    out = g.new_zeros(ids.shape[0], g.shape[-1], vocab)
    out[example, :, tokens] = cols
    return out


def onehot_sq_sum(g: torch.Tensor, ids: torch.Tensor, vocab: int, Q_S: torch.Tensor | None) -> torch.Tensor:
    """``Σ_i (Q_Sᵀ DW_i)²`` ``[out, vocab]`` (the input basis is the identity; ``Q_S=None``: identity too)."""
    if Q_S is not None:
        g = g @ Q_S
    tokens, _, cols = segments(ids, g, vocab)
    return g.new_zeros(vocab, g.shape[-1]).index_add_(0, tokens, cols.square()).T


def onehot_quadratic(
    eigenvalues: torch.Tensor, Q_S: torch.Tensor | None, ids: torch.Tensor, g: torch.Tensor, lam: float
) -> torch.Tensor:
    """``Σ (Q_Sᵀ DW_i)² / (Λ + λ)`` for every example ``[b]`` (``Λ [out, vocab]``)."""
    if Q_S is not None:
        g = g @ Q_S
    tokens, example, cols = segments(ids, g, eigenvalues.shape[1])
    inv = damped_div(torch.ones_like(eigenvalues), eigenvalues, lam)
    terms = (cols.square() * inv[:, tokens].T).sum(dim=1)
    return terms.new_zeros(ids.shape[0]).index_add_(0, example, terms)


def _gathered(R: torch.Tensor, lr, tokens: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``s[q, k] = cols_kᵀ Q̃_q[:, tokens_k]`` for ``Q̃ = R [q, out, vocab]`` (or its rank-r factors ``lr``)."""
    q, o = R.shape[0], R.shape[1]
    n = len(tokens)
    out = R.new_empty(q, n)
    if lr is not None and lr[0].shape[-1] < o:  # Σ_r (colᵀ u_r)(v_r[token]): q·n·r·2 instead of q·n·out
        U, V = lr
        step = max(1, TOKEN_BUDGET // max(1, n * U.shape[-1]))
        for s in range(0, q, step):
            gu = torch.matmul(cols, U[s : s + step])  # [qs, n, r]
            out[s : s + step] = (gu * V[s : s + step][:, :, tokens].transpose(1, 2)).sum(-1)
        return out
    step = max(1, TOKEN_BUDGET // max(1, n * o))
    for s in range(0, q, step):
        out[s : s + step] = (R[s : s + step][:, :, tokens] * cols.T).sum(1)
    return out


def onehot_scores(R: torch.Tensor, lr, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``scores[q, i] = Σ_t g_{i,t}ᵀ Q̃_q[:, x_{i,t}] = ⟨Q̃_q, DW_i⟩`` ``[q, b]``, one gather per distinct token."""
    tokens, example, cols = segments(ids, g, R.shape[2])
    per_pair = _gathered(R, lr, tokens, cols)
    return per_pair.new_zeros(R.shape[0], ids.shape[0]).index_add_(1, example, per_pair)


def onehot_token_scores(R: torch.Tensor, lr, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``s[q, i, t] = g_{i,t}ᵀ Q̃_q[:, x_{i,t}]`` ``[q, b, T]`` (0 at a padding position)."""
    b, T = ids.shape
    keep = (ids >= 0).reshape(-1, 1)
    cols = g.reshape(b * T, -1) * keep.to(g.dtype)
    return _gathered(R, lr, ids.reshape(-1).clamp_min(0), cols).reshape(R.shape[0], b, T)
