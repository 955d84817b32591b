"""Layer capture for the Kronecker family: layer inputs ``a`` and output-gradients ``g``.

For a layer ``y_t = W a_t (+ b)`` applied at positions ``t`` (tokens, conv patches, repeated calls), the
gradient of the loss of one example with respect to ``W`` is ``Σ_t g_t a_tᵀ`` with ``g_t = ∂ℓ/∂y_t``; a
bias is handled by appending a constant 1 to ``a``. Capture records, per chosen module, ``a`` as
``[b, T, in(+1)]`` and ``g`` as ``[b, T, out]`` during one batched forward and one ``torch.autograd.grad``
call (the loss is summed over examples, so each example's rows of ``g`` are its own gradients).

Supported layers: ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero padding; inputs unfolded to patches)
and GPT-2-style ``Conv1D`` (a module of that class name with ``weight`` ``[in, out]``). The ``out_proj`` of
``nn.MultiheadAttention`` is not a layer here (attention uses its weight without calling it): like the
fused input projection it gets a diagonal block. Hooks are removed
in ``finally``, also when the forward raises; the module is never modified and ``.grad`` never written.
Dimension 0 of every layer input must be the example dimension.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import nn

from ._types import Batch, LossFn, Params

__all__ = ["LayerSpec", "find_layers", "layer_capture", "capture_layer_grads", "param_names"]


class LayerSpec(NamedTuple):
    """A tracked layer: its module name, kind and the flat-vector layout of its parameters."""

    name: str  #: qualified module name
    kind: str  #: ``"linear"``, ``"conv2d"`` or ``"conv1d"``
    weight: str  #: qualified name of the weight parameter
    bias: str | None  #: qualified name of the tracked bias, or None
    out_features: int
    in_features: int  #: columns of the weight matrix (``in·kh·kw`` for conv), without the bias


def _kind(module: nn.Module) -> str | None:
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return None  # nn.MultiheadAttention's out_proj: its weight is used functionally, the module never called
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None
        return "conv2d"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return "conv1d"
    return None


def param_names(params: Params) -> list[str]:
    """Parameter names in the flat order of :func:`ifunc.flatten` (optree sorts dict keys)."""
    if not isinstance(params, dict):
        raise TypeError(
            "the Kronecker family needs params as a dict name -> tensor from ifunc.params_of(model) (names "
            f"map parameters to layers); got {type(params).__name__}"
        )
    return [".".join(str(k) for k in path) for path in optree.tree_paths(params, namespace="ifunc")]


def find_layers(model: nn.Module, params: Params, *,
                modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None
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
    names = set(param_names(params))
    named = dict(model.named_modules())
    if modules is None:
        chosen = [n for n, m in named.items() if _kind(m) is not None]
    elif callable(modules):
        chosen = [n for n, m in named.items() if modules(n, m) and _kind(m) is not None]
    else:
        chosen = list(modules)
        for n in chosen:
            if n not in named:
                raise ValueError(f"modules: no sub-module named {n!r}; available: {sorted(k for k in named if k)}")
            if _kind(named[n]) is None:
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
        kind = _kind(m)
        W = m.weight
        if kind == "conv1d":
            out_f, in_f = W.shape[1], W.shape[0]
        else:
            out_f, in_f = W.shape[0], W[0].numel()
        layers.append(LayerSpec(n, kind, w, b, int(out_f), int(in_f)))
    covered = {s.weight for s in layers} | {s.bias for s in layers if s.bias}
    uncovered = [p for p in param_names(params) if p not in covered]
    return layers, uncovered


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv2d input ``[b, C, H, W]`` -> patches ``[b, L, C·kh·kw]`` in the weight's column order."""
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
    return cols.transpose(1, 2)


