"""The one hook system of the Kronecker family: layer inputs ``a`` and output-gradients ``g`` from one forward.

During one batched forward, forward hooks record per tracked layer its inputs (read through the layer's
adapter, :mod:`.layers`) and outputs, and for any extra modules (the users of diagonal-block parameters,
for per-token scores) their input and output; one ``torch.autograd.grad`` then gives every ``g``. The loss
is summed over examples, so each example's rows of ``g`` are its own gradients. Hooks are removed in
``finally``, also when the forward raises; the module is never modified and ``.grad`` never written.

Which dimension of a layer's input indexes the examples is found once per fit or closure by
:func:`probe_layers` (the dimension whose size is 1 with one example and 2 with two: 0 for ``[batch, ..., in]``,
1 for a sequence-first ``[T, batch, in]``), carried in :attr:`LayerSpec.batch_dim`, and checked at every capture
(exactly ``b`` rows for a batch of ``b`` examples). The same probe checks that each tracked weight's gradient is
``Σ_t g_t a_tᵀ`` over the captured calls, so a weight also used elsewhere (tied, functional, a custom ``forward``)
is refused rather than given a wrong block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..._data import batch_size, slice_batch
from ..._types import Batch, LossFn, Params
from ...functional import check_eval_mode
from ...grads import check_scalar
from .layers import ExampleDimError, LayerCaptureError, LayerSpec, example_dim, find_layers, kind_of
from .uses import use_kind

__all__ = [
    "Recording",
    "layer_capture",
    "capture_layer_grads",
    "requiring_grad",
    "probe_layers",
    "LayerCaptureError",
    "ExampleDimError",
    "WeightUseError",
]


class WeightUseError(LayerCaptureError):
    """A tracked weight's gradient is not ``Σ_t g_t a_tᵀ`` over its layer's calls: it is used elsewhere too."""


class Recording:
    """What one forward pass recorded: per layer its inputs and outputs, per extra module its calls."""

    def __init__(self, layers: list[LayerSpec], extra: list[str]):
        self.layers = layers
        self.inputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in layers}
        self.outputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in layers}
        self.shapes: dict[str, list[tuple[int, ...]]] = {s.name: [] for s in layers}  #: input shapes, as called
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in extra}

    def check(self) -> None:
        """Raise unless every tracked layer was called and its outputs depend on the parameters."""
        silent = [s.name for s in self.layers if not self.outputs[s.name]]
        if silent:
            raise ValueError(
                f"layer capture: modules {silent} were not called by the loss; pass as model= the module "
                "that the loss runs through ifunc.call(model, params, ...)"
            )
        for s in self.layers:
            if any(not o.requires_grad for o in self.outputs[s.name]):
                raise ValueError(f"layer capture: the output of {s.name!r} does not depend on params")
        for m, calls in self.calls.items():
            if any(not y.requires_grad for _, y in calls):
                raise ValueError(f"layer capture: the output of {m!r} does not depend on params")

    def positions(self, spec: LayerSpec) -> list[int]:
        """Positions per example of each call of a layer."""
        return [x.shape[1] for x in self.inputs[spec.name]]

    def activations(self, spec: LayerSpec, dtype=None) -> torch.Tensor:
        """``a`` as ``[b, T, in(+1)]`` (all calls concatenated along T; bias column of ones last)."""
        parts = self.inputs[spec.name]
        a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if spec.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a if dtype is None else a.to(dtype)

    def output_grads(
        self, root: torch.Tensor, grad_output: torch.Tensor | None = None, *, retain_graph: bool = True
    ) -> dict[str, torch.Tensor]:
        """``g`` per layer ``[b, T, out]`` for the cotangent ``grad_output`` on ``root`` (a scalar loss if None).

        With extra modules, their output gradients are returned too, under ``"calls"`` of :meth:`call_grads`.
        """
        flat = [o for s in self.layers for o in self.outputs[s.name]]
        extra = [y for m in self.calls for _, y in self.calls[m]]
        grads = torch.autograd.grad(
            root, flat + extra, grad_outputs=grad_output, retain_graph=retain_graph, allow_unused=True
        )
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(flat + extra, grads)]
        out, i = {}, 0
        for s in self.layers:
            kind = kind_of(s)
            parts = []
            for _ in self.outputs[s.name]:
                parts.append(kind.output_grads(grads[i], s.batch_dim))
                i += 1
            out[s.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        self._call_grads = {}
        for m in self.calls:
            self._call_grads[m] = []
            for x, y in self.calls[m]:
                self._call_grads[m].append((x, y.detach(), grads[i]))
                i += 1
        return out

    def call_grads(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per extra module, ``[(input, output, output gradient)]`` of each call (after :meth:`output_grads`)."""
        return self._call_grads


