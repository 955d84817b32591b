"""Hugging Face GPT-2 (tiny random config, eager attention, no downloads) with the Kronecker family."""

import pytest
import torch

import ifunc
from ifunc import language
from ifunc.ihvp.kronecker import capture_layer_grads, find_layers
from ifunc.testing import causal_lm, hf_logits, tiny_gpt2

transformers = pytest.importorskip(
    "transformers",
    reason="transformers is not installed (pip install -e '.[test]' installs it); skipping the "
    "Hugging Face GPT-2 tests",
)

VOCAB = 23  # tiny_gpt2's vocabulary


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    params = ifunc.params_of(model)
    loss = language.causal_lm_loss(hf_logits(model))
    ids = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(1))
    return model, params, loss, {"input_ids": ids}


def test_captured_conv1d_grads_equal_per_sample_grads(gpt2):
    model, params, loss, data = gpt2
    layers, uncovered = find_layers(model, params)
    assert {s.kind for s in layers} == {"conv1d"} and len(layers) == 8
    assert "transformer.wte.weight" in uncovered  # tied with lm_head: the embedding owns it
    captured = capture_layer_grads(loss, params, data, model=model)
    G = ifunc.per_sample_grads(loss, params, data, flat=False)
    for s in layers:
        ref = torch.cat([G[s.weight].transpose(1, 2), G[s.bias][..., None]], dim=-1)
        torch.testing.assert_close(captured[s.name], ref)


def test_module_picker(gpt2):
    model = gpt2[0]
    assert language.transformer_modules(model, attention=False) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    both = language.transformer_modules(model)
    assert len(both) == 8 and "transformer.h.1.attn.c_attn" in both


@pytest.mark.parametrize("attention", [False, True])
def test_gpt2_ekfac_per_token_and_padding(gpt2, attention):
    model, params, loss, data = gpt2
    mods = language.transformer_modules(model, attention=attention)
    ih = ifunc.ihvp_ekfac(
        loss,
        params,
        data,
        model=model,
        modules=mods,
        damping=0.1,
        exclude=language.untracked(model, params, modules=mods),
    )
    query = {"input_ids": data["input_ids"][:2]}
    pair = ifunc.attribute(loss, params, ih, data, query)
    torch.testing.assert_close(pair, ifunc.attribute(loss, params, lambda V: ih(V), data, query))
    tok = ifunc.attribute(loss, params, ih, data, query, per_token=True)
    assert float((tok.sum(-1) - pair).abs().max()) <= 1e-5 * float(pair.abs().max())
    # right padding with an attention mask: the scores of the unpadded sequence
    short = data["input_ids"][:1, :4]
    padded = {
        "input_ids": torch.cat([short, torch.full((1, 2), 7)], 1),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
    }
    tp = ifunc.attribute(loss, params, ih, padded, query, per_token=True, token_mask=language.token_mask)
    tu = ifunc.attribute(loss, params, ih, {"input_ids": short}, query, per_token=True)
    torch.testing.assert_close(tp[..., :4], tu)
    assert torch.all(tp[..., 4:] == 0)


def test_gpt2_tied_head_per_token(gpt2):
    """wte is used by the embedding and by the tied lm_head, LayerNorms by their modules, wpe by a lookup of
    position ids [1, T] shared by the batch: all split per token, nothing excluded."""
    model, params, loss, data = gpt2
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1)
    pair = ifunc.attribute(loss, params, ek, data, data)
    tok = ifunc.attribute(loss, params, ek, data, data, per_token=True)
    assert float((tok.sum(-1) - pair).abs().max()) <= 1e-6 * float(pair.abs().max())