class Recording:
    """What one forward pass recorded: per layer, the inputs and the outputs of every call."""

    def __init__(self, layers: list[LayerSpec]):
        self.layers = layers
        self.inputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in layers}
        self.outputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in layers}

    def check(self) -> None:
        silent = [s.name for s in self.layers if not self.outputs[s.name]]
        if silent:
            raise ValueError(
                f"layer capture: modules {silent} were not called by the loss; pass as model= the module "
                "that the loss runs through ifunc.call(model, params, ...)"
            )
        for s in self.layers:
            if any(not o.requires_grad for o in self.outputs[s.name]):
                raise ValueError(f"layer capture: the output of {s.name!r} does not depend on params")

    def activations(self, spec: LayerSpec, dtype=None) -> torch.Tensor:
        """``a`` as ``[b, T, in(+1)]`` (all calls concatenated along T; bias column of ones last)."""
        parts = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in self.inputs[spec.name]]
        a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if spec.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a if dtype is None else a.to(dtype)

    def output_grads(self, root: torch.Tensor, grad_output: torch.Tensor | None = None, *,
                     retain_graph: bool = True) -> dict[str, torch.Tensor]:
        """``g`` per layer ``[b, T, out]`` for the cotangent ``grad_output`` on ``root`` (a scalar loss if None)."""
        flat = [o for s in self.layers for o in self.outputs[s.name]]
        grads = torch.autograd.grad(root, flat, grad_outputs=grad_output, retain_graph=retain_graph,
                                    allow_unused=True)
        out, i = {}, 0
        for s in self.layers:
            parts = []
            for o in self.outputs[s.name]:
                g = grads[i] if grads[i] is not None else torch.zeros_like(o)
                i += 1
                if s.kind == "conv2d":
                    g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
                parts.append(g.reshape(g.shape[0], -1, g.shape[-1]))
            out[s.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out


@contextlib.contextmanager
def layer_capture(model: nn.Module, layers: list[LayerSpec]) -> Iterator[Recording]:
    """Context manager: forward hooks on ``layers`` record inputs and outputs; removed on exit (also on error).

    Example:
      >>> with layer_capture(model, layers) as rec:
      ...     value = loss(params_requiring_grad, batch)
      >>> g = rec.output_grads(value)        # {name: [b, T, out]}
    """
    named = dict(model.named_modules())
    rec = Recording(layers)
    handles = []

    def make_hook(spec: LayerSpec):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
                raise ValueError(
                    f"layer capture: {spec.name!r} got an input without a leading example dimension; the "
                    "Kronecker family needs batched inputs [batch, ..., features]"
                )
            x = inputs[0].detach()
            if spec.kind == "conv2d":
                if x.dim() != 4:
                    raise ValueError(
                        f"layer capture: Conv2d {spec.name!r} needs [b, C, H, W] input, got {tuple(x.shape)}"
                    )
                x = _patches(module, x)
            rec.inputs[spec.name].append(x)
            rec.outputs[spec.name].append(output)

        return hook

    try:
        for spec in layers:
            handles.append(named[spec.name].register_forward_hook(make_hook(spec)))
        yield rec
    finally:
        for h in handles:
            h.remove()


def requiring_grad(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaves sharing storage with ``params`` that require grad (so layer outputs join the graph)."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def capture_layer_grads(loss: LossFn, params: Params, batch: Batch, *, model: nn.Module,
                        modules=None) -> dict[str, torch.Tensor]:
    """Per-example weight gradients of chosen layers from one captured forward/backward.

    ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` with ``g = ∂ loss/∂(layer output)``, ``a`` the layer input (a 1
    appended when the bias is tracked). Equal to ``torch.func`` per-sample gradients of those parameters
    (for models whose examples do not interact in the forward pass).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch, calling ``model`` via :func:`ifunc.call`.
      params: dict from :func:`ifunc.params_of`.
      batch: one batch.
      model: the module the loss calls.
      modules: module names or predicate (default: every supported layer with a tracked weight).

    Returns:
      ``{module_name: [b, out, in(+1)]}`` in the weight matrix layout (Conv2d: ``in·kh·kw`` columns;
      Conv1D: ``[out, in]``, the transpose of its stored weight).
    """
    layers, _ = find_layers(model, params, modules=modules)
    p = requiring_grad(params)
    with layer_capture(model, layers) as rec:
        value = loss(p, batch)
    rec.check()
    gs = rec.output_grads(value, retain_graph=False)
    return {s.name: torch.einsum("bto,bti->boi", gs[s.name], rec.activations(s, gs[s.name].dtype))
            for s in layers}
