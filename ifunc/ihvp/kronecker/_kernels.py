"""Contraction kernels of the Kronecker family: the dense linear algebra, with no model and no hooks.

Notation: for one layer, ``a [b, T, in]`` are the inputs of ``b`` examples at ``T`` positions (a 1 appended for a
tracked bias), ``g [b, T, out]`` the output-gradients, ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` the per-example weight
gradient, ``Q_S, Q_A`` the eigenbases and ``R [q, out, in]`` preconditioned queries in that basis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "one_thread",
    "rotated_sq_sum",
    "low_rank",
    "layer_scores",
    "layer_token_scores",
    "per_example_quadratic",
    "damped_div",
    "TOKEN_BUDGET",
    "DW_BUDGET",
    "input_major",
]

TOKEN_BUDGET = 1 << 25  # elements of the largest temporary (query block × positions × features)


def damped_div(x: torch.Tensor, values: torch.Tensor, lam: float) -> torch.Tensor:
    """``x / (Λ + λ)`` that does not overflow when ``λ`` is beyond the dtype's range (float32: above 3.4e38).

    Then ``Λ + λ`` is ``inf`` and the quotient 0; instead ``(x · λ⁻¹) / (Λ · λ⁻¹ + 1)``, where ``λ⁻¹`` is
    representable (as a subnormal at worst), gives ``x / λ`` to the dtype's precision.
    """
    if lam <= torch.finfo(values.dtype).max / 4:
        return x / (values + lam)
    inv = 1.0 / lam
    return (x * inv) / (values * inv + 1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run dense LAPACK work (``eigh``, ``svd``) on one thread, restoring the thread count afterwards.

    MKL's multithreaded ``eigh`` / batched ``svd`` on matrices of a few hundred rows is slower than one
    thread, catastrophically so when the cores are shared (measured on 2 busy cores: ``eigh`` 785² 6×,
    ``svd`` of ``[20, 512, 785]`` 20× slower with 2 threads than with 1).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _rotated(g: torch.Tensor, a: torch.Tensor, Q_S, Q_A) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g Q_S, a Q_A)``: the output gradients and inputs in the eigenbasis (a basis None: the identity)."""
    return (g if Q_S is None else g @ Q_S), (a if Q_A is None else a @ Q_A)


