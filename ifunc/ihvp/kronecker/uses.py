"""One "use kind" per module that holds a diagonal-block parameter: how its use splits over positions.

``nn.Linear`` / ``Conv1D`` (weight and bias), ``nn.Embedding`` (a position embedding of ``arange(T)`` included:
its shared output is made per example), ``nn.LayerNorm`` and RMSNorm (duck-typed) each say how the preconditioned
query ``q̃`` of the parameter meets the module's input and output gradient at every position (per-token scores).
Nothing outside this file and :mod:`.layers` branches on a module's type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._kernels import TOKEN_BUDGET, layer_token_scores
from .layers import layer_kind

__all__ = ["NotSplittable", "UseKind", "use_kind", "is_rmsnorm"]


class NotSplittable(ValueError):
    """A use of a diagonal-block parameter whose gradient has no per-example, per-position split."""


class UseKind:
    """How a module's use of a diagonal-block parameter splits over positions: ``[n_query, b, positions]``.

    ``q [n_query, *shape]`` is the preconditioned query of the parameter in its own shape, ``x`` the module's
    input, ``gy`` the gradient of its output, ``role`` the parameter's attribute name (``weight``/``bias``).
    """

    def __init__(self, name: str):
        self.name = name

    def positions(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Positions per example of one call."""
        if self.name == "embedding":
            return x[0].numel()
        return y.reshape(y.shape[0], -1, y.shape[-1]).shape[1]

    def per_example(self, x: torch.Tensor, y: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x, y)`` broadcast to the ``b`` examples when the call is shared by the batch, else None.

        A position embedding read with ``arange(T)`` (``[T]`` or ``[1, T]`` indices) returns ``[T, C]`` or
        ``[1, T, C]``, broadcast over the batch by the model; its summed-loss gradient mixes the examples.
        Returned from a forward hook, ``y.expand(b, ...)`` makes autograd deliver each example's gradient
        ``[b, T, C]`` (row ``t`` is used only by position ``t``). The model computes the same values; the
        per-token check against per-example gradients still guards the result.
        """
        if self.name != "embedding" or x.is_floating_point() or x.is_complex():
            return None  # only an index lookup shared by the batch is widened: nothing else changes the forward
        if x.dim() == 1:
            return x.expand(b, *x.shape), y.expand(b, *y.shape)
        if b != 1 and x.dim() == 2 and x.shape[0] == 1 and y.dim() == 3 and y.shape[0] == 1:
            return x.expand(b, *x.shape[1:]), y.expand(b, *y.shape[1:])
        return None

    def token_scores(self, module: nn.Module, role: str, q: torch.Tensor, x, gy, b: int) -> torch.Tensor:
        if gy.shape[0] != b or (self.name != "embedding" and x.shape[0] != b):
            raise NotSplittable(f"its output has leading dimension {gy.shape[0]}, not the {b} examples")
        n = q.shape[0]
        if self.name in ("linear", "conv1d"):
            G = gy.reshape(b, -1, gy.shape[-1])
            if role == "bias":
                return torch.einsum("bpo,qo->qbp", G, q)
            W = q.transpose(1, 2) if self.name == "conv1d" else q  # [n, out, in]
            return layer_token_scores(W, None, x.reshape(b, -1, x.shape[-1]).to(G.dtype), G)
        if self.name == "embedding":
            ids = x.reshape(b, -1)
            G = gy.reshape(b, ids.shape[1], -1)
            if module.padding_idx is not None:  # F.embedding sends no gradient to the padding row
                G = G * (ids != module.padding_idx).unsqueeze(-1)
            out = G.new_empty(n, b, ids.shape[1])
            step = max(1, TOKEN_BUDGET // max(1, G.numel()))
            for s in range(0, n, step):
                out[s : s + step] = (q[s : s + step][:, ids] * G).sum(-1)
            return out
        if self.name == "rmsnorm":  # y = (c + w) ⊙ x̂ (+ b): ∂y/∂w = x̂ = y(w=1) − y(w=0), the module's own arithmetic
            G = gy.reshape(b, -1, gy.shape[-1])
            if role == "bias":
                return torch.einsum("bpc,qc->qbp", G, q.reshape(n, -1))
            xhat = _weight_derivative(module, x).reshape(b, -1, gy.shape[-1]).to(G.dtype)
            return torch.einsum("bpc,qc->qbp", G * xhat, q.reshape(n, -1))
        assert isinstance(module, nn.LayerNorm)  # use_kind gives "layernorm" only to nn.LayerNorm
        dims = len(module.normalized_shape)  # layernorm: y = x̂ ⊙ w + b
        G = gy.reshape(b, -1, *module.normalized_shape).flatten(2)
        if role == "bias":
            return torch.einsum("bpc,qc->qbp", G, q.reshape(n, -1))
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return torch.einsum(
            "bpc,qc->qbp", G * xhat.reshape(b, -1, *x.shape[x.dim() - dims :]).flatten(2), q.reshape(n, -1)
        )


def use_kind(module: nn.Module) -> UseKind | None:
    """The per-token split of a module holding a diagonal-block parameter, or None when it has none."""
    kind = layer_kind(module)
    if kind is not None and kind.name in ("linear", "conv1d"):
        return UseKind(kind.name)
    if isinstance(module, nn.Embedding):
        return UseKind("embedding") if module.max_norm is None and not module.scale_grad_by_freq else None
    if isinstance(module, nn.LayerNorm):
        return UseKind("layernorm")
    if is_rmsnorm(module):
        return UseKind("rmsnorm")
    return None


def is_rmsnorm(module: nn.Module) -> bool:
    """Duck typing for RMSNorm layers (``torch.nn.RMSNorm``, Llama's, Mistral's, Qwen's, ...): the class name ends
    with ``RMSNorm``, the module holds a ``weight`` [C] applied elementwise and an ``eps`` / ``variance_epsilon``.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )


def _weight_derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``∂y/∂w = y(w=1) − y(w=0)`` of a norm whose output is affine in its elementwise weight, e.g. ``w ⊙ x̂``
    (Llama) or ``(1 + w) ⊙ x̂`` (Gemma); computed by the module's own forward (its dtype casts included)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)  # is_rmsnorm checked it
    one, zero = torch.ones_like(w), torch.zeros_like(w)
    with torch.no_grad():
        return torch.func.functional_call(module, {"weight": one}, (x,)) - torch.func.functional_call(
            module, {"weight": zero}, (x,)
        )
