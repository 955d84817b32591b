"""The one hook system of the Kronecker family: layer inputs ``a`` and output-gradients ``g`` from one forward.

During one batched forward, forward hooks record per tracked layer its inputs (read through the layer's
adapter, :mod:`.layers`) and outputs, and for any extra modules (the users of diagonal-block parameters,
for per-token scores) their input and output; one ``torch.autograd.grad`` then gives every ``g`` (and, when asked,
the gradients of chosen parameters from the same backward). The loss is summed over examples, so each example's
rows of ``g`` are its own gradients. Hooks are removed in ``finally``, also when the forward raises; the module is
never modified and ``.grad`` never written.

A layer whose output the model modifies in place afterwards (``nn.ReLU(inplace=True)``, ``h += x``) is marked by
the probe (:attr:`LayerSpec.copy_output`): its hook hands the model a copy of the output, so the recorded output
keeps the gradient of the layer's own result (``g`` before the in-place operation). An unmarked output modified in
place is refused (:meth:`Recording.check`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from ...functional import check_eval_mode
from .example_dims import settled_dim
from .layers import ExampleDimError, LayerCaptureError, LayerSpec, kind_of
from .uses import use_kind

__all__ = ["Recording", "layer_capture", "requiring_grad"]


class Recording:
    """What one forward pass recorded: per layer its inputs and outputs, per extra module its calls."""

    def __init__(self, layers: list[LayerSpec], extra: list[str], raw: bool = False):
        self.layers = layers
        self.raw = raw  #: inputs kept as called, read through the adapters by :meth:`settle` once the dims are known
        self.inputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in layers}
        self.outputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in layers}
        self.shapes: dict[str, list[tuple[int, ...]]] = {s.name: [] for s in layers}  #: input shapes, as called
        self.versions: dict[str, list[int]] = {s.name: [] for s in layers}  #: output versions right after the call
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in extra}
        self.param_grads: dict[str, torch.Tensor | None] = {}

    def modified_in_place(self) -> list[str]:
        """Layers whose (recorded) output was modified in place after the call."""
        return [
            s.name
            for s in self.layers
            if any(o._version != v for o, v in zip(self.outputs[s.name], self.versions[s.name]))
        ]

    def check(self) -> None:
        """Raise unless every tracked layer was called, its outputs depend on the parameters and kept their values."""
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
        changed = [] if self.raw else self.modified_in_place()
        if changed:
            raise LayerCaptureError(
                f"layer capture: the outputs of {changed} were modified in place after the call (e.g. by "
                "nn.ReLU(inplace=True) or h += x), which they were not when the layers were probed, so their output "
                "gradients would be taken after that operation; use inplace=False (or out-of-place h = h + x)"
            )

    def settle(self, layers: list[LayerSpec], named: dict[str, nn.Module]) -> None:
        """Read the raw inputs through the adapters with the example dims of ``layers`` (found after the forward)."""
        self.layers = layers
        for s in layers:
            kind = kind_of(s)
            self.inputs[s.name] = [
                kind.inputs(named[s.name], x, s.name, settled_dim(s, x, None)) for x in self.inputs[s.name]
            ]
        self.raw = False

    def positions(self, spec: LayerSpec) -> list[int]:
        """Positions per example of each call of a layer."""
        return [x.shape[1] for x in self.inputs[spec.name]]

    def activations(self, spec: LayerSpec, dtype=None) -> torch.Tensor:
        """``a`` as ``[b, T, in(+1)]`` (all calls concatenated along T; bias column of ones last), in ``dtype``;
        an embedding's token ids ``[b, T]`` (never cast)."""
        parts = self.inputs[spec.name]
        a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if spec.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return kind_of(spec).cast(a, dtype)

    def output_grads(
        self,
        root: torch.Tensor,
        grad_output: torch.Tensor | None = None,
        *,
        retain_graph: bool = True,
        wrt: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``g`` per layer ``[b, T, out]`` for the cotangent ``grad_output`` on ``root`` (a scalar loss if None).

        With extra modules, their output gradients are returned too, under ``"calls"`` of :meth:`call_grads`.
        ``wrt``: parameters (name -> leaf) whose gradients the same backward also gives, kept in :attr:`param_grads`.
        """
        flat = [o for s in self.layers for o in self.outputs[s.name]]
        extra = [y for m in self.calls for _, y in self.calls[m]]
        leaves = list((wrt or {}).values())
        grads = torch.autograd.grad(
            root, flat + extra + leaves, grad_outputs=grad_output, retain_graph=retain_graph, allow_unused=True
        )
        self.param_grads = dict(zip((wrt or {}).keys(), grads[len(flat) + len(extra) :]))
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(flat + extra, grads)]
        out, i = {}, 0
        for s in self.layers:
            kind = kind_of(s)
            parts = []
            for o in self.outputs[s.name]:
                parts.append(kind.output_grads(grads[i], settled_dim(s, o, None)))
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
    model: nn.Module,
    layers: list[LayerSpec],
    extra: Sequence[str] = (),
    *,
    examples: int | None = None,
    raw: bool = False,
    widen: Collection[str] = (),
) -> Iterator[Recording]:
    """Context manager: forward hooks on ``layers`` (and on the modules named in ``extra``) record inputs and
    outputs; removed on exit (also on error).

    ``examples=b``: every tracked layer's input must have ``b`` rows along its example dimension
    (:attr:`LayerSpec.batch_dim`), else :class:`ExampleDimError`; and (per-token scores) an ``extra``
    ``nn.Embedding`` named in ``widen`` (found looked up with indices shared by the batch, a position table read with
    ``arange(T)``) has its output broadcast to the ``b`` examples by the hook
    (:meth:`~ifunc.ihvp.kronecker.uses.UseKind.per_example`), so its recorded output gradient is per example; no other
    hook changes what the model computes. ``raw=True`` (the
    probe): inputs kept as called and no row check, for :meth:`Recording.settle` once the dims are found.

    Example:
      >>> with layer_capture(model, layers) as rec:
      ...     value = loss(params_requiring_grad, batch)
      >>> g = rec.output_grads(value)        # {name: [b, T, out]}
    """
    check_eval_mode(model, "Kronecker layer capture")  # before any forward: the model never changes
    named = dict(model.named_modules())
    rec = Recording(layers, list(extra), raw)
    handles = []

    def layer_hook(spec: LayerSpec):
        kind = kind_of(spec)

        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < kind.min_dims:
                shape = tuple(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else None
                raise ExampleDimError(
                    f"layer capture: {spec.name!r} got an input of shape {shape}, without an example dimension; the "
                    "Kronecker family needs batched inputs [batch, ..., features]: leave the layer out with modules= "
                    "(its parameters then get a diagonal block) or exclude= it"
                )
            x = inputs[0].detach()
            rec.shapes[spec.name].append(tuple(x.shape))
            rec.outputs[spec.name].append(output)
            rec.versions[spec.name].append(output._version)
            if raw:
                rec.inputs[spec.name].append(x)
                return output.clone() if spec.copy_output else None
            dim = settled_dim(spec, x, examples)
            if examples is not None and (x.dim() <= dim or x.shape[dim] != examples):
                rows = x.shape[dim] if x.dim() > dim else "no"
                raise ExampleDimError(
                    f"layer capture: {spec.name!r} got an input of shape {tuple(x.shape)} with {rows} rows along "
                    f"dimension {dim}, its example dimension (found when the factors or the closure were built), not "
                    f"the {examples} examples of the batch; keep the examples along one dimension of the same place "
                    "in every batch ([batch, ...]), or leave the layer out with modules= (a diagonal block) or exclude="
                )
            rec.inputs[spec.name].append(kind.inputs(module, x, spec.name, dim))
            return output.clone() if spec.copy_output else None  # the model modifies the copy in place

        return hook

    def call_hook(name: str):
        split = use_kind(named[name])

        def hook(module, inputs, output):
            x = inputs[0].detach()
            wide = (
                None
                if split is None or examples is None or name not in widen
                else split.per_example(x, output, examples)
            )
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
