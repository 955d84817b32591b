"""One adapter per layer kind: how a module's inputs ``a``, output-gradients ``g`` and weight matrix look.

For a layer ``y_t = W a_t (+ b)`` applied at positions ``t`` (tokens, conv patches, repeated calls), the
per-example weight gradient is ``DW = Σ_t g_t a_tᵀ`` in the weight-matrix layout ``[out, in]``. A *layer
kind* says how to read ``a [b, T, in]`` from the module's input, ``g [b, T, out]`` from the gradient of its
output, and how the flat parameter slice maps to ``[out, in]``. Supported: ``nn.Linear``, ``nn.Conv2d``
(``groups=1``, zero padding; inputs unfolded to patches) and GPT-2-style ``Conv1D`` (weight ``[in, out]``).

A *use kind* says how a module that holds a diagonal-block parameter (``nn.Linear``, ``Conv1D``,
``nn.Embedding``, ``nn.LayerNorm``, RMSNorm by duck typing) splits that parameter's score over positions
(per-token scores). An ``nn.Embedding`` looked up with indices shared by the batch (a position table read with
``arange(T)``, shape ``[T]`` or ``[1, T]``) is split too: the capture broadcasts its output to the ``b`` examples
(:meth:`UseKind.per_example`), so each example's rows get their own gradient.
Nothing outside this file branches on a module's type.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..._types import Params
from ...functional import parameter_names as leaf_names
from ._kernels import TOKEN_BUDGET, layer_token_scores

__all__ = [
    "LayerSpec",
    "LayerKind",
    "layer_kind",
    "kind_of",
    "find_layers",
    "parameter_names",
    "use_kind",
    "UseKind",
    "NotSplittable",
    "is_rmsnorm",
]


class LayerSpec(NamedTuple):
    """A tracked layer: its module name, kind and the flat-vector layout of its parameters."""

    name: str  #: qualified module name
    kind: str  #: ``"linear"``, ``"conv2d"`` or ``"conv1d"``
    weight: str  #: qualified name of the weight parameter
    bias: str | None  #: qualified name of the tracked bias, or None
    out_features: int
    in_features: int  #: columns of the weight matrix (``in·kh·kw`` for conv), without the bias


def _positions_last(x: torch.Tensor) -> torch.Tensor:
    """``[b, ..., C] -> [b, T, C]`` (also for ``b = 0``, where ``reshape(0, -1, C)`` is ambiguous)."""
    return x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)


class LayerKind:
    """``nn.Linear``: ``a`` is the input, ``g`` the output gradient, the weight is already ``[out, in]``."""

    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        # nn.MultiheadAttention's out_proj: its weight is used functionally, the module is never called
        return isinstance(module, nn.Linear) and type(module).__name__ != "NonDynamicallyQuantizableLinear"

    def shape(self, weight: torch.Tensor) -> tuple[int, int]:
        """``(out, in)`` of the weight matrix."""
        return int(weight.shape[0]), int(weight[0].numel())

    def inputs(self, module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        """``a [b, T, in]`` from the module's (detached) input."""
        return _positions_last(x)

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """``g [b, T, out]`` from the gradient of the module's output."""
        return _positions_last(g)

    def to_matrix(self, W: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
        """Flat weight slices ``[k, numel]`` -> ``[k, out, in]``."""
        return W.reshape(W.shape[0], out_f, in_f)

    def from_matrix(self, M: torch.Tensor) -> torch.Tensor:
        """``[k, out, in]`` -> flat weight slices ``[k, numel]``."""
        return M.reshape(M.shape[0], -1)


class Conv1DKind(LayerKind):
    """GPT-2's ``Conv1D``: ``y = x W + b`` with ``W [in, out]`` (the transpose of ``nn.Linear``'s)."""

    name = "conv1d"

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2

    def shape(self, weight: torch.Tensor) -> tuple[int, int]:
        return int(weight.shape[1]), int(weight.shape[0])

    def to_matrix(self, W: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
        return W.reshape(W.shape[0], in_f, out_f).transpose(1, 2)

    def from_matrix(self, M: torch.Tensor) -> torch.Tensor:
        return M.transpose(1, 2).reshape(M.shape[0], -1)


class Conv2dKind(LayerKind):
    """``nn.Conv2d`` (groups 1, zero padding): ``a`` are the unfolded patches, ``g`` the output per location."""

    name = "conv2d"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"

    def inputs(self, module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"layer capture: Conv2d {name!r} needs [b, C, H, W] input, got {tuple(x.shape)}")
        assert isinstance(module, nn.Conv2d)  # this kind matches only nn.Conv2d (see matches)
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same": pad like PyTorch (extra on the right/bottom), then unfold without padding
                pads = []
                for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
                    total = dil * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
                padding = (0, 0)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2)  # [b, L, C·kh·kw] in the weight's column order

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)


