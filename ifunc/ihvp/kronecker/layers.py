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

__all__ = ["LayerSpec", "LayerKind", "layer_kind", "kind_of", "find_layers", "parameter_names"]


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
