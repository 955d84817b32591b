"""Language models: per-token scores, padding, measurements."""

import pytest
import torch

import ifunc
from ifunc import language, measurements
from ifunc.ihvp.kronecker import layout
from ifunc.testing import TinyGPT, rel_error

VOCAB, L = 11, 7


def _lm(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyGPT(vocab=VOCAB, width=8, heads=2, layers=2, context=L, **kw).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (6, L), generator=gen)
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"], b.get("attention_mask")))
    return model, ifunc.params_of(model), loss, {"input_ids": ids}


def _closure(method, model, params, loss, data, exclude=True, **kw):
    excl = language.untracked(model, params) if exclude else []
    if method is ifunc.ihvp_identity:
        return ifunc.ihvp_identity(params, model=model, exclude=excl, damping=0.5)
    return method(loss, params, data, model=model, exclude=excl, damping=0.1, **kw)


@pytest.mark.parametrize("method", [ifunc.ihvp_ekfac, ifunc.ihvp_kfac, ifunc.ihvp_diagonal, ifunc.ihvp_identity])
@pytest.mark.parametrize("shared,exclude", [(False, True), (True, True), (False, False)])
def test_per_token_sums_to_pairwise(method, shared, exclude):
    """exclude=False: embeddings and LayerNorms are diagonal blocks, split per token from their own hooks."""
    model, params, loss, data = _lm(shared=shared)
    ih = _closure(method, model, params, loss, data, exclude=exclude)
    query = {"input_ids": data["input_ids"][:2]}
    pair = ifunc.attribute(loss, params, ih, data, query)
    tok = ifunc.attribute(loss, params, ih, data, query, per_token=True, chunk_size=4)
    assert tok.shape == (2, 6, L)
    assert rel_error(tok.sum(-1), pair) < 1e-5
    torch.testing.assert_close(pair, ifunc.attribute(loss, params, lambda V: ih(V), data, query))  # generic path
    # true per-token scores: not the sequence score spread or put on one position; the last input position
    # predicts nothing (no target) and nothing reads it (causal), so it gets exactly 0
    assert torch.all(tok[..., -1] == 0)
    assert (tok[..., :-1].abs() > 1e-8 * tok.abs().max()).float().mean() > 0.9
    low = ifunc.attribute(loss, params, ih, data, query, per_token=True, query_rank=1)
    assert rel_error(low.sum(-1), ifunc.attribute(loss, params, ih, data, query, query_rank=1)) < 1e-5


def test_shared_block_scores_every_call():
    """A block applied twice: its per-token scores include both calls (Kronfluence falls back to sequences)."""
    model, params, loss, data = _lm(shared=True)
    ih = _closure(ifunc.ihvp_identity, model, params, loss, data)
    G = ifunc.per_sample_grads(loss, params, data)
    pair = ifunc.attribute(loss, params, ih, data, data)
    # identity closure over the tracked layers = dot products of those parameters' gradients
    lay, skip = layout(params), language.untracked(model, params)
    idx = torch.cat([torch.arange(lay[p].start, lay[p].stop) for p in lay if p not in skip])
    torch.testing.assert_close(pair, G[:, idx] @ G[:, idx].T / 0.5)
    tok = ifunc.attribute(loss, params, ih, data, data, per_token=True)
    assert rel_error(tok.sum(-1), pair) < 1e-5


def _pad(seqs, length, left=False):
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for j, s in enumerate(seqs):
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[j, sl], mask[j, sl] = s, True
    ids[~mask] = 3  # any token: padding must not matter
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("left", [False, True])
def test_padding_gives_the_scores_of_unpadded_sequences(left):
    model, params, loss, data = _lm(seed=2)
    ih = _closure(ifunc.ihvp_ekfac, model, params, loss, data)  # factors fitted on full-length data
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (7, 4, 5, 2)]
    query = {"input_ids": data["input_ids"][:2]}
    padded = _pad(seqs, L, left=left)
    tok = ifunc.attribute(loss, params, ih, padded, query, per_token=True, token_mask=language.token_mask)
    pair = ifunc.attribute(loss, params, ih, padded, query)
    for j, s in enumerate(seqs):
        alone = {"input_ids": s[None]}
        ref_tok = ifunc.attribute(loss, params, ih, alone, query, per_token=True)[:, 0]
        real = padded["attention_mask"][j]
        torch.testing.assert_close(tok[:, j][:, real], ref_tok)
        assert torch.all(tok[:, j][:, ~real] == 0)
        torch.testing.assert_close(pair[:, j], ifunc.attribute(loss, params, ih, alone, query)[:, 0])
    # padded queries too
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ih, data, padded),
        torch.cat([ifunc.attribute(loss, params, ih, data, {"input_ids": s[None]}) for s in seqs]),
    )


