"""Losses split into model outputs and a loss on them, and the one registry of likelihoods (label samplers).

The Gauss-Newton curvature needs ``loss(params, batch) = loss_on_outputs(outputs(params, batch), batch)``;
the true Fisher also needs to draw labels from the model's predictive distribution. A *likelihood* here is
a sampler ``(outputs, generator) -> g`` returning ``g = ∇_out −log p(ŷ | out)`` at labels ``ŷ`` it draws;
:data:`LIKELIHOODS` holds the built-in ones by name, and every function that samples (curvature products,
DataInf, the Kronecker factors) resolves its argument here. Randomness is explicit: a ``generator``, by
default :func:`default_generator` (seed 0, on the parameters' device); the global RNG is never used.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._batches import batch_size
from ._types import Batch, Params

__all__ = [
    "OutputLoss",
    "output_loss",
    "Likelihood",
    "LIKELIHOODS",
    "resolve_likelihood",
    "sample_categorical",
    "sample_gaussian",
    "default_generator",
    "replayable",
    "sample_with",
    "sampled_output_gradients",
]


#: ``sample(outputs [b, ...], generator) -> [b, ...]``: ``∇_out −log p(ŷ | out)`` at sampled labels ``ŷ``.
Likelihood = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def default_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A fresh generator on ``device`` seeded with 0: the default of every function that samples."""
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(0)


#: elements of each float64 block of :func:`sample_categorical` (rows × classes; 8 bytes each, a few alive at once)
SAMPLE_BLOCK = 1 << 22


def sample_categorical(outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Logits ``[..., C]``: ``ŷ ~ softmax(out)`` per row, ``∇_out −log p(ŷ|out) = softmax(out) − onehot(ŷ)``.

    The softmax runs in float64 over blocks of rows (about :data:`SAMPLE_BLOCK` elements each, so a large
    vocabulary never holds float64 copies of all the logits) and ``onehot(ŷ)`` is subtracted in place; the
    draws are those of one ``torch.multinomial`` over all rows (it consumes the generator row by row). The
    labels are drawn on the generator's device and moved to the outputs' device.
    """
    flat = outputs.detach().reshape(-1, outputs.shape[-1])
    rows, classes = flat.shape
    out = torch.empty(flat.shape, dtype=outputs.dtype, device=outputs.device)
    step = max(1, SAMPLE_BLOCK // max(1, classes))
    for s in range(0, rows, step):
        probs = torch.softmax(flat[s : s + step].to(torch.float64), dim=-1)
        labels = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
        probs[torch.arange(len(probs), device=probs.device), labels] -= 1.0
        out[s : s + step] = probs
    return out.reshape(outputs.shape)


def sample_gaussian(outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance Gaussian ``ŷ ~ N(out, I)``: ``∇_out ½‖out − ŷ‖² = out − ŷ = −ε``, ``ε ~ N(0, I)``."""
    noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=generator.device)
    return -noise.to(outputs.device)


#: The one registry of built-in likelihoods (label samplers), by name.
LIKELIHOODS: dict[str, Likelihood] = {"categorical": sample_categorical, "gaussian": sample_gaussian}


def resolve_likelihood(likelihood: str | Likelihood | None, *, argument: str = "likelihood") -> Likelihood | None:
    """A sampler from a name of :data:`LIKELIHOODS` or a callable ``(outputs, generator) -> g``; None stays None."""
    if likelihood is None:
        return None
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"{argument}={likelihood!r} is not built in; choose one of {sorted(LIKELIHOODS)} or pass a "
                "callable (outputs, generator) -> gradient of -log p(sampled label | outputs)"
            )
        return LIKELIHOODS[likelihood]
    if not callable(likelihood):
        raise TypeError(f"{argument} must be a string or a callable, got {type(likelihood).__name__}")
    return likelihood


