"""Llama-style decoders (tiny random LlamaConfig, eager attention, nothing downloaded) with the Kronecker family.

nn.Linear projections (q/k/v/o, gate/up/down) are Kronecker layers; RMSNorm weights are diagonal blocks split per
token by their own use kind (``y = w ⊙ x̂``: position t contributes ``q̃ᵀ(g_t ⊙ x̂_t)``); rotary positions have no
parameters.
"""

import pytest
import torch

import ifunc
from ifunc import language
from ifunc.ihvp.kronecker import capture_layer_grads, find_layers
from ifunc.ihvp.kronecker.uses import use_kind
from ifunc.testing import hf_logits, rel_error, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

VOCAB, L = 19, 6  # tiny_llama's vocabulary, the sequence length


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (5, L), generator=torch.Generator().manual_seed(1))
    return model, ifunc.params_of(model), language.causal_lm_loss(hf_logits(model)), {"input_ids": ids}


def test_layers_and_captured_grads_equal_per_sample_grads(llama):
    model, params, loss, data = llama
    layers, uncovered = find_layers(model, params)
    assert {s.kind for s in layers} == {"linear"} and len(layers) == 2 * 7 + 1  # q k v o gate up down, lm_head
    assert sorted(uncovered) == sorted(
        ["model.embed_tokens.weight", "model.norm.weight"]
        + [f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")]
    )
    assert all(use_kind(m).name == "rmsnorm" for n, m in model.named_modules() if n.endswith("norm"))
    captured = capture_layer_grads(loss, params, data, model=model)
    G = ifunc.per_sample_grads(loss, params, data, flat=False)
    for s in layers:
        torch.testing.assert_close(captured[s.name], G[s.weight], rtol=1e-9, atol=1e-12)


def test_rmsnorm_duck_typing():
    """torch's own RMSNorm and any *RMSNorm with a weight and an eps; not a LayerNorm look-alike without eps."""
    assert use_kind(torch.nn.RMSNorm(4)).name == "rmsnorm"

    class GemmaRMSNorm(torch.nn.Module):  # (1 + w) ⊙ x̂: the split uses ∂y/∂w = y(w=1) − y(w=0) = x̂
        def __init__(self):
            super().__init__()
            self.eps, self.weight = 1e-6, torch.nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    class NotANormRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

    assert use_kind(GemmaRMSNorm()).name == "rmsnorm"
    assert use_kind(NotANormRMSNorm()) is None
    # per-token split of the (1 + w) form against the per-example gradient
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), GemmaRMSNorm(), torch.nn.Linear(4, 7)).double()
    params = ifunc.params_of(model)
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    data = {"input_ids": torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))}
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1)
    tok = ifunc.attribute(loss, params, ek, data, data, per_token=True)
    assert rel_error(tok.sum(-1), ifunc.attribute(loss, params, ek, data, data)) < 1e-10


@pytest.mark.parametrize("attention", [False, True])
def test_llama_ekfac_pairwise_and_per_token(llama, attention):
    """Every parameter: Kronecker layers (all, or MLP-only) plus RMSNorm / embedding diagonal blocks."""
    model, params, loss, data = llama
    mods = language.transformer_modules(model, attention=attention) + ["lm_head"]
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, modules=mods, damping=0.1)
    assert ek.info["blocks"]["model.norm.weight"][0] == "diagonal"
    query = {"input_ids": data["input_ids"][:2]}
    pair = ifunc.attribute(loss, params, ek, data, query)
    torch.testing.assert_close(pair, ifunc.attribute(loss, params, lambda V: ek(V), data, query))  # generic path
    tok = ifunc.attribute(loss, params, ek, data, query, per_token=True)
    assert tok.shape == (2, 5, L)
    assert rel_error(tok.sum(-1), pair) < 1e-6
    assert torch.all(tok[..., -1] == 0)  # the last position predicts nothing and nothing reads it


def test_rmsnorm_per_token_split(llama):
    """The RMSNorm weights alone (identity closure: gradient dot products) split over positions and sum to the
    per-example-gradient scores; every position but the last carries a share."""
    model, params, loss, data = llama
    keep = [p for p in params if "norm" in p or p == "lm_head.weight"]
    ident = ifunc.ihvp_identity(params, model=model, exclude=[p for p in params if p not in keep])
    assert {ident.info["blocks"][p][0] for p in keep} == {"diagonal", "identity"}
    tok = ifunc.attribute(loss, params, ident, data, data, per_token=True)
    G = ifunc.per_sample_grads(loss, params, data, flat=False)
    ref = sum(G[p].flatten(1) @ G[p].flatten(1).T for p in keep)
    assert rel_error(tok.sum(-1), ref) < 1e-10
    assert (tok[..., :-1].abs() > 1e-8 * tok.abs().max()).float().mean() > 0.9


def test_llama_padding_with_attention_mask(llama):
    """Right padding: padded positions get exactly 0 and the real positions the scores of the unpadded sequence."""
    model, params, loss, data = llama
    mods = language.transformer_modules(model)
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, modules=mods, damping=0.1)
    query = {"input_ids": data["input_ids"][:2]}
    short = data["input_ids"][2:4, :4]
    padded = {
        "input_ids": torch.cat([short, torch.full((2, 2), 3)], 1),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]),
    }
    tp = ifunc.attribute(loss, params, ek, padded, query, per_token=True, token_mask=language.token_mask)
    tu = ifunc.attribute(loss, params, ek, {"input_ids": short}, query, per_token=True)
    torch.testing.assert_close(tp[..., :4], tu, rtol=1e-8, atol=1e-10)
    assert torch.all(tp[..., 4:] == 0)
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ek, padded, query), ifunc.attribute(loss, params, ek, {"input_ids": short}, query)
    )