class _Scaled(torch.nn.Module):
    """A free parameter used outside any supported module, and a position embedding of arange(T)."""

    def __init__(self, free: bool):
        super().__init__()
        self.free = free
        self.tok, self.pos, self.lin = torch.nn.Embedding(5, 3), torch.nn.Embedding(4, 3), torch.nn.Linear(3, 5)
        self.s = torch.nn.Parameter(torch.ones(3))

    def forward(self, ids):
        h = self.tok(ids) * self.s if self.free else self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.lin(torch.tanh(h))


def test_per_token_refuses_uses_it_cannot_split():
    model = _Scaled(free=True).double()
    params = ifunc.params_of(model)
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    data = {"input_ids": torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))}
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1)
    with pytest.raises(ValueError, match=r"\['s \(in a _Scaled\)'\].*exclude="):
        ifunc.attribute(loss, params, ek, data, data, per_token=True)
    ok = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1, exclude=["s"])
    tok = ifunc.attribute(loss, params, ok, data, data, per_token=True)
    assert rel_error(tok.sum(-1), ifunc.attribute(loss, params, ok, data, data)) < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_position_embedding_of_arange_splits_per_token(batch):
    """nanoGPT-style ``pos(arange(T))`` ([T, C], broadcast over the batch): the hook broadcasts it to the
    examples, so row t's share goes to position t and the tokens sum to the pairwise scores."""
    model = _Scaled(free=False).double()
    params = {k: v for k, v in ifunc.params_of(model).items() if k != "s"}  # s is unused here
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    data = {"input_ids": torch.randint(0, 5, (batch, 4), generator=torch.Generator().manual_seed(0))}
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1)
    assert ek.info["blocks"]["pos.weight"][0] == "diagonal"
    tok = ifunc.attribute(loss, params, ek, data, data, per_token=True)
    assert rel_error(tok.sum(-1), ifunc.attribute(loss, params, ek, data, data)) < 1e-10
    # the position table alone: position t gets q̃[t] · g_t (identity closure: per-example gradient rows)
    ident = ifunc.ihvp_identity(params, model=model, exclude=["tok"])
    lin = ifunc.ihvp_identity(params, model=model, exclude=["tok", "pos"])
    rows = ifunc.attribute(loss, params, ident, data, data, per_token=True)
    rows = rows - ifunc.attribute(loss, params, lin, data, data, per_token=True)
    G = ifunc.per_sample_grads(loss, params, data, flat=False)["pos.weight"]
    torch.testing.assert_close(rows, torch.einsum("qtc,btc->qbt", G, G))


def test_per_token_errors():
    model, params, loss, data = _lm()
    with pytest.raises(ValueError, match="Kronecker-family"):
        ifunc.attribute(loss, params, lambda V: V, data, data, per_token=True)
    ih = _closure(ifunc.ihvp_identity, model, params, loss, data)
    with pytest.raises(ValueError, match="token_mask"):
        ifunc.attribute(loss, params, ih, data, data, per_token=True, token_mask=lambda b: torch.ones(2, 2))
    with pytest.raises(ValueError, match="per_token=True"):
        ifunc.attribute(loss, params, ih, data, data, token_mask=language.token_mask)
    with pytest.raises(NotImplementedError):
        ifunc.attribute(loss, params, ih, data, data, per_token=True, per_module=True)


def test_tied_head_gives_true_per_token_scores():
    """The tied weight is used by the embedding and by the head: both uses are split per token."""
    model, params, loss, data = _lm(tied=True)
    assert "head.weight" not in params  # the embedding owns the tied weight: a diagonal block
    ek = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1)
    assert ek.info["blocks"]["tok.weight"][0] == "diagonal"
    pair = ifunc.attribute(loss, params, ek, data, data)
    torch.testing.assert_close(pair, ifunc.attribute(loss, params, lambda V: ek(V), data, data))
    tok = ifunc.attribute(loss, params, ek, data, data, per_token=True)
    assert rel_error(tok.sum(-1), pair) < 1e-5
    only = ifunc.ihvp_identity(
        params, model=model, exclude=[p for p in params if p != "tok.weight" and not p.startswith("blocks.0.mlp.fc")]
    )
    t_only = ifunc.attribute(loss, params, only, data, data, per_token=True)
    assert rel_error(t_only.sum(-1), ifunc.attribute(loss, params, only, data, data)) < 1e-5
    assert (t_only[..., :-1].abs() > 0).float().mean() > 0.9  # not one position, not a flat spread


# ---------------------------------------------------------------- measurements


def _prompted(model):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (3, L), generator=gen)
    completion = torch.zeros(3, L, dtype=torch.bool)
    completion[:, 4:] = True  # the last 3 tokens are the completion
    return {"input_ids": ids, "labels": ids.clone(), "completion": completion}