class OutputLoss:
    """A loss split as ``loss(params, batch) = loss_on_outputs(outputs(params, batch), batch)``.

    It is itself a loss function (callable as ``loss(params, batch)``), so it can be passed anywhere a
    loss is accepted; the split lets the Gauss-Newton curvature (``curvature="ggn"``) be formed, and the
    optional ``likelihood`` lets the true Fisher (``curvature="fisher"``) sample labels.
    """

    def __init__(
        self,
        outputs: Callable[[Params, Batch], torch.Tensor],
        loss_on_outputs: Callable[[torch.Tensor, Batch], torch.Tensor],
        *,
        likelihood: str | Likelihood | None = None,
    ):
        if not callable(outputs) or not callable(loss_on_outputs):
            raise TypeError("output_loss(outputs, loss_on_outputs) takes two callables")
        likelihood = resolve_likelihood(likelihood)
        self.outputs = outputs
        self.loss_on_outputs = loss_on_outputs
        self.likelihood = likelihood

    def __call__(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_on_outputs(self.outputs(params, batch), batch)


def output_loss(
    outputs: Callable[[Params, Batch], torch.Tensor],
    loss_on_outputs: Callable[[torch.Tensor, Batch], torch.Tensor],
    *,
    likelihood: str | Likelihood | None = None,
) -> OutputLoss:
    """Build a loss that exposes its model outputs, for Gauss-Newton and true-Fisher curvature.

    Args:
      outputs: ``outputs(params, batch) -> Tensor`` (e.g. logits ``[b, classes]``); for
        ``curvature="fisher"`` the leading dimension must be the batch's examples.
      loss_on_outputs: ``loss_on_outputs(outputs, batch) -> scalar``, summed over the batch.
      likelihood: how to sample labels from the model for the true Fisher. ``"categorical"``: outputs
        are logits ``[..., C]`` (cross-entropy), ``g = softmax(out) − onehot(ŷ)`` with ``ŷ ~ softmax(out)``.
        ``"gaussian"``: unit-variance Gaussian (squared error ``½‖out − y‖²``), ``g = −ε``,
        ``ε ~ N(0, I)``. A callable ``(outputs, generator) -> g`` (same shape as outputs) returns
        ``∇_out −log p(ŷ | out)`` at labels it samples with ``generator``. ``None``: no true Fisher.

    Example:
      >>> loss = output_loss(lambda p, b: ifunc.call(model, p, b[0]),
      ...                    lambda out, b: F.cross_entropy(out, b[1], reduction="sum"),
      ...                    likelihood="categorical")
    """
    return OutputLoss(outputs, loss_on_outputs, likelihood=likelihood)


def replayable(generator: torch.Generator | None, device=None) -> Callable[[], torch.Generator]:
    """A factory of generators that all start from ``generator``'s current state (default: seed 0 on ``device``)."""
    start = generator if generator is not None else default_generator(device)
    state, where = start.get_state(), start.device

    def fresh() -> torch.Generator:
        gen = torch.Generator(device=where)
        gen.set_state(state)
        return gen

    return fresh


def sample_with(likelihood: Likelihood, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``g = likelihood(outputs, generator)``, checked to be a tensor shaped like ``outputs``, in their dtype."""
    g = likelihood(outputs.detach(), generator)
    if not isinstance(g, torch.Tensor) or g.shape != outputs.shape:
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(
            f"likelihood(outputs, generator) must return a tensor shaped like outputs {tuple(outputs.shape)}, got {got}"
        )
    return g.to(outputs.dtype)


def sampled_output_gradients(
    loss: OutputLoss, out: torch.Tensor, batch: Batch, generator: torch.Generator
) -> torch.Tensor:
    """``g [b, ...] = ∇_out −log p(ŷ | out)`` at labels sampled by ``loss.likelihood``; checks shapes."""
    if loss.likelihood is None:
        raise TypeError('curvature="fisher" needs output_loss(..., likelihood=...) to sample labels')
    g = sample_with(loss.likelihood, out, generator)
    if out.dim() == 0 or out.shape[0] != batch_size(batch):
        raise ValueError(
            f'curvature="fisher" needs outputs whose leading dimension is the batch\'s examples; got outputs '
            f"{tuple(out.shape)} for a batch of {batch_size(batch)}"
        )
    return g
