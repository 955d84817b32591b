"""GPT-Neo at the shape of TinyStories-1M (random weights from GPTNeoConfig, nothing downloaded): MLP-only EK-FAC
and per-token scores, as in the tokenwise-influence write-up. ``benchmarks/gpt_neo.py`` times
the same set-up on 1,000 sequences of 128 tokens."""

import pytest
import torch

import ifunc
from ifunc import language
from ifunc.testing import rel_error

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")


def tinystories_shape(layers: int = 8):
    cfg = transformers.GPTNeoConfig(
        vocab_size=50257,
        hidden_size=64,
        num_layers=layers,
        num_heads=16,
        attention_types=[[["global", "local"], layers // 2]],
        window_size=4,  # shorter than the sequences, so the local layers really are local
        max_position_embeddings=64,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.GPTNeoForCausalLM(cfg).to(torch.float64).eval()


def test_gpt_neo_mlp_only_ekfac_per_token():
    model = tinystories_shape()
    assert model.config.attention_layers[:2] == ["global", "local"]
    params = ifunc.params_of(model)
    loss = language.causal_lm_loss(
        lambda p, b: ifunc.call(model, p, b["input_ids"], attention_mask=b.get("attention_mask")).logits
    )
    gen = torch.Generator().manual_seed(1)
    train = {"input_ids": torch.randint(0, 50257, (3, 8), generator=gen)}
    train["attention_mask"] = torch.ones_like(train["input_ids"])
    train["attention_mask"][2, 6:] = 0  # one right-padded sequence
    query = {"input_ids": torch.randint(0, 50257, (2, 8), generator=gen)}
    mods = language.transformer_modules(model, attention=False)
    assert len(mods) == 16 and all(".mlp." in m for m in mods)
    ek = ifunc.ihvp_ekfac(
        loss,
        params,
        train,
        model=model,
        modules=mods,
        exclude=language.untracked(model, params, modules=mods),
        sample="categorical",
        generator=torch.Generator().manual_seed(0),
        damping=None,
    )
    pair = ifunc.attribute(loss, params, ek, train, query)
    tok = ifunc.attribute(loss, params, ek, train, query, per_token=True, token_mask=language.token_mask)
    assert tok.shape == (2, 3, 8)
    assert rel_error(tok.sum(-1), pair) < 1e-6
    assert torch.all(tok[:, 2, 6:] == 0) and torch.all(tok[..., -1] == 0)
    torch.testing.assert_close(pair, ifunc.attribute(loss, params, lambda V: ek(V), train, query))  # generic path
