"""One adapter per layer kind: how a module's inputs ``a``, output-gradients ``g`` and weight matrix look.

For a layer ``y_t = W a_t (+ b)`` applied at positions ``t`` (tokens, conv patches, repeated calls), the
per-example weight gradient is ``DW = Σ_t g_t a_tᵀ`` in the weight-matrix layout ``[out, in]``. A *layer
kind* says how to read ``a [b, T, in]`` from the module's input, ``g [b, T, out]`` from the gradient of its
output, and how the flat parameter slice maps to ``[out, in]``. The examples may lie along any dimension but the
features' (``[batch, ..., in]``, or sequence-first ``[T, batch, in]``, e.g. ``nn.TransformerEncoderLayer(batch_first=
False)``): :mod:`ifunc.ihvp.kronecker.example_dims` finds it from the call shapes on one and two examples, and the
adapter moves it first (inputs and output gradients alike); an input without one (examples flattened with positions,
``x.reshape(b * T, d)``, or shared by the batch) is refused with :class:`ExampleDimError`. Supported: ``nn.Linear``,
``nn.Conv2d`` (``groups=1``, zero padding; inputs unfolded to patches) and GPT-2-style ``Conv1D`` (weight
``[in, out]``).

How a module holding a diagonal-block parameter splits it over positions (its *use kind*) is
:mod:`ifunc.ihvp.kronecker.uses`. Nothing outside these two files branches on a module's type.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..._types import Params
from ...functional import parameter_names as leaf_names

__all__ = [
    "LayerSpec",
    "LayerKind",
    "layer_kind",
    "kind_of",
    "find_layers",
    "dict_parameter_names",
    "LayerCaptureError",
    "ExampleDimError",
    "WeightUseError",
    "ExampleMixError",
]


class LayerCaptureError(ValueError):
    """A tracked layer whose captured ``a``, ``g`` would not give its per-example weight gradients."""


class ExampleDimError(LayerCaptureError):
    """A tracked layer's input has no dimension of the examples, or not ``b`` rows along it."""


class WeightUseError(LayerCaptureError):
    """A tracked weight's gradient is not ``Σ_t g_t a_tᵀ`` over its layer's calls: it is used elsewhere too."""


class ExampleMixError(LayerCaptureError):
    """Row ``i`` of a tracked layer's batched input is not example ``i`` alone: the model reorders or mixes examples."""


class LayerSpec(NamedTuple):
    """A tracked layer: its module name, kind and the flat-vector layout of its parameters."""

    name: str  #: qualified module name
    kind: str  #: ``"linear"``, ``"conv2d"`` or ``"conv1d"``
    weight: str  #: qualified name of the weight parameter
    bias: str | None  #: qualified name of the tracked bias, or None
    out_features: int
    in_features: int  #: columns of the weight matrix (``in·kh·kw`` for conv), without the bias
    #: dimension of the layer input (and output) that indexes the examples: 0 for ``[batch, ..., in]``, 1 for a
    #: sequence-first ``[T, batch, in]``; found by :func:`~ifunc.ihvp.kronecker.capture.probe_layers`; None while
    #: only one example has been seen (any dimension of size 1 then; settled on the first batch of two or more)
    batch_dim: int | None = 0
    #: the model modifies the layer's output in place after the call (``nn.ReLU(inplace=True)``): the capture hands
    #: it a copy, so the recorded output keeps the gradient of the layer's own result
    copy_output: bool = False


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

    def example_dims(self, ndim: int) -> tuple[int, ...]:
        """Dimensions of an ``ndim``-dimensional input that may index the examples (never the features)."""
        return tuple(range(ndim - 1))

    def inputs(self, module: nn.Module, x: torch.Tensor, name: str, dim: int = 0) -> torch.Tensor:
        """``a [b, T, in]`` from the module's (detached) input whose dimension ``dim`` indexes the examples."""
        return _positions_last(x.movedim(dim, 0))

    def output_grads(self, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``g [b, T, out]`` from the gradient of the module's output (examples along ``dim``, as the input)."""
        return _positions_last(g.movedim(dim, 0))

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

    def example_dims(self, ndim: int) -> tuple[int, ...]:
        return (0,) if ndim == 4 else ()

    def inputs(self, module: nn.Module, x: torch.Tensor, name: str, dim: int = 0) -> torch.Tensor:
        if x.dim() != 4 or dim != 0:
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

    def output_grads(self, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)


_KINDS = (LayerKind(), Conv1DKind(), Conv2dKind())
KINDS = {k.name: k for k in _KINDS}


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The adapter of a supported layer, or None."""
    return next((k for k in _KINDS if k.matches(module)), None)


def kind_of(spec: LayerSpec) -> LayerKind:
    """The adapter of a tracked layer."""
    return KINDS[spec.kind]


def dict_parameter_names(params: Params) -> list[str]:
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
    names = set(dict_parameter_names(params))
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
    uncovered = [p for p in dict_parameter_names(params) if p not in covered]
    return layers, uncovered
