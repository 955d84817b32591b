"""Readable errors for what torch.func transforms reject inside a user's loss or model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_HINTS = (
    (
        ("randomness",),
        "random operations (dropout?) inside a vmapped loss: put the model in eval mode (model.eval()) or make "
        "the loss deterministic",
    ),
    (
        ("data-dependent control flow", ".item()"),
        "data-dependent Python (.item(), float(tensor), `if tensor:`, one_hot) inside the loss or model: rewrite "
        "it with tensor operations (torch.where, masks); for Hugging Face models use attn_implementation='eager'",
    ),
    (
        ("must have the same dtype", "expected scalar type", "expected both vectors to have same dtype"),
        "a dtype mismatch: the data's floating dtype differs from the parameters' (e.g. float64 inputs with float32 "
        "params); cast the data (or the model, e.g. model.double()) so that they agree",
    ),
    (
        ("mutate a captured Tensor", "in-place operation", "more than 1 value per channel when training"),
        "an in-place update of a tensor the model holds (BatchNorm running statistics in train mode?): call "
        "model.eval() before computing influence (the curvature of a trained model is taken in eval mode)",
    ),
)


def explain(err: Exception, where: str) -> RuntimeError | None:
    """A RuntimeError naming the cause and the fix, or None when the error is not a known transform limit."""
    text = str(err)
    for needles, hint in _HINTS:
        if any(n in text for n in needles):
            return RuntimeError(f"{where}: torch.func hit {hint}")
    return None


@contextlib.contextmanager
def explained(where: str, kinds: tuple = (RuntimeError,)) -> Iterator[None]:
    """Re-raise a known torch.func limit raised inside the block as a readable RuntimeError (see :func:`explain`)."""
    try:
        yield
    except kinds as err:
        readable = explain(err, where)
        if readable is not None:
            raise readable from err
        raise
