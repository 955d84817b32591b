"""One adapter per layer kind: how a module's inputs ``a``, output-gradients ``g`` and weight matrix look.

For a layer ``y_t = W a_t (+ b)`` applied at positions ``t`` (tokens, conv patches, repeated calls), the
per-example weight gradient is ``DW = Σ_t g_t a_tᵀ`` in the weight-matrix layout ``[out, in]``. A *layer
kind* says how to read ``a [b, T, in]`` from the module's input, ``g [b, T, out]`` from the gradient of its
output, and how the flat parameter slice maps to ``[out, in]``. The examples may lie along any dimension but the
features' (``[batch, ..., in]``, or sequence-first ``[T, batch, in]``, e.g. ``nn.TransformerEncoderLayer(batch_first=
False)``): :mod:`ifunc.ihvp.kronecker.example_dims` finds it from the call shapes on one and two examples, and the
adapter moves it first (inputs and output gradients alike); an input without one (examples flattened with positions,
``x.reshape(b * T, d)``, or shared by the batch) is refused with :class:`ExampleDimError`. Supported: ``nn.Linear``,
``nn.Conv2d`` (``groups=1``, zero padding; inputs unfolded to patches), GPT-2-style ``Conv1D`` (weight
``[in, out]``) and, when named in ``modules=``, ``nn.Embedding`` (one-hot inputs carried as token ids, never as
``[b, T, vocab]``; its weight ``[vocab, dim]`` is ``[in, out]``; :mod:`ifunc.ihvp.kronecker._onehot`).

Besides reading ``a`` and ``g``, a kind says how ``a`` enters every statistic: the input moment ``Σ a aᵀ``, its
eigenbasis, the per-example gradient ``DW``, the EK-FAC sums ``Σ (Q_Sᵀ DW Q_A)²`` and the score contractions
``Σ_t g_tᵀ Q̃ a_t`` (dense products for the dense kinds, scatters and gathers of token ids for the embedding).

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
from ._kernels import layer_scores, layer_token_scores, per_example_quadratic, rotated_sq_sum
from ._onehot import onehot_grads, onehot_quadratic, onehot_scores, onehot_sq_sum, onehot_token_scores, token_counts

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
    kind: str  #: ``"linear"``, ``"conv2d"``, ``"conv1d"`` or ``"embedding"``
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

    @property
    def columns(self) -> int:
        """Columns of the layer's matrix block: ``in``, plus one for a tracked bias."""
        return self.in_features + (self.bias is not None)


def _positions_last(x: torch.Tensor) -> torch.Tensor:
    """``[b, ..., C] -> [b, T, C]`` (also for ``b = 0``, where ``reshape(0, -1, C)`` is ambiguous)."""
    return x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)


