"""Language models: a masked next-token loss, module pickers for transformers, per-token set-up helpers.

Conventions for token batches: a dict with ``"input_ids" [b, L]`` and optionally ``"attention_mask"
[b, L]`` (1 = real token, 0 = padding) and ``"labels" [b, L]`` (``-100`` = not a target), the names
Hugging Face uses. The loss of a sequence is the sum of its next-token cross-entropies over real targets,
and the curvature ifunc fits is that of the mean loss per *sequence* (see :mod:`ifunc.ihvp.kronecker.fit`).
Padding changes nothing: padded positions have no target, and a model that masks attention to padded keys
sends them no gradient, so their per-token scores are exactly 0 (``token_mask`` makes that explicit).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

from ._types import Params
from .ihvp.kronecker.layers import find_layers, layer_kind
from .likelihood import OutputLoss, output_loss

__all__ = ["causal_lm_loss", "token_mask", "untracked", "transformer_modules"]


def _shifted_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets [b, L-1], weights [b, L-1])`` for logits at positions ``0..L-2``."""
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    y = labels[:, 1:]
    w = y != -100
    if "attention_mask" in batch:
        m = batch["attention_mask"].bool()
        w = w & m[:, 1:] & m[:, :-1]  # a real target predicted from a real position (left padding too)
    return y.clamp_min(0), w


def causal_lm_loss(logits: Callable[[Params, dict], torch.Tensor]) -> OutputLoss:
    """Summed next-token cross-entropy: ``ℓ(batch) = −Σ_b Σ_{t<L} w_{b,t} log p(y_{b,t+1} | x_{b,≤t})``.

    Args:
      logits: ``logits(params, batch) -> [b, L, V]``, the model's outputs at every input position (e.g.
        ``lambda p, b: ifunc.call(model, p, b["input_ids"], attention_mask=b["attention_mask"]).logits``).

    Returns:
      an :class:`ifunc.OutputLoss` (``likelihood="categorical"``). The targets are ``labels`` (default
      ``input_ids``) shifted by one; a target has weight 0 when it is ``-100``, padding, or predicted from a
      padding position (``attention_mask`` 0). Its ``outputs`` are the logits ``[b, L-1, V]`` of the positions
      that predict a target and 0 elsewhere (the last position, padding), so that true-Fisher label draws
      (``sample="categorical"``) and the GGN see only real predictions.
    """

    def outputs(params, batch) -> torch.Tensor:
        _, w = _shifted_targets(batch)
        out = logits(params, batch)[:, :-1]
        return out * w.unsqueeze(-1).to(out.dtype)

    def on_outputs(out: torch.Tensor, batch) -> torch.Tensor:
        y, w = _shifted_targets(batch)
        lp = torch.log_softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return -(lp * w.to(lp.dtype)).sum()

    return output_loss(outputs, on_outputs, likelihood="categorical")


def token_mask(batch) -> torch.Tensor:
    """``[b, L]`` real-token mask of a batch dict (``attention_mask``, or all ones), for ``token_mask=``."""
    ids = batch["input_ids"]
    return batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)


def untracked(
    model: nn.Module, params: Params, *, modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None
) -> list[str]:
    """Names of the parameters no tracked layer covers (embeddings, LayerNorms, ...).

    Pass them as ``exclude=`` to a Kronecker-family closure to attribute through the tracked layers only (the
    MLP-only choice of Grosse et al. 2023): those parameters get a zero block. Without ``exclude=`` they get
    diagonal blocks, which per-token scores split too (embeddings, position embeddings of ``arange(T)``,
    LayerNorm, RMSNorm); either way ``per_token.sum(-1)`` equals the pairwise scores.

    Example:
      >>> mods = ifunc.language.transformer_modules(model)
      >>> ihvp = ifunc.ihvp_ekfac(loss, params, train, model=model, modules=mods,
      ...                         exclude=ifunc.language.untracked(model, params, modules=mods))
    """
    return find_layers(model, params, modules=modules)[1]


def transformer_modules(model: nn.Module, *, attention: bool = True, mlp: bool = True) -> list[str]:
    """Names of the supported layers (``nn.Linear``, GPT-2 ``Conv1D``) inside attention and/or MLP blocks.

    A layer belongs to attention if a component of its qualified name starts with ``attn`` or
    ``attention`` (GPT-2: ``transformer.h.0.attn.c_attn``, ``...attn.c_proj``), to the MLP if one starts
    with ``mlp``, ``ffn`` or ``feed_forward`` (GPT-2: ``transformer.h.0.mlp.c_fc``, ``...mlp.c_proj``).
    The LM head and embeddings are never included. MLP-only is the choice of Grosse et al. (2023).

    Raises:
      ValueError: nothing matched (the names are listed so you can pass ``modules=`` yourself).
    """
    if not (attention or mlp):
        raise ValueError("transformer_modules: choose attention=True and/or mlp=True")

    def part(name: str) -> str | None:
        for piece in name.split("."):
            low = piece.lower()
            if low.startswith(("attn", "attention", "self_attn")):
                return "attention"
            if low.startswith(("mlp", "ffn", "feed_forward")):
                return "mlp"
        return None

    wanted = ({"attention"} if attention else set()) | ({"mlp"} if mlp else set())
    names = [n for n, m in model.named_modules() if layer_kind(m) is not None and part(n) in wanted]
    if not names:
        layers = [n for n, m in model.named_modules() if layer_kind(m) is not None]
        raise ValueError(
            f"transformer_modules: no attention/MLP layer found by name among {layers}; pass modules= explicitly"
        )
    return names