def _f(model):
    return measurements.completion_nll(
        lambda p, b: ifunc.call(model, p, b["input_ids"][:, :-1]),
        targets=lambda b: b["labels"][:, 1:],
        completion_mask=lambda b: b["completion"][:, 1:],
    )


def test_completion_nll_ignores_prompt_targets():
    model, params, loss, data = _lm()
    f, batch = _f(model), _prompted(model)
    g1 = ifunc.per_sample_grads(f, params, batch)
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][:, 1:4] = (changed["labels"][:, 1:4] + 1) % VOCAB  # prompt targets only
    torch.testing.assert_close(ifunc.per_sample_grads(f, params, changed), g1)
    changed["labels"][:, 5] = (changed["labels"][:, 5] + 1) % VOCAB  # a completion target
    g2 = ifunc.per_sample_grads(f, params, changed)
    assert bool(((g2 - g1).norm(dim=1) > 0.1 * g1.norm(dim=1)).all())  # every example's gradient moves (~0.8)
    # value: − Σ log p over completion targets; all-ones mask = the training loss
    logits = model(batch["input_ids"][:, :-1])
    lp = torch.log_softmax(logits, -1).gather(-1, batch["labels"][:, 1:, None])[..., 0]
    torch.testing.assert_close(f(params, batch), -lp[:, 3:].sum())
    full = dict(batch, completion=torch.ones_like(batch["completion"]))
    torch.testing.assert_close(f(params, full), loss(params, {"input_ids": batch["input_ids"]}))
    ih = _closure(ifunc.ihvp_ekfac, model, params, loss, data)
    s = ifunc.attribute(loss, params, ih, data, batch, measurement=f, per_token=True)
    assert s.shape == (3, 6, L)
    with pytest.raises(ValueError, match="completion_nll"):
        measurements.completion_nll(
            lambda p, b: torch.zeros(3, 2, VOCAB),
            targets=lambda b: b["labels"],
            completion_mask=lambda b: b["completion"],
        )(params, batch)


def test_margin_and_output_measurement():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 1])
    f = measurements.negative_margin(lambda p, b: p["z"], labels=lambda b: b)
    ref = -sum(float(logits[j, y[j]] - torch.logsumexp(logits[j][torch.arange(3) != y[j]], 0)) for j in range(2))
    assert float(f({"z": logits}, y)) == pytest.approx(ref)
    g = measurements.output_measurement(lambda p, b: p["z"], lambda out, b: -out[:, 2].sum())
    assert float(g({"z": logits}, y)) == pytest.approx(-(-1.0 + 0.3))
    with pytest.raises(ValueError, match="labels"):
        f({"z": logits}, torch.tensor([0]))


def test_transformer_modules_picker():
    model, params, _, _ = _lm()
    mlp = language.transformer_modules(model, attention=False)
    assert mlp == ["blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"]
    both = language.transformer_modules(model)
    assert len(both) == 12 and "head" not in both
    with pytest.raises(ValueError):
        language.transformer_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fisher_draws_ignore_padding_and_the_last_position():
    """True-Fisher factors fitted on a right-padded batch equal those of the unpadded sequences (S, Λ)."""
    model, params, loss, data = _lm(seed=4)
    ids = data["input_ids"][:2]
    padded = {
        "input_ids": torch.cat([ids, torch.full((2, 3), 5)], 1)[:, :L],
        "attention_mask": torch.cat([torch.ones(2, 4), torch.zeros(2, 3)], 1).bool(),
    }
    short = {"input_ids": ids[:, :4]}
    fit = lambda b: ifunc.fit_kronecker_factors(loss, params, b, model=model, curvature="ggn")  # noqa: E731
    a, b = fit(padded), fit(short)
    for name in b.factors:
        torch.testing.assert_close(a.factors[name].S, b.factors[name].S)
        torch.testing.assert_close(a.factors[name].diag, b.factors[name].diag)


def test_ekfac_fit_skips_the_unused_diagonal():
    """ihvp_ekfac / ihvp_kfac fit without D = E[DW²] (as costly as Λ for sequences); ihvp_diagonal asks for it."""
    model, params, loss, data = _lm(seed=6)
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model, diagonal=False)
    assert all(lf.diag is None and lf.ekfac.shape == (lf.eig_S.numel(), lf.eig_A.numel()) for lf in f.factors.values())
    full = ifunc.fit_kronecker_factors(loss, params, data, model=model)
    v = torch.randn(sum(t.numel() for t in params.values()), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        ifunc.ihvp_ekfac(loss, params, f, model=model, damping=0.1)(v),
        ifunc.ihvp_ekfac(loss, params, full, model=model, damping=0.1)(v),
    )
    with pytest.raises(ValueError, match="diagonal=True"):
        ifunc.ihvp_diagonal(loss, params, f, model=model)