@contextlib.contextmanager
def layer_capture(
    model: nn.Module, layers: list[LayerSpec], extra: Sequence[str] = (), *, examples: int | None = None
) -> Iterator[Recording]:
    """Context manager: forward hooks on ``layers`` (and on the modules named in ``extra``) record inputs and
    outputs; removed on exit (also on error).

    ``examples=b``: every tracked layer's input must have ``b`` rows along its example dimension
    (:attr:`LayerSpec.batch_dim`), else :class:`ExampleDimError`; and (per-token scores) an ``extra`` module called
    on inputs shared by the batch (a position embedding of ``arange(T)``) has its output broadcast to the ``b``
    examples by the hook (see :meth:`~ifunc.ihvp.kronecker.uses.UseKind.per_example`), so its recorded output
    gradient is per example.

    Example:
      >>> with layer_capture(model, layers) as rec:
      ...     value = loss(params_requiring_grad, batch)
      >>> g = rec.output_grads(value)        # {name: [b, T, out]}
    """
    check_eval_mode(model, "Kronecker layer capture")  # before any forward: the model never changes
    named = dict(model.named_modules())
    rec = Recording(layers, list(extra))
    handles = []

    def layer_hook(spec: LayerSpec):
        kind = kind_of(spec)

        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
                shape = tuple(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else None
                raise ExampleDimError(
                    f"layer capture: {spec.name!r} got an input of shape {shape}, without an example dimension; the "
                    "Kronecker family needs batched inputs [batch, ..., features]: leave the layer out with modules= "
                    "(its parameters then get a diagonal block) or exclude= it"
                )
            x, dim = inputs[0].detach(), spec.batch_dim
            rec.shapes[spec.name].append(tuple(x.shape))
            if examples is not None and (x.dim() <= dim or x.shape[dim] != examples):
                rows = x.shape[dim] if x.dim() > dim else "no"
                raise ExampleDimError(
                    f"layer capture: {spec.name!r} got an input of shape {tuple(x.shape)} with {rows} rows along "
                    f"dimension {dim}, its example dimension (found when the factors or the closure were built), not "
                    f"the {examples} examples of the batch; keep the examples along one dimension of the same place "
                    "in every batch ([batch, ...]), or leave the layer out with modules= (a diagonal block) or exclude="
                )
            rec.inputs[spec.name].append(kind.inputs(module, x, spec.name, dim))
            rec.outputs[spec.name].append(output)

        return hook

    def call_hook(name: str):
        split = use_kind(named[name])

        def hook(module, inputs, output):
            x = inputs[0].detach()
            wide = None if examples is None or split is None else split.per_example(x, output, examples)
            if wide is not None:
                x, output = wide[0], wide[1]
            rec.calls[name].append((x, output))
            return output if wide is not None else None

        return hook

    try:
        for spec in layers:
            handles.append(named[spec.name].register_forward_hook(layer_hook(spec)))
        for name in extra:
            handles.append(named[name].register_forward_hook(call_hook(name)))
        yield rec
    finally:
        for h in handles:
            h.remove()


def requiring_grad(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaves sharing storage with ``params`` that require grad (so layer outputs join the graph)."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def capture_layer_grads(
    loss: LossFn, params: Params, batch: Batch, *, model: nn.Module, modules=None
) -> dict[str, torch.Tensor]:
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
    if not layers:
        return {}
    layers = probe_layers(loss, params, model, layers, batch)
    p = requiring_grad(params)
    with layer_capture(model, layers, examples=batch_size(batch)) as rec, torch.enable_grad():
        value = loss(p, batch)
    rec.check()
    gs = rec.output_grads(value, retain_graph=False)
    return {s.name: torch.einsum("bto,bti->boi", gs[s.name], rec.activations(s, gs[s.name].dtype)) for s in layers}


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a captured gradient against autograd's: rounding of two summation orders."""
    return min(0.05, 10 * torch.finfo(dtype).eps ** 0.5)


def _owners(model: nn.Module, spec: LayerSpec) -> list[str]:
    named = dict(model.named_modules())
    weight = getattr(named[spec.name], "weight", None)
    return [f"{mn}.{pn}" if mn else pn for mn, m in named.items() for pn, q in m._parameters.items() if q is weight]


def probe_layers(
    loss: LossFn, params: Params, model: nn.Module, layers: list[LayerSpec], batch: Batch
) -> list[LayerSpec]:
    """The layers with their example dimension found, after checking their weights are used only by their calls.

    Runs the loss on the first one and two examples of ``batch``: the example dimension of a layer's input is the
    one whose size is 1 and then 2 (the others unchanged). Then, on those examples, each tracked weight's (and
    bias's) gradient from autograd must equal ``Σ_{i,t} g_{i,t} a_{i,t}ᵀ`` from the capture to a relative
    tolerance of the dtype, ``min(0.05, 10 √eps)`` of ``max(‖∇W‖, Σ ‖g‖‖a‖)``; it differs when the weight is also
    used outside the layer's calls: tied to another module (also a tie :func:`ifunc.params_of` de-duplicated), read
    functionally (``F.linear(x, fc.weight)``), or a subclass overriding ``forward``.

    Raises:
      ExampleDimError: a layer's input has no example dimension (examples flattened with positions, an input
        shared by the batch), with the shapes seen.
      WeightUseError: a tracked weight is used outside its layer's calls, naming the layer and the other holders.
    """
    if not layers:
        return []
    b = batch_size(batch)
    shapes = []
    for k in (1, 2) if b >= 2 else (1,):
        p = requiring_grad(params)
        with layer_capture(model, [s._replace(batch_dim=0) for s in layers]) as rec, torch.enable_grad():
            loss(p, slice_batch(batch, 0, k))
        rec.check()  # every layer called, its output depending on params
        shapes.append(rec.shapes)
    two = shapes[1] if len(shapes) == 2 else {}
    layers = [s._replace(batch_dim=example_dim(s, shapes[0][s.name], two.get(s.name))) for s in layers]
    k = len(shapes)
    p = requiring_grad(params)
    with layer_capture(model, layers, examples=k) as rec, torch.enable_grad():
        value = check_scalar(loss(p, slice_batch(batch, 0, k)))
    rec.check()
    names = [n for s in layers for n in (s.weight, s.bias) if n]
    auto = dict(zip(names, torch.autograd.grad(value, [p[n] for n in names], retain_graph=True, allow_unused=True)))
    gs = rec.output_grads(value, retain_graph=False)
    for s in layers:
        g = gs[s.name]
        a = rec.activations(s, g.dtype)
        got = torch.einsum("bto,bti->oi", g, a)
        w = auto[s.weight]
        ref = (
            torch.zeros_like(got[:, : s.in_features])
            if w is None
            else kind_of(s).to_matrix(w.reshape(1, -1), s.out_features, s.in_features)[0]
        )
        if s.bias is not None:
            bias = auto[s.bias]
            ref = torch.cat([ref, got.new_zeros(s.out_features, 1) if bias is None else bias.reshape(-1, 1)], dim=1)
        if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
            continue  # the passes raise on non-finite gradients, naming the example
        scale = max(float(ref.norm()), float((g.norm(dim=-1) * a.norm(dim=-1)).sum()))
        err = float((got - ref).norm())
        if err > _tolerance(g.dtype) * scale + torch.finfo(g.dtype).tiny:
            holders = _owners(model, s)
            raise WeightUseError(
                f"layer capture: the gradient of {s.weight!r} is not the sum over the calls of {s.name!r} of "
                f"g_t a_tᵀ (relative difference {err / max(scale, torch.finfo(g.dtype).tiny):.2g}): the weight is used "
                f"outside this module's calls — tied to another module (it is held by {holders}), read functionally "
                f"(e.g. F.linear(x, {s.name}.weight)), or {type(dict(model.named_modules())[s.name]).__name__} "
                "overrides forward. Leave the layer out of the Kronecker blocks with modules= (its parameters then get "
                f"a diagonal block, which is exact for any use) or exclude=[{s.name!r}]"
            )
    return layers
