"""Readable errors: what torch.func transforms reject inside a user's loss or model, bad counts, and cost notes."""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Iterator

__all__ = ["CostWarning", "explain", "explained", "check_count"]


class CostWarning(UserWarning):
    """A call is about to run work that another route avoids, e.g. one iterative solve per training example.

    Emitted once per call (on rank 0 under ``torchrun``) before the work starts; the message names how much work
    and the fast ways. It is a note, not an error: silence it with
    ``warnings.filterwarnings("ignore", category=ifunc.CostWarning)``.
    """


#: torch's message for an op without a forward-mode derivative; group 1 is the op's name.
_NO_FORWARD_AD = re.compile(r"forward AD with (\S+)")

_SDPA_HINT = (
    "attention through torch's fused scaled_dot_product_attention ({op}), which has no forward-mode derivative; "
    "the Hessian and Gauss-Newton products (ihvp_cg, ihvp_lissa, ihvp_arnoldi, ihvp_nystrom, ihvp_explicit) "
    'differentiate forward-over-reverse. Hugging Face models use it by default (attn_implementation="sdpa"): '
    'load the model with eager attention, AutoModelForCausalLM.from_pretrained(name, attn_implementation="eager"); '
    'for a model built from a config, set config._attn_implementation = "eager" (or pass '
    'attn_implementation="eager" to the config) before GPT2LMHeadModel(config); or switch a loaded model with '
    'model.set_attn_implementation("eager"). Outside transformers, write the attention out '
    '(softmax(q kᵀ / √d) v). The Kronecker family and curvature="empirical_fisher" need only reverse mode'
)

_FORWARD_AD_HINT = (
    "an operation without a forward-mode derivative in torch ({op}); the Hessian and Gauss-Newton products "
    "differentiate forward-over-reverse (jvp): replace that operation in the model, or use what needs only "
    'reverse mode (curvature="empirical_fisher", or the Kronecker family ihvp_ekfac / ihvp_kfac)'
)

_HINTS = (
    (
        ("randomness",),
        "random operations (dropout?) inside a vmapped loss: put the model in eval mode (model.eval()) or make "
        "the loss deterministic",
    ),
    (
        ("data-dependent control flow", ".item()"),
        "data-dependent Python (.item(), float(tensor), `if tensor:`, one_hot) inside the loss or model: rewrite "
        "it with tensor operations (torch.where, masks); for Hugging Face models load them with eager attention, "
        'from_pretrained(name, attn_implementation="eager") (or model.set_attn_implementation("eager"))',
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
    match = _NO_FORWARD_AD.search(text)
    if match is not None:
        hint = _SDPA_HINT if "scaled_dot_product" in match.group(1) else _FORWARD_AD_HINT
        return RuntimeError(f"{where}: torch.func hit {hint.format(op=match.group(1))}")
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


def _is_bool(value) -> bool:
    """A Python, NumPy or 0-d torch boolean (``operator.index`` turns ``torch.tensor(True)`` into 1)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype) in ("torch.bool", "bool")


def check_count(value, name: str, who: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``: ``TypeError`` for a bool, a float or a non-number, else ``ValueError``.

    ``True`` is an int in Python, so ``rank=True`` would silently mean 1; a float such as ``2.0`` or ``2.5`` is
    refused rather than truncated. Integer types that support ``operator.index`` (NumPy, 0-d torch) are accepted;
    their booleans (``numpy.bool_``, a 0-d ``torch.bool`` tensor) are refused like ``True``.
    """
    if _is_bool(value):
        raise TypeError(f"{who}: {name} must be an int >= {minimum}, got the bool {value!r}; pass a number such as 10")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{who}: {name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})") from None
    if number < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {number}")
    return number