class LayerKind:
    """``nn.Linear``: ``a`` is the input, ``g`` the output gradient, the weight is already ``[out, in]``.

    The statistics below take ``a [b, T, in(+1)]`` as :meth:`inputs` returned it (a tracked bias's column of ones
    appended), ``g [b, T, out]``, and eigenbases ``Q_S [out, out]``, ``Q_A [in(+1), in(+1)]`` (None: the identity).
    """

    name = "linear"
    default = True  #: tracked when ``modules=None`` (else only when named, or chosen by a predicate)
    input_basis = True  #: the input factor has an eigenbasis ``Q_A`` (else it is diagonal: ``Q_A`` is the identity)
    min_dims = 2  #: fewest dimensions of an input that holds the examples (and the features)

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

    def refusal(self, model: nn.Module, name: str, module: nn.Module) -> ValueError | None:
        """The error to raise when ``module`` (named ``name`` in ``model``) is chosen as a Kronecker layer of this kind
        but its captured ``a``, ``g`` would not give its weight gradients; None when they do (or the probe checks)."""
        return None

    def cast(self, a: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """The inputs in ``dtype`` (None: as they are), for products with ``g``."""
        return a if dtype is None else a.to(dtype)

    def input_norms(self, a: torch.Tensor) -> torch.Tensor:
        """``‖a_{i,t}‖`` ``[b, T]``."""
        return a.norm(dim=-1)

    def input_moment(self, a: torch.Tensor, columns: int) -> torch.Tensor:
        """``Σ_{i,t} a_{i,t} a_{i,t}ᵀ`` ``[in(+1), in(+1)]``."""
        af = a.reshape(-1, a.shape[-1])
        return af.T @ af

    def input_factor_numel(self, columns: int) -> int:
        """Entries of the input factor ``A`` (and of its eigenbasis ``Q_A``)."""
        return columns * columns

    def input_eig(self, A: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(λ_A, Q_A)`` of the mean input moment ``A = Q_A diag(λ_A) Q_Aᵀ`` in ``dtype`` (Q_A None: identity)."""
        A = A.to(dtype)
        return torch.linalg.eigh((A + A.T) / 2)

    def contract(self, g: torch.Tensor, a: torch.Tensor, columns: int) -> torch.Tensor:
        """Per-example gradients ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` ``[b, out, in(+1)]``."""
        return torch.einsum("bto,bti->boi", g, a)

    def sq_sum(self, g: torch.Tensor, a: torch.Tensor, Q_S, Q_A, columns: int) -> torch.Tensor:
        """``Σ_i (Q_Sᵀ DW_i Q_A)²`` ``[out, in(+1)]`` (bases None: the diagonal ``Σ_i DW_i²``)."""
        return rotated_sq_sum(g, a, Q_S, Q_A)

    def quadratic(self, eigenvalues: torch.Tensor, Q_S, Q_A, a: torch.Tensor, g: torch.Tensor, lam: float):
        """``Σ (Q_Sᵀ DW_i Q_A)² / (Λ + λ)`` per example ``[b]``."""
        return per_example_quadratic(eigenvalues, Q_S, Q_A, a, g, lam)

    def scores(self, Qt: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``scores[q, i] = Σ_t g_{i,t}ᵀ Q̃_q a_{i,t}`` ``[q, b]`` (``lr``: rank-r factors of ``Q̃`` or None)."""
        return layer_scores(Qt, lr, a, g)

    def token_scores(self, R: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``s[q, i, t] = g_{i,t}ᵀ Q̃_q a_{i,t}`` ``[q, b, T]``."""
        return layer_token_scores(R, lr, a, g)

    def work_columns(self, columns: int) -> int:
        """Columns of the per-example temporaries a score contraction holds (for the chunk-size estimate)."""
        return columns


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


class EmbeddingKind(Conv1DKind):
    """``nn.Embedding``: ``y_t = E[x_t]``, the layer ``W = Eᵀ [dim, vocab]`` on one-hot inputs ``a_t = e_{x_t}``.

    The per-example gradient is ``DW_i = Σ_t g_t e_{x_t}ᵀ`` in the ``[out, in] = [dim, vocab]`` layout (the stored
    weight ``[vocab, dim]`` transposed, like :class:`Conv1DKind`). The inputs are carried as token ids ``[b, T]``,
    ``-1`` at a ``padding_idx`` position (the padding row receives no gradient: its ``a_t`` is 0). The input moment
    ``Σ a aᵀ = diag(token counts)`` is stored as a vector ``[vocab]``, its eigenbasis is the identity, so EK-FAC's
    basis is ``Q_S ⊗ I`` and ``Λ[j, v] = E[(Σ_t (Q_Sᵀ g_t)_j [x_t = v])²]``, a ``[dim, vocab]`` table. Not tracked
    unless named in ``modules=`` (or chosen by a predicate). ``max_norm`` (renormalises the weight in place in the
    forward) and ``scale_grad_by_freq`` (divides each row's gradient by its count in the batch, not ``g aᵀ``)
    are refused.
    """

    name = "embedding"
    default = False
    input_basis = False
    min_dims = 1

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def refusal(self, model: nn.Module, name: str, module: nn.Module) -> ValueError | None:
        assert isinstance(module, nn.Embedding)  # this kind matches only nn.Embedding
        why = None
        if module.max_norm is not None:
            why = (
                f"max_norm={module.max_norm} renormalises rows of the weight in place during the forward (the "
                "parameters would change while they are read)"
            )
        elif module.scale_grad_by_freq:
            why = (
                "scale_grad_by_freq=True divides each row's gradient by the token's count in the batch, so the "
                "gradient is not Σ_t g_t a_tᵀ and depends on which examples share a batch"
            )
        if why is not None:
            return ValueError(
                f"modules: the embedding {name!r} cannot be a Kronecker layer: {why}; leave it out of modules= (its "
                "weight then gets a diagonal block) or exclude= it"
            )
        others = [
            f"{mn or '<root>'} ({type(m).__name__})"
            for mn, m in model.named_modules()
            if mn != name and any(p is module.weight for p in m._parameters.values())
        ]
        if others:
            return WeightUseError(
                f"modules: the weight of the embedding {name!r} is tied to {others}, so its gradient is the sum of "
                "the lookup's Σ_t g_t e_(x_t)ᵀ and the other use's (an output layer's Σ_t h_t g_tᵀ, inputs and outputs "
                "swapped), which no single Kronecker product A ⊗ S factors. Leave the embedding out of modules= (the "
                f"tied weight then gets a diagonal block, exact for both uses), exclude=[{name!r}], or untie the "
                "weights"
            )
        return None

    def example_dims(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim))  # token ids have no feature dimension

    def inputs(self, module: nn.Module, x: torch.Tensor, name: str, dim: int = 0) -> torch.Tensor:
        """Token ids ``[b, T]`` (``-1`` at the padding index) from the module's input ids."""
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"layer capture: the embedding {name!r} got a {x.dtype} input, not token ids")
        ids = x.movedim(dim, 0)
        ids = ids.unsqueeze(1) if ids.dim() == 1 else ids.flatten(1)
        pad = getattr(module, "padding_idx", None)
        return ids if pad is None else ids.masked_fill(ids == pad, -1)

    def cast(self, a: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return a  # token ids stay integers

    def input_norms(self, a: torch.Tensor) -> torch.Tensor:
        return (a >= 0).float()

    def input_moment(self, a: torch.Tensor, columns: int) -> torch.Tensor:
        return token_counts(a, columns, torch.float64)

    def input_factor_numel(self, columns: int) -> int:
        return columns

    def input_eig(self, A: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        return A.to(dtype), None

    def contract(self, g: torch.Tensor, a: torch.Tensor, columns: int) -> torch.Tensor:
        return onehot_grads(g, a, columns)

    def sq_sum(self, g: torch.Tensor, a: torch.Tensor, Q_S, Q_A, columns: int) -> torch.Tensor:
        return onehot_sq_sum(g, a, columns, Q_S)

    def quadratic(self, eigenvalues: torch.Tensor, Q_S, Q_A, a: torch.Tensor, g: torch.Tensor, lam: float):
        return onehot_quadratic(eigenvalues, Q_S, a, g, lam)

    def scores(self, Qt: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return onehot_scores(Qt, lr, a, g)

    def token_scores(self, R: torch.Tensor, lr, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return onehot_token_scores(R, lr, a, g)

    def work_columns(self, columns: int) -> int:
        return 1  # one gathered column of the queries per position


_KINDS = (LayerKind(), Conv1DKind(), Conv2dKind(), EmbeddingKind())
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
        whose weight is in ``params``, except ``nn.Embedding`` (tracked only when named or chosen).

    Returns:
      ``(layers, uncovered)``: the layer specs, and the names of tracked parameters no layer covers.

    Raises:
      ValueError: a named module does not exist, is not supported, or holds no tracked weight; a chosen
        ``nn.Embedding`` with ``max_norm`` or ``scale_grad_by_freq``.
      WeightUseError: a chosen ``nn.Embedding`` whose weight another module also holds (a tied LM head).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model= must be the nn.Module the loss calls, got {type(model).__name__}")
    names = set(dict_parameter_names(params))
    named = dict(model.named_modules())
    if modules is None:
        chosen = [n for n, m in named.items() if getattr(layer_kind(m), "default", False)]
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
                    "(supported: nn.Linear, nn.Conv2d with groups=1 and zero padding, GPT-2 Conv1D, nn.Embedding); "
                    "leave it "
                    "out of modules= and its parameters get a diagonal block"
                )
    layers = []
    for n in chosen:
        m = named[n]
        prefix = f"{n}." if n else ""
        w = prefix + "weight"
        kind = layer_kind(m)
        assert kind is not None  # every chosen module has a layer kind (filtered or refused above)
        if w not in names:
            if modules is not None and not callable(modules):
                refused = kind.refusal(model, n, m)  # a tied weight is held under its other module's name
                if refused is not None:
                    raise refused
                aliases = [
                    pn
                    for pn, q in model.named_parameters(remove_duplicate=False)
                    if q is getattr(m, "weight", None) and pn != w and pn in names
                ]
                tied = f" (params holds the same tensor as {aliases}: the weight is tied to another module)"
                raise ValueError(
                    f"modules: the weight {w!r} of {n!r} is not in params{tied if aliases else ''}; track it or "
                    f"drop {n!r}"
                )
            continue
        b = prefix + "bias"
        b = b if (b in names and getattr(m, "bias", None) is not None) else None
        assert isinstance(m.weight, torch.Tensor)  # supported layers hold their weight as a tensor
        refused = kind.refusal(model, n, m)
        if refused is not None:
            raise refused
        out_f, in_f = kind.shape(m.weight)
        layers.append(LayerSpec(n, kind.name, w, b, out_f, in_f))
    covered = {s.weight for s in layers} | {s.bias for s in layers if s.bias}
    uncovered = [p for p in dict_parameter_names(params) if p not in covered]
    return layers, uncovered
