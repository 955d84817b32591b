"""GPT-Neo at the shape of TinyStories-1M (``ifunc.testing.tiny_gpt_neo``: random weights, nothing downloaded):
MLP-only EK-FAC and per-token scores, as in the tokenwise-influence write-up. ``benchmarks/gpt_neo.py`` times
the same set-up on 1,000 sequences of 128 tokens."""

import pytest
import torch

import ifunc
from ifunc import language
from ifunc.testing import hf_logits, rel_error, tiny_gpt_neo

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")


def test_gpt_neo_mlp_only_ekfac_per_token():
    model = tiny_gpt_neo()  # window 4: shorter than the sequences, so the local layers really are local
    assert model.config.attention_layers[:2] == ["global", "local"]
    params = ifunc.params_of(model)
    loss = language.causal_lm_loss(hf_logits(model))
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
