"""Query measurements ``f(params, batch) -> scalar``, summed over the batch, for :func:`ifunc.attribute`.

ifunc's scores are ``scores[q, i] = ∇f(z_q)ᵀ (H + λI)^{-1} ∇ℓ(z_i)``: the first-order *decrease* of ``f``
when training example ``i`` is up-weighted. Every measurement here is therefore written as a quantity to
*decrease* (a loss), so that **positive = helpful** keeps its meaning: a positive score for
:func:`completion_nll` means example ``i`` makes the completion more likely, for :func:`negative_margin`
that it pushes the prediction towards the right class.

Each factory takes ``outputs(params, batch) -> Tensor`` (logits computed with :func:`ifunc.call`) and
returns an :class:`ifunc.OutputLoss`, which any function accepting a loss or a measurement takes. Examples
of the batch must not interact (no batch statistics), as for the training loss.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._types import Batch, Params
from .likelihood import OutputLoss, output_loss

__all__ = ["completion_nll", "negative_margin", "output_measurement"]

Outputs = Callable[[Params, Batch], torch.Tensor]
Selector = Callable[[Batch], torch.Tensor]


def completion_nll(logits: Outputs, *, targets: Selector, completion_mask: Selector) -> OutputLoss:
    """Negative conditional log-likelihood of a completion given its prompt, ``−log p(completion | prompt)``.

    For a causal LM whose logits at position ``t`` predict ``targets[:, t]``,

    ``f(batch) = − Σ_b Σ_t m_{b,t} log softmax(logits_{b,t})[targets_{b,t}]``,

    with ``m = completion_mask(batch)`` (1 on completion targets, 0 on prompt targets and padding). Prompt
    positions still condition the prediction (they are the model's inputs) but their targets do not count:
    changing a prompt target leaves ``f`` and its gradient unchanged. This is the measurement of Grosse et
    al. (2023): with it, ``scores[q, i] > 0`` means training sequence ``i`` makes completion ``q`` more likely.

    Args:
      logits: ``logits(params, batch) -> [b, T, V]``, aligned with the targets (shift inside it for a
        model that predicts the next token).
      targets: ``targets(batch) -> [b, T]`` integer token ids.
      completion_mask: ``completion_mask(batch) -> [b, T]`` (bool or 0/1).

    Returns:
      an :class:`ifunc.OutputLoss` (``likelihood="categorical"``), usable as ``measurement=``.

    Raises:
      ValueError: (when called) shapes of logits, targets and mask disagree.

    Example:
      ```python
      f = ifunc.measurements.completion_nll(
          lambda p, b: ifunc.call(model, p, b["ids"][:, :-1]),
          targets=lambda b: b["ids"][:, 1:],
          completion_mask=lambda b: b["completion"][:, 1:],
      )
      scores = ifunc.attribute(loss, params, ihvp, train, query, measurement=f)
      ```

    References:
      Grosse et al. (2023), "Studying large language model generalization with influence functions", §2.
    """

    def on_outputs(out: torch.Tensor, batch) -> torch.Tensor:
        y, m = targets(batch), completion_mask(batch)
        if out.dim() != 3 or tuple(y.shape) != tuple(out.shape[:2]) or tuple(m.shape) != tuple(y.shape):
            raise ValueError(
                f"completion_nll: logits must be [b, T, V] with targets and completion_mask [b, T]; got logits "
                f"{tuple(out.shape)}, targets {tuple(y.shape)}, mask {tuple(m.shape)}"
            )
        logp = torch.log_softmax(out, dim=-1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
        return -(logp * m.to(logp.dtype)).sum()

    return output_loss(logits, on_outputs, likelihood="categorical")


def negative_margin(logits: Outputs, *, labels: Selector) -> OutputLoss:
    """Minus the (smooth) classification margin, ``−(z_y − log Σ_{c≠y} exp z_c)``, summed over the batch.

    The margin ``z_y − logsumexp_{c≠y} z_c = log(p_y / (1 − p_y))`` is the log-odds of the correct class,
    the measurement of TRAK (Park et al. 2023); unlike the loss it does not saturate for confident correct
    predictions. Negated so that positive scores mean the training example increases the margin.

    Args:
      logits: ``logits(params, batch) -> [b, C]`` (or ``[..., C]``).
      labels: ``labels(batch) -> [b]`` (or ``[...]``) integer classes.

    Returns:
      an :class:`ifunc.OutputLoss`, usable as ``measurement=``.

    Example:
      >>> f = ifunc.measurements.negative_margin(lambda p, b: ifunc.call(model, p, b[0]), labels=lambda b: b[1])
    """

    def on_outputs(out: torch.Tensor, batch) -> torch.Tensor:
        y = labels(batch).long()
        if tuple(y.shape) != tuple(out.shape[:-1]):
            raise ValueError(
                f"negative_margin: labels must have shape {tuple(out.shape[:-1])} (logits "
                f"{tuple(out.shape)} without the class axis), got {tuple(y.shape)}"
            )
        correct = out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        others = out.masked_fill(F.one_hot(y, out.shape[-1]).bool(), float("-inf"))
        return -(correct - torch.logsumexp(others, dim=-1)).sum()

    return output_loss(logits, on_outputs)


def output_measurement(outputs: Outputs, fn: Callable[[torch.Tensor, Batch], torch.Tensor]) -> OutputLoss:
    """Any function of the model outputs: ``f(params, batch) = fn(outputs(params, batch), batch)``.

    ``fn`` must return a scalar that sums per-example terms (e.g. the logit of one class, the probability
    of a token, a reward). Remember the sign: scores measure the *decrease* of ``f``, so return the
    negative of a quantity you want to see increased.

    Example:
      >>> f = ifunc.measurements.output_measurement(lambda p, b: ifunc.call(model, p, b[0]),
      ...                                           lambda out, b: -out[:, 3].sum())   # raise class 3's logit
    """
    if not callable(outputs) or not callable(fn):
        raise TypeError(
            "output_measurement(outputs, fn) takes two callables: outputs(params, batch) and "
            "fn(outputs, batch) -> scalar"
        )
    return output_loss(outputs, fn)
