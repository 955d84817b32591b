"""Tiny Hugging Face causal language models with random weights (nothing is downloaded).

Each builder makes a ``transformers`` config, seeds torch's CPU generator with ``seed`` inside
:func:`torch.random.fork_rng` (so the caller's global RNG is left as it was), builds the model in torch's
default dtype, casts it to ``dtype`` and puts it in eval mode. The same arguments give the same weights.
``transformers`` is imported inside the builders: ``import ifunc.testing`` works without it.

Pair a model with :func:`ifunc.language.causal_lm_loss` through :func:`hf_logits`::

    model = tiny_llama()
    loss = ifunc.language.causal_lm_loss(hf_logits(model))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import nn

from .._types import Params
from ..functional import call

if TYPE_CHECKING:  # the return types only: transformers is imported inside the builders
    from transformers import GPT2LMHeadModel, GPTNeoForCausalLM, LlamaForCausalLM, PreTrainedModel

__all__ = ["causal_lm", "tiny_gpt2", "tiny_llama", "tiny_gpt_neo", "hf_logits"]

#: ``config.model_type`` -> the name of its causal-LM class in ``transformers``
_CAUSAL_LM = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gpt_neo": "GPTNeoForCausalLM"}


def _attention(attention: str | None) -> dict[str, Any]:
    return {} if attention is None else {"attn_implementation": attention}


def causal_lm(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    """The causal LM of a GPT-2, Llama or GPT-Neo ``config`` with weights drawn after ``manual_seed(seed)``.

    Args:
      config: a ``transformers`` ``GPT2Config``, ``LlamaConfig`` or ``GPTNeoConfig``.
      seed: seeds torch's CPU generator for the initialisation (the caller's RNG state is restored).
      dtype: the parameters' dtype (the weights are drawn in torch's default dtype, then cast).

    Returns:
      the model (``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``GPTNeoForCausalLM``) in eval mode.

    Raises:
      ValueError: a config of another model type.

    Example:
      >>> config = tiny_gpt2(attention=None).config          # SDPA: transformers' default
      >>> config._attn_implementation = "eager"              # switched on the config, before building
      >>> model = causal_lm(config, seed=1)
    """
    import transformers

    if config.model_type not in _CAUSAL_LM:
        raise ValueError(f"causal_lm: config.model_type must be one of {sorted(_CAUSAL_LM)}, got {config.model_type!r}")
    model_class = getattr(transformers, _CAUSAL_LM[config.model_type])
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype).eval()


def tiny_gpt2(
    *,
    seed: int = 0,
    layers: int = 2,
    positions: int = 12,
    attention: str | None = "eager",
    dtype: torch.dtype = torch.float64,
) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel``: vocabulary 23, width 8, 2 heads, ``layers`` blocks, no dropout, token 0 as bos/eos.

    Its ``Conv1D`` projections (``c_attn``, ``c_proj``, ``c_fc``) are Kronecker layers; the head is tied to the
    token embedding ``wte``.

    Args:
      seed: initialisation seed (see :func:`causal_lm`).
      layers: transformer blocks.
      positions: context length ``n_positions`` (rows of the position embedding ``wpe``).
      attention: ``"eager"`` (written-out attention, which forward-mode differentiation needs) or ``None`` for
        transformers' default (``"sdpa"``, the fused kernel).
      dtype: the parameters' dtype.

    Example:
      >>> model = tiny_gpt2()                                  # 2 blocks, 2,040 parameters
      >>> logits = model(torch.randint(0, 23, (2, 5))).logits  # [2, 5, 23]
    """
    import transformers

    config = transformers.GPT2Config(
        vocab_size=23,
        n_positions=positions,
        n_embd=8,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **_attention(attention),
    )
    return cast("GPT2LMHeadModel", causal_lm(config, seed=seed, dtype=dtype))


def tiny_llama(
    *,
    seed: int = 0,
    vocab: int = 19,
    heads: int = 4,
    kv_heads: int = 2,
    attention: str | None = "eager",
    dtype: torch.dtype = torch.float64,
) -> LlamaForCausalLM:
    """``LlamaForCausalLM``: width 16, MLP width 24, 2 layers, context 16, rotary positions, RMSNorm.

    ``kv_heads < heads`` is grouped-query attention. Its ``nn.Linear`` projections (q, k, v, o, gate, up, down
    and the untied ``lm_head``) are Kronecker layers; the RMSNorm weights and the embedding are not.

    Args:
      seed: initialisation seed (see :func:`causal_lm`).
      vocab: vocabulary size.
      heads: attention heads (must divide 16).
      kv_heads: key/value heads (must divide ``heads``).
      attention: ``"eager"`` or ``None`` for transformers' default (``"sdpa"``).
      dtype: the parameters' dtype.

    Example:
      >>> model = tiny_llama(vocab=17, heads=2, kv_heads=2)
      >>> logits = model(torch.randint(0, 17, (2, 6))).logits  # [2, 6, 17]
    """
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=16,
        **_attention(attention),
    )
    return cast("LlamaForCausalLM", causal_lm(config, seed=seed, dtype=dtype))


def tiny_gpt_neo(
    *,
    seed: int = 0,
    layers: int = 8,
    window: int = 4,
    positions: int = 64,
    attention: str | None = "eager",
    dtype: torch.dtype = torch.float64,
) -> GPTNeoForCausalLM:
    """``GPTNeoForCausalLM`` at the shape of TinyStories-1M: vocabulary 50,257, width 64, 16 heads, no dropout.

    The layers alternate global and local (sliding-window) attention, ``layers // 2`` pairs. The embedding
    (50,257 × 64) holds most of the parameters; the MLP ``c_fc`` / ``c_proj`` layers are ``nn.Linear``.

    Args:
      seed: initialisation seed (see :func:`causal_lm`).
      layers: transformer layers (even).
      window: the local layers' window; shorter than the sequences makes them really local.
      positions: context length ``max_position_embeddings``.
      attention: ``"eager"`` or ``None`` for transformers' default.
      dtype: the parameters' dtype.

    Example:
      >>> model = tiny_gpt_neo(layers=2)
      >>> model.config.attention_layers                        # ['global', 'local']
    """
    import transformers

    config = transformers.GPTNeoConfig(
        vocab_size=50257,
        hidden_size=64,
        num_layers=layers,
        num_heads=16,
        attention_types=[[["global", "local"], layers // 2]],
        window_size=window,
        max_position_embeddings=positions,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        **_attention(attention),
    )
    return cast("GPTNeoForCausalLM", causal_lm(config, seed=seed, dtype=dtype))


def hf_logits(model: nn.Module) -> Callable[[Params, dict], torch.Tensor]:
    """``(params, batch) -> logits [b, L, V]`` of a Hugging Face causal LM evaluated at ``params``.

    ``batch`` is a dict with ``"input_ids" [b, L]`` and optionally ``"attention_mask" [b, L]``; the model is
    called functionally (:func:`ifunc.call`), so its own parameters are never read where ``params`` has them.
    The argument :func:`ifunc.language.causal_lm_loss` takes.

    Example:
      >>> model = tiny_llama()
      >>> loss = ifunc.language.causal_lm_loss(hf_logits(model))
      >>> loss(ifunc.params_of(model), {"input_ids": torch.randint(0, 19, (2, 6))})   # summed over 2 × 5 targets
    """

    def logits(params: Params, batch: dict) -> torch.Tensor:
        out = call(model, params, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return out.logits

    return logits