_KINDS = (LayerKind(), Conv1DKind(), Conv2dKind())
KINDS = {k.name: k for k in _KINDS}


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The adapter of a supported layer, or None."""
    return next((k for k in _KINDS if k.matches(module)), None)


def kind_of(spec: LayerSpec) -> LayerKind:
    """The adapter of a tracked layer."""
    return KINDS[spec.kind]


def parameter_names(params: Params) -> list[str]:
    """:func:`ifunc.functional.parameter_names` of a dict of parameters (names map parameters to layers)."""
    if not isinstance(params, dict):
        raise TypeError(
            "the Kronecker family needs params as a dict name -> tensor from ifunc.params_of(model) (names "
            f"map parameters to layers); got {type(params).__name__}"
        )
    return leaf_names(params)


def find_layers(
    model: nn.Module, params: Params, *, modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None
) -> tuple[list[LayerSpec], list[str]]:
    """Match the tracked ``params`` to supported layers of ``model``.

    Args:
      model: the module the loss calls through :func:`ifunc.call`.
      params: dict name -> tensor (from :func:`ifunc.params_of`).
      modules: module names, or a predicate ``(name, module) -> bool``; default every supported module
        whose weight is in ``params``.

    Returns:
      ``(layers, uncovered)``: the layer specs, and the names of tracked parameters no layer covers.

    Raises:
      ValueError: a named module does not exist, is not supported, or holds no tracked weight.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model= must be the nn.Module the loss calls, got {type(model).__name__}")
    names = set(parameter_names(params))
    named = dict(model.named_modules())
    if modules is None:
        chosen = [n for n, m in named.items() if layer_kind(m) is not None]
    elif callable(modules):
        chosen = [n for n, m in named.items() if modules(n, m) and layer_kind(m) is not None]
    else:
        chosen = list(modules)
        if not chosen:
            raise ValueError(
                "modules=[] selects no layer; pass modules=None for every supported layer, or name the layers "
                f"(supported in this model: {[n for n, m in named.items() if layer_kind(m) is not None]})"
            )
        for n in chosen:
            if n not in named:
                raise ValueError(f"modules: no sub-module named {n!r}; available: {sorted(k for k in named if k)}")
            if layer_kind(named[n]) is None:
                raise ValueError(
                    f"modules: {n!r} is a {type(named[n]).__name__}, which the Kronecker family does not support "
                    "(supported: nn.Linear, nn.Conv2d with groups=1 and zero padding, GPT-2 Conv1D); leave it "
                    "out of modules= and its parameters get a diagonal block"
                )
    layers = []
    for n in chosen:
        m = named[n]
        prefix = f"{n}." if n else ""
        w = prefix + "weight"
        if w not in names:
            if modules is not None and not callable(modules):
                raise ValueError(f"modules: the weight {w!r} of {n!r} is not in params; track it or drop {n!r}")
            continue
        b = prefix + "bias"
        b = b if (b in names and getattr(m, "bias", None) is not None) else None
        kind = layer_kind(m)
        assert kind is not None  # every chosen module has a layer kind (filtered or refused above)
        assert isinstance(m.weight, torch.Tensor)  # supported layers hold their weight as a tensor
        out_f, in_f = kind.shape(m.weight)
        layers.append(LayerSpec(n, kind.name, w, b, out_f, in_f))
    covered = {s.weight for s in layers} | {s.bias for s in layers if s.bias}
    uncovered = [p for p in parameter_names(params) if p not in covered]
    return layers, uncovered


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
        if self.name == "embedding" and x.dim() == 1:
            return x.expand(b, *x.shape), y.expand(b, *y.shape)
        if b != 1 and x.dim() >= 2 and x.shape[0] == 1 and y.dim() >= 2 and y.shape[0] == 1:
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