def test_gpt2_position_embedding_rows_per_token(gpt2):
    """Row t of wpe is read only at position t: its per-token score is q̃[t] · g_t, which with the identity
    closure is the dot product of row t of the query's and the example's per-example wpe gradients."""
    model, params, loss, data = gpt2
    keep = ["transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight"]
    ident = ifunc.ihvp_identity(
        params, model=model, modules=["transformer.h.0.mlp.c_fc"], exclude=[p for p in params if p not in keep]
    )
    only_fc = ifunc.ihvp_identity(params, model=model, exclude=[p for p in params if p != keep[1]])
    tok = ifunc.attribute(loss, params, ident, data, data, per_token=True)
    wpe = tok - ifunc.attribute(loss, params, only_fc, data, data, per_token=True)
    G = ifunc.per_sample_grads(loss, params, data, flat=False)["transformer.wpe.weight"][:, :6]  # rows 0..T-1
    torch.testing.assert_close(wpe, torch.einsum("qtc,btc->qbt", G, G), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the default attention (SDPA) and forward mode


def _tiny_gpt2(how: str = "default"):
    """A one-layer GPT-2 with SDPA (``how="default"``) or eager attention chosen in one of the documented ways."""
    model = tiny_gpt2(layers=1, positions=8, attention="eager" if how == "config-argument" else None)
    if how == "config-attribute":  # set on an existing config, before the model is built from it
        config = model.config
        config._attn_implementation = "eager"
        model = causal_lm(config)
    if how == "set_attn_implementation":
        model.set_attn_implementation("eager")
    loss = language.causal_lm_loss(hf_logits(model))
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    return model, loss, {"input_ids": ids}


SDPA_ERROR = (
    r"torch\.func hit attention through torch's fused scaled_dot_product_attention .*no forward-mode derivative.*"
    r'from_pretrained\(name, attn_implementation="eager"\).*config\._attn_implementation = "eager".*'
    r'model\.set_attn_implementation\("eager"\)'
)

BUILDERS = {
    "cg": lambda loss, p, data: ifunc.ihvp_cg(loss, p, data, damping=0.1),
    # the Hessian's columns are forward-over-reverse products (the GGN and the Fishers are built without forward mode)
    "explicit": lambda loss, p, data: ifunc.ihvp_explicit(loss, p, data, damping=0.1, curvature="hessian"),
    "arnoldi": lambda loss, p, data: ifunc.ihvp_arnoldi(loss, p, data, rank=2, damping=0.1),
    "nystrom": lambda loss, p, data: ifunc.ihvp_nystrom(loss, p, data, rank=2, damping=0.1),
    "lissa": lambda loss, p, data: ifunc.ihvp_lissa(loss, p, data, damping=0.1, depth=2, tol=None),
    "lissa-minibatch": lambda loss, p, data: ifunc.ihvp_lissa(
        loss, p, data, damping=0.1, scale=100.0, depth=2, batch_size=1, tol=None
    ),
}


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_default_sdpa_attention_is_explained_for_every_forward_mode_method(method):
    model, loss, data = _tiny_gpt2()  # no attn_implementation: transformers picks SDPA
    assert model.config._attn_implementation == "sdpa"
    params = ifunc.params_of(model)
    with pytest.raises(RuntimeError, match=SDPA_ERROR) as info:
        ifunc.attribute(loss, params, BUILDERS[method](loss, params, data), data, data)
    assert isinstance(info.value.__cause__, NotImplementedError)  # torch's own message stays in the chain


@pytest.mark.parametrize("how", ["config-argument", "config-attribute", "set_attn_implementation"])
def test_each_eager_switch_the_message_names_works(how):
    model, loss, data = _tiny_gpt2(how)
    assert model.config._attn_implementation == "eager"
    params = ifunc.params_of(model)
    scores = ifunc.attribute(loss, params, ifunc.ihvp_cg(loss, params, data, damping=0.1), data, data)
    exact = ifunc.attribute(loss, params, ifunc.ihvp_explicit(loss, params, data, damping=0.1), data, data)
    torch.testing.assert_close(scores, exact, rtol=1e-4, atol=1e-8)
