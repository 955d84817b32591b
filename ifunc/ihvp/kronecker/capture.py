"""Whether the captured ``a``, ``g`` tell the truth: example dimensions and weight uses, checked once per callable.

The hooks (:mod:`.hooks`) record each tracked layer's inputs and output-gradients. They give the per-example weight
gradients ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` only when (1) the example dimension of the layer's input is known (0 for
``[batch, ..., in]``, 1 for a sequence-first ``[T, batch, in]``), (2) the weight is used only by the layer's calls
(not tied to another module, read functionally, or used by a custom ``forward``), and (3) row ``i`` of the batched
input is example ``i`` alone (the model neither reorders nor mixes the examples). :func:`probe_layers` checks all
three on the first two examples of the data (across batch boundaries) for one callable (a loss or a measurement);
the result, a :class:`UseCheck`, is kept by the fit and by the closure, one per callable.

A layer whose gradient is exactly zero on the probed examples (fully padded sequences, all labels ``-100``) gives
no evidence: it stays *pending*, and every later capture with the same callable checks the sum identity
``Σ_{i,t} g a_tᵀ = ∇_W`` from its own backward (the weight's gradient is one more output of the same
``autograd.grad``) and probes again on the first examples of the chunk that carry a gradient. A layer pending through
all the data has ``g = 0`` and ``∇_W = 0`` on every example: both the captured and the true contributions are zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ..._batches import batch_size, index_batch, slice_batch
from ..._types import Batch, LossFn, Params
from ...grads import check_scalar
from .example_dims import example_dim
from .hooks import Recording, layer_capture, requiring_grad
from .layers import ExampleDimError, ExampleMixError, LayerCaptureError, LayerSpec, WeightUseError, find_layers, kind_of

__all__ = [
    "Recording",
    "layer_capture",
    "capture_layer_grads",
    "requiring_grad",
    "probe_layers",
    "UseCheck",
    "LayerCaptureError",
    "ExampleDimError",
    "WeightUseError",
    "ExampleMixError",
]


def sum_tolerance(dtype: torch.dtype, terms: int) -> float:
    """Relative tolerance (of ``Σ_t ‖g_t‖‖a_t‖``) of two summation orders of the same ``terms`` products ``g_t a_tᵀ``.

    Each entry of ``Σ_t g_t a_tᵀ`` is a sum of ``terms`` products; two orders of it differ by about ``√terms · eps``
    of ``Σ_t |g_t||a_t|`` (``terms · eps`` at worst), so ``‖Δ‖_F ≤ c √terms eps Σ_t ‖g_t‖‖a_t‖`` with slack ``c = 64``
    (at most 0.05, for half precision). Measured: 0 for ``nn.Linear`` in float32 (both are the same matrix product)
    up to 1024 features, 8192 positions and activations of 1e4; 0.01 of the bound for a 128-channel ``nn.Conv2d``.
    """
    return min(0.05, 64 * torch.finfo(dtype).eps * max(1, terms) ** 0.5)


def mix_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of one example's gradient in a batch of two against its own: two forwards' rounding."""
    return min(0.05, 10 * torch.finfo(dtype).eps ** 0.5)


def _owners(model: nn.Module, spec: LayerSpec) -> list[str]:
    named = dict(model.named_modules())
    weight = getattr(named[spec.name], "weight", None)
    return [f"{mn}.{pn}" if mn else pn for mn, m in named.items() for pn, q in m._parameters.items() if q is weight]


def _as_matrix(spec: LayerSpec, grads: dict, like: torch.Tensor) -> torch.Tensor:
    """The autograd gradients of a layer's weight (and bias) as ``[out, in(+1)]`` (zeros where unused)."""
    w = grads.get(spec.weight)
    if w is not None and w.is_sparse:  # nn.Embedding(sparse=True)
        w = w.to_dense()
    ref = (
        like.new_zeros(spec.out_features, spec.in_features)
        if w is None
        else kind_of(spec).to_matrix(w.reshape(1, -1).to(like.dtype), spec.out_features, spec.in_features)[0]
    )
    if spec.bias is not None:
        bias = grads.get(spec.bias)
        ref = torch.cat([ref, like.new_zeros(spec.out_features, 1) if bias is None else bias.reshape(-1, 1)], dim=1)
    return ref