def rotated_sq_sum(g: torch.Tensor, a: torch.Tensor, Q_S, Q_A, *, budget: int = 1 << 24) -> torch.Tensor:
    """``Σ_i (Q_Sᵀ DW_i Q_A)²`` with ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ``; ``Q=None`` means the identity."""
    g, a = _rotated(g, a, Q_S, Q_A)
    b, T, o = g.shape
    i = a.shape[-1]
    if T == 1:
        return (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
    total = g.new_zeros(o, i)
    step = max(1, budget // (o * i))
    for s in range(0, b, step):
        R = torch.einsum("bto,bti->boi", g[s : s + step], a[s : s + step])
        total += R.square_().sum(0)
    return total


def low_rank(Qt: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2):
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


#: elements of one block of per-example gradients in :func:`layer_scores` (32 MiB in float32): a chunk's ``DW`` is
#: formed whole for layers of up to ``DW_BUDGET / chunk`` weights and a few examples at a time beyond
DW_BUDGET = 1 << 23


def input_major(Qt: torch.Tensor) -> torch.Tensor:
    """``Q̃ [q, out, in]`` stored input-major: the same values, a transposed view of a contiguous ``[q, in, out]``.

    The layout :func:`layer_scores` contracts fastest: its per-example gradients are then formed as
    ``Σ_t a_t g_tᵀ`` ``[in, out]``, a batched product that ran 12 % faster than ``[out, in]`` over the language-model
    benchmark's layers (whose ``in`` is odd, a bias column appended; one thread). Every kernel reads either layout;
    this one copies ``Q̃`` once.
    """
    return Qt if Qt.dim() != 3 or _is_input_major(Qt) else Qt.transpose(1, 2).contiguous().transpose(1, 2)


def _is_input_major(Qt: torch.Tensor) -> bool:
    return Qt.shape[1] > 1 and Qt.shape[2] > 1 and not Qt.is_contiguous() and Qt.transpose(1, 2).is_contiguous()


def layer_scores(Qt: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor, *, budget: int = DW_BUDGET) -> torch.Tensor:
    """``scores[q, b] = Σ_t g_{b,t}ᵀ Q̃_q a_{b,t}`` ``[q, b]`` by the contraction with the fewest multiply-adds.

    Args:
      Qt: ``Q̃ [q, out, in]`` preconditioned queries in parameter space (contiguous or :func:`input_major`).
      lr: rank-``r`` factors ``(U σ [q, out, r], V [q, r, in])`` of ``Q̃``, or None.
      a: ``[b, T, in]`` layer inputs; g: ``[b, T, out]`` output gradients.
      budget: elements of one block of per-example gradients (bounds the memory, not the result).

    Returns:
      ``[q, b]``. Per layer, the cheapest of: ``q·b·out·in`` for ``T = 1`` (``(Q̃ a) ⊙ g`` summed);
      ``q·b·T·r·(out + in)`` with factors; ``b·T·out·in + q·b·out·in`` through the per-example gradients
      ``DW_b = Σ_t g_{b,t} a_{b,t}ᵀ`` (one batched product over ``T`` in the layout of ``Q̃``, then one product with
      the flattened queries), ``budget // (out·in)`` examples at a time.
    """
    q, o, i = Qt.shape
    b, T = a.shape[0], a.shape[1]
    if b == 0:
        return Qt.new_zeros(q, 0)
    cost_perex = b * T * o * i + q * b * o * i
    flipped = _is_input_major(Qt)
    if lr is not None:
        U, V = lr
        r = U.shape[-1]
        if q * b * T * r * (o + i) < cost_perex:
            gu = torch.einsum("bto,qor->qbtr", g, U)
            av = torch.einsum("bti,qri->qbtr", a, V)
            return (gu * av).sum(dim=(2, 3))
    elif T == 1 and flipped:  # (Q̃ᵀ g) ⊙ a summed, reading Q̃ as [q·in, out]
        Qg = (g[:, 0] @ Qt.transpose(1, 2).reshape(q * i, o).T).view(b, q, i)
        return (Qg * a[:, 0].unsqueeze(1)).sum(dim=2).T
    elif T == 1:
        Qa = (Qt.reshape(q * o, i) @ a[:, 0].T).reshape(q, o, b)
        return (Qa * g[:, 0].T.unsqueeze(0)).sum(dim=1)
    # DW in the layout of Q̃: [in, out] = Σ_t a_t g_tᵀ (input-major) or [out, in] = Σ_t g_t a_tᵀ
    Qf = (Qt.transpose(1, 2) if flipped else Qt).reshape(q, o * i)
    left, right = (a, g) if flipped else (g, a)
    left = left.transpose(1, 2)  # [b, ·, T]: a strided view, read as a transposed operand
    blocks = -(-b // max(1, min(b, budget // max(1, o * i))))
    step = -(-b // blocks)  # blocks of equal size, none of a single straggler
    if step >= b:
        return Qf @ torch.bmm(left, right).view(b, o * i).T
    out = Qt.new_empty(q, b)
    block = Qt.new_empty(step, left.shape[1], right.shape[2])
    for s in range(0, b, step):
        k = min(step, b - s)
        DW = torch.bmm(left[s : s + k], right[s : s + k], out=block[:k])
        out[:, s : s + k] = Qf @ DW.view(k, o * i).T
    return out


def layer_token_scores(R: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``s[q, b, p] = g_{b,p}ᵀ R_q a_{b,p}`` (``R [q, o, i]``; ``lr`` its rank-r factors or None)."""
    q, o, i = R.shape
    b, P = a.shape[0], a.shape[1]
    A, G = a.reshape(b * P, i), g.reshape(b * P, o)
    out = R.new_empty(q, b * P)
    if lr is not None and lr[0].shape[-1] * (o + i) < o * i:  # Σ_r (gᵀu_r)(v_rᵀa): q·bP·r·(o+i)
        U, V = lr
        step = max(1, TOKEN_BUDGET // (b * P * U.shape[-1]))
        for s in range(0, q, step):
            gu = torch.matmul(G, U[s : s + step])  # [qs, bP, r]
            av = torch.matmul(A, V[s : s + step].transpose(1, 2))
            out[s : s + step] = (gu * av).sum(-1)
        return out.reshape(q, b, P)
    step = max(1, TOKEN_BUDGET // (b * P * min(o, i)))
    for s in range(0, q, step):  # q·bP·o·i multiply-adds: one GEMM per query block, the reduction a bmm
        Rs = R[s : s + step]
        k = Rs.shape[0]
        if i <= o:  # X[p, (k, i)] = G_p R_k, then Σ_i X[p, k, i] A[p, i]
            X = (G @ Rs.permute(1, 0, 2).reshape(o, k * i)).view(b * P, k, i)
            out[s : s + k] = torch.bmm(X, A.unsqueeze(-1)).squeeze(-1).T
        else:
            X = (A @ Rs.permute(2, 0, 1).reshape(i, k * o)).view(b * P, k, o)
            out[s : s + k] = torch.bmm(X, G.unsqueeze(-1)).squeeze(-1).T
    return out.reshape(q, b, P)


def per_example_quadratic(eigenvalues: torch.Tensor, Q_S, Q_A, a, g, lam: float) -> torch.Tensor:
    """``Σ (Q_Sᵀ DW_i Q_A)² / (Λ + λ)`` for every example of the chunk, ``[b]``."""
    g, a = _rotated(g, a, Q_S, Q_A)
    inv = damped_div(torch.ones_like(eigenvalues), eigenvalues, lam)
    if a.shape[1] == 1:  # (g̃ ⊗ ã)² weighted: (g̃²) inv (ã²)ᵀ, one matmul
        return ((g[:, 0] ** 2) @ inv * (a[:, 0] ** 2)).sum(dim=1)
    R = torch.einsum("bto,bti->boi", g, a)
    return (R * R * inv).sum(dim=(1, 2))
