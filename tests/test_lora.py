"""LoRA adapters (peft): influence over the adapter matrices alone, the frozen base untouched.

``ifunc.params_of(peft_model)`` (``trainable_only=True``) gives exactly the ``lora_A`` / ``lora_B`` weights; they
are ``nn.Linear`` modules, so the Kronecker family captures them like any layer.
"""

import pytest
import torch
import torch.nn.functional as F

import ifunc
from ifunc import language
from ifunc.ihvp.kronecker import capture_layer_grads, find_layers, layout
from ifunc.testing import hf_logits, rel_error, tiny_llama

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

LAM = 0.05


def lora_mlp(seed: int = 0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    return model, ifunc.params_of(model), loss, (x, y)


def _frozen(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _block_solve(H, params, groups):
    """Dense solve of the block-diagonal part of ``H`` (one block per group of parameter names)."""
    lay = layout(params)
    out = torch.zeros_like(H)
    for names in groups:
        idx = torch.cat([torch.arange(lay[n].start, lay[n].stop) for n in names])
        out[idx[:, None], idx] = torch.linalg.inv(H[idx[:, None], idx] + LAM * torch.eye(len(idx)))
    return out


def test_params_are_the_lora_matrices_only():
    model, params, loss, data = lora_mlp()
    assert sorted(params) == sorted(
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("0", "2") for ab in ("A", "B")
    )
    layers, uncovered = find_layers(model, params)
    assert len(layers) == 4 and not uncovered and all(s.kind == "linear" for s in layers)
    G = ifunc.per_sample_grads(loss, params, data, flat=False)
    captured = capture_layer_grads(loss, params, data, model=model)
    for s in layers:
        torch.testing.assert_close(captured[s.name], G[s.weight])


def test_lora_scores_equal_the_dense_solve():
    """explicit and CG equal G_q (GGN + λI)^{-1} G_trᵀ; EK-FAC (GGN) and DataInf (empirical Fisher) are exact on
    one training example (a block per layer, rank one); the frozen base is never touched."""
    model, params, loss, data = lora_mlp()
    before, flags = _frozen(model), {n: p.requires_grad for n, p in model.named_parameters()}
    Gtr = ifunc.per_sample_grads(loss, params, data)
    query = (data[0][:3], data[1][:3])
    Gq = Gtr[:3]
    H = ifunc.ggn(loss, params, data)
    ref = Gq @ torch.linalg.solve(H + LAM * torch.eye(len(H)), Gtr.T)
    explicit = ifunc.ihvp_explicit(loss, params, data, damping=LAM, curvature="ggn")
    assert rel_error(ifunc.attribute(loss, params, explicit, data, query), ref) < 1e-10
    cg = ifunc.ihvp_cg(loss, params, data, damping=LAM, curvature="ggn", tol=1e-12, maxiter=200)
    assert rel_error(ifunc.attribute(loss, params, cg, data, query), ref) < 1e-6

    one = (data[0][:1], data[1][:1])
    groups = [[n] for n in params]  # one block per LoRA layer
    ek = ifunc.ihvp_ekfac(loss, params, one, model=model, damping=LAM, curvature="ggn")
    ref_ek = Gq @ _block_solve(ifunc.ggn(loss, params, one), params, groups) @ Gtr.T
    assert rel_error(ifunc.attribute(loss, params, ek, data, query), ref_ek) < 1e-8
    di = ifunc.ihvp_datainf(loss, params, one, damping=LAM)
    g = Gtr[:1]
    assert {m for _, m in di.info["blocks"].values()} == {n.rsplit(".", 1)[0] for n in params}  # a block per layer
    ref_di = Gq @ _block_solve(g.T @ g, params, groups) @ Gtr.T
    assert rel_error(ifunc.attribute(loss, params, di, data, query), ref_di) < 1e-8
    for k, v in _frozen(model).items():
        assert torch.equal(v, before[k]), k
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_lora_llama_per_token():
    base = tiny_llama(vocab=17, heads=2, kv_heads=2)
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1, init_lora_weights=False
    )
    model = peft.get_peft_model(base, lora).eval()  # eval: LoRA's dropout is off
    params = ifunc.params_of(model)
    assert len(params) == 2 * 3 * 2 and all(".lora_" in n for n in params)
    loss = language.causal_lm_loss(hf_logits(model))
    ids = torch.randint(0, 17, (4, 6), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    data["attention_mask"][3, 4:] = 0
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1)
    assert {v[0] for v in ek.info["blocks"].values()} == {"ekfac"}
    pair = ifunc.attribute(loss, params, ek, data, data)
    torch.testing.assert_close(pair, ifunc.attribute(loss, params, lambda V: ek(V), data, data))
    tok = ifunc.attribute(loss, params, ek, data, data, per_token=True, token_mask=language.token_mask)
    assert rel_error(tok.sum(-1), pair) < 1e-6 and torch.all(tok[:, 3, 4:] == 0)