def _sum_check(model: nn.Module, spec: LayerSpec, g: torch.Tensor, a: torch.Tensor, grads: dict) -> bool:
    """Raise :class:`WeightUseError` unless ``Σ_{i,t} g a_tᵀ`` is the weight's gradient; True when it is not all 0."""
    kind = kind_of(spec)  # all positions of all examples as the positions of one example: the summed gradient
    got = kind.contract(g.flatten(0, 1).unsqueeze(0), a.flatten(0, 1).unsqueeze(0), spec.columns)[0]
    ref = _as_matrix(spec, grads, got)
    if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
        return False  # the passes raise on non-finite gradients, naming the example
    scale = float((g.norm(dim=-1) * kind.input_norms(a)).sum())
    err, tiny = float((got - ref).norm()), torch.finfo(g.dtype).tiny
    if err > sum_tolerance(g.dtype, g.shape[0] * g.shape[1]) * scale + tiny:
        raise WeightUseError(
            f"layer capture: the gradient of {spec.weight!r} is not the sum over the calls of {spec.name!r} of "
            f"g_t a_tᵀ (difference {err:.3g}, {err / max(scale, tiny):.2g} of Σ‖g_t‖‖a_t‖): the weight is used "
            f"outside this module's calls — tied to another module (it is held by {_owners(model, spec)}), read "
            f"functionally (e.g. F.linear(x, {spec.name}.weight)), or "
            f"{type(dict(model.named_modules())[spec.name]).__name__} overrides forward. Leave the layer out of the "
            "Kronecker blocks with modules= (its parameters then get a diagonal block, which is exact for any use) or "
            f"exclude=[{spec.name!r}]"
        )
    return scale > 0 or float(ref.norm()) > 0


def _mix_check(spec: LayerSpec, g0: torch.Tensor, a0: torch.Tensor, own: dict) -> None:
    """Raise :class:`ExampleMixError` unless row 0 of a batch of two gives example 0's own gradient ``own``."""
    kind = kind_of(spec)
    got = kind.contract(g0, a0, spec.columns)[0]
    ref = _as_matrix(spec, own, got)
    if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
        return
    scale = max(float(ref.norm()), float((g0.norm(dim=-1) * kind.input_norms(a0)).sum()))
    err, tiny = float((got - ref).norm()), torch.finfo(g0.dtype).tiny
    if err > mix_tolerance(g0.dtype) * scale + tiny:
        raise ExampleMixError(
            f"layer capture: in a batch of two examples, the rows of {spec.name!r}'s input and output gradient "
            f"along the example dimension do not give the first example's own gradient of {spec.weight!r} "
            f"(relative difference {err / max(scale, tiny):.2g}): the model reorders the examples (sorts or "
            "buckets the batch) or lets them interact (batch statistics, attention across the batch) before this "
            "layer, so per-example gradients are not rows of the captured a and g. Keep the examples in order and "
            "apart up to the tracked layers, leave the layer out with modules= (its parameters then get a diagonal "
            f"block from per-example gradients) or exclude=[{spec.name!r}]"
        )


def _probe(
    loss: LossFn, params: Params, model: nn.Module, layers: list[LayerSpec], batch: Batch, *, keep_dims: bool = False
) -> tuple[list[LayerSpec], set[str]]:
    """``(layers with dims and copy flags, names of the layers with a gradient)`` from the first 1–2 examples."""
    k = min(2, batch_size(batch))
    named = dict(model.named_modules())
    names = [n for s in layers for n in (s.weight, s.bias) if n]
    p = requiring_grad(params)  # one example: its call shapes, outputs changed in place, its own weight gradients
    with layer_capture(model, [s._replace(copy_output=False) for s in layers], raw=True) as rec, torch.enable_grad():
        value = check_scalar(loss(p, slice_batch(batch, 0, 1)))
    rec.check()
    one, inplace = rec.shapes, set(rec.modified_in_place())
    own = dict(zip(names, torch.autograd.grad(value, [p[n] for n in names], allow_unused=True))) if k == 2 else {}
    layers = [s._replace(copy_output=s.name in inplace) for s in layers]
    p = requiring_grad(params)
    with layer_capture(model, layers, raw=True) as rec, torch.enable_grad():
        value = check_scalar(loss(p, slice_batch(batch, 0, k)))
    rec.check()
    two = rec.shapes if k == 2 else None
    dims = {s.name: example_dim(s, one[s.name], None if two is None else two[s.name]) for s in layers}
    layers = [s._replace(batch_dim=s.batch_dim if keep_dims and k == 1 else dims[s.name]) for s in layers]
    rec.settle(layers, named)
    gs = rec.output_grads(value, retain_graph=False, wrt={n: p[n] for n in names})
    verified = set()
    for s in layers:
        g = gs[s.name]
        a = rec.activations(s, g.dtype)
        if _sum_check(model, s, g, a, rec.param_grads):
            verified.add(s.name)
        if k == 2:
            _mix_check(s, g[:1], a[:1], own)
    return layers, verified


class UseCheck:
    """What is known of one callable's use of the tracked layers; kept by the fit and by the closure per callable.

    ``layers``: the specs with their example dims (None: one example seen so far) and copy flags; ``pending``: the
    layers not yet seen with a gradient (see the module docstring); ``func``: the callable (kept so that its ``id``,
    the closure's key, is not reused); ``uses``: for per-token scores, the diagonal-block uses shared by the batch
    (None until their call shapes were checked on two examples).
    """

    def __init__(self, func, layers: list[LayerSpec], pending: set[str]):
        self.func = func
        self.layers = layers
        self.pending = pending
        self.uses: set[str] | None = None

    def wrt(self, p: Params) -> dict[str, torch.Tensor]:
        """The leaves (of ``p``) of the pending layers' weights and biases: their gradients check the capture."""
        return {n: p[n] for s in self.layers if s.name in self.pending for n in (s.weight, s.bias) if n}

    def ready(self, loss: LossFn, params: Params, model: nn.Module, batch: Batch) -> None:
        """Settle the example dims found on one example on the first batch of two or more."""
        if batch_size(batch) > 1 and any(s.batch_dim is None for s in self.layers):
            self.layers, verified = _probe(loss, params, model, self.layers, batch)
            self.pending -= verified

    def observe(self, loss: LossFn, params: Params, model: nn.Module, batch: Batch, rec: Recording, parts) -> None:
        """Check the pending layers on a captured chunk: ``parts = {name: (a, g)}``, ``rec.param_grads`` from
        :meth:`wrt`. The sum identity from the chunk's own backward, then a probe on its first examples with a
        gradient."""
        if not self.pending:
            return
        signal = None
        for s in self.layers:
            if s.name in self.pending:
                a, g = parts[s.name]
                a = kind_of(s).cast(a, g.dtype)
                _sum_check(model, s, g, a, rec.param_grads)
                w = (g.norm(dim=-1) * kind_of(s).input_norms(a)).sum(1)
                signal = w if signal is None else signal + w
        if signal is None or not bool((signal > 0).any()):
            return
        i = int(torch.nonzero(signal > 0)[0, 0])
        pick = [i] if len(signal) == 1 else [i, i + 1 if i + 1 < len(signal) else i - 1]
        self.layers, verified = _probe(
            loss, params, model, self.layers, index_batch(batch, torch.tensor(pick)), keep_dims=True
        )
        self.pending -= verified


def probe_layers(loss: LossFn, params: Params, model: nn.Module, layers: list[LayerSpec], batch: Batch) -> UseCheck:
    """Check how ``loss`` uses the tracked ``layers`` on the first two examples of ``batch`` (one if it holds one).

    * The example dimension of a layer's input is the one whose size is 1 with one example and 2 with two (the
      others unchanged); with one example it stays undecided (:meth:`UseCheck.ready` settles it later).
    * A layer whose output the model modifies in place afterwards is marked :attr:`LayerSpec.copy_output`.
    * Each tracked weight's (and bias's) gradient from autograd must equal ``Σ_{i,t} g_{i,t} a_{i,t}ᵀ`` from the same
      backward, to the rounding of two summation orders (:func:`sum_tolerance`); it differs when the weight is also
      used outside the layer's calls.
    * Row 0 of the two-example capture, ``Σ_t g_{0,t} a_{0,t}ᵀ``, must equal the first example's own gradient (one
      example's forward), to :func:`mix_tolerance`; it differs when the model reorders or mixes the examples.

    Raises:
      ExampleDimError: a layer's input has no example dimension, with the shapes seen.
      WeightUseError: a tracked weight is used outside its layer's calls, naming the layer and the other holders.
      ExampleMixError: the rows of a layer's input are not the examples of the batch, in order and apart.
    """
    if not layers:
        return UseCheck(loss, [], set())
    layers, verified = _probe(loss, params, model, layers, batch)
    return UseCheck(loss, layers, {s.name for s in layers} - verified)


def capture_layer_grads(
    loss: LossFn, params: Params, batch: Batch, *, model: nn.Module, modules=None
) -> dict[str, torch.Tensor]:
    """Per-example weight gradients of chosen layers from one captured forward/backward.

    ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` with ``g = ∂ loss/∂(layer output)``, ``a`` the layer input (a 1
    appended when the bias is tracked). Equal to ``torch.func`` per-sample gradients of those parameters;
    :func:`probe_layers` refuses models where they would not be (weights used elsewhere, examples reordered or mixed).

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch, calling ``model`` via :func:`ifunc.call`.
      params: dict from :func:`ifunc.params_of`.
      batch: one batch.
      model: the module the loss calls.
      modules: module names or predicate (default: every supported layer with a tracked weight).

    Returns:
      ``{module_name: [b, out, in(+1)]}`` in the weight matrix layout (Conv2d: ``in·kh·kw`` columns;
      Conv1D: ``[out, in]``, the transpose of its stored weight; nn.Embedding: ``[dim, vocab]``, likewise).
    """
    layers, _ = find_layers(model, params, modules=modules)
    if not layers:
        return {}
    check = probe_layers(loss, params, model, layers, batch)
    p = requiring_grad(params)
    with layer_capture(model, check.layers, examples=batch_size(batch)) as rec, torch.enable_grad():
        value = loss(p, batch)
    rec.check()
    gs = rec.output_grads(value, retain_graph=False, wrt=check.wrt(p))
    parts = {s.name: (rec.activations(s, gs[s.name].dtype), gs[s.name]) for s in check.layers}
    check.observe(loss, params, model, batch, rec, parts)
    specs = {s.name: s for s in check.layers}
    return {name: kind_of(specs[name]).contract(g, a, specs[name].columns) for name, (a, g) in parts.items()}
