"""nn.Embedding as a Kronecker layer: one-hot inputs carried as ids, exact cases, scores, ties, padding."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ifunc
from ifunc import language
from ifunc.ihvp.kronecker import find_layers, layout
from ifunc.ihvp.kronecker.capture import WeightUseError
from ifunc.testing import TinyGPT

V, D, OUT = 11, 4, 3
LAM = 0.5


def dense(ihvp) -> torch.Tensor:
    """The approximate curvature matrix a closure inverts: ``inv(closure(I)) − λI``."""
    eye = torch.eye(ihvp.dim)
    return torch.linalg.inv(ihvp(eye)) - ihvp.damping * eye


def block_diag_of(M, params, groups) -> torch.Tensor:
    """``M`` kept on the blocks of the parameter-name ``groups``, zero elsewhere."""
    lay, out = layout(params), torch.zeros_like(M)
    for names in groups:
        idx = torch.cat([torch.arange(lay[p].start, lay[p].stop) for p in names])
        out[idx[:, None], idx] = M[idx[:, None], idx]
    return out


def emb_problem(*, seed=0, n=6, T=5, padding_idx=None, activation=None, task="regression", sparse=False):
    """``Embedding(11, 4)`` then ``Linear(4, 3)`` per position; MSE (or cross-entropy) summed over positions."""
    torch.manual_seed(seed)
    emb = nn.Embedding(V, D, padding_idx=padding_idx, sparse=sparse)
    model = nn.Sequential(emb, activation or nn.Identity(), nn.Linear(D, OUT))
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, V, (n, T), generator=gen)
    if padding_idx is not None:
        x[:, -1] = padding_idx  # every sequence ends with padding, one has more
        x[0, 0] = padding_idx
    if task == "regression":
        y = torch.randn(n, T, OUT, generator=gen)
        on_out = lambda out, b: 0.5 * ((out - b[1]) ** 2).sum()  # noqa: E731
    else:
        y = torch.randint(0, OUT, (n, T), generator=gen)
        on_out = lambda out, b: F.cross_entropy(out.reshape(-1, OUT), b[1].reshape(-1), reduction="sum")  # noqa: E731
    loss = ifunc.output_loss(lambda p, b: ifunc.call(model, p, b[0]), on_out)
    return model, ifunc.params_of(model), loss, (x, y)


GROUPS = [["0.weight"], ["2.weight", "2.bias"]]


# ---------------------------------------------------------------- exact cases


@pytest.mark.parametrize("method", [ifunc.ihvp_kfac, ifunc.ihvp_ekfac])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_exact_for_linear_mse(method, T, padding_idx):
    """Embedding -> Linear with squared error and the exact GGN: g does not depend on the tokens, so the embedding
    block is diag(token counts) ⊗ S exactly (the padding row has none) and K-FAC = EK-FAC = the block-diagonal GGN."""
    model, params, loss, data = emb_problem(seed=T, T=T, padding_idx=padding_idx)
    approx = dense(method(loss, params, data, model=model, modules=["0", "2"], damping=LAM, curvature="ggn"))
    torch.testing.assert_close(approx, block_diag_of(ifunc.ggn(loss, params, data), params, GROUPS))


@pytest.mark.parametrize("method", [ifunc.ihvp_kfac, ifunc.ihvp_ekfac])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_exact_for_one_token(method, task):
    """One example at one position: every layer's gradient is rank one, so both are the block-diagonal GGN."""
    model, params, loss, data = emb_problem(seed=4, n=1, T=1, activation=nn.Tanh(), task=task)
    approx = dense(method(loss, params, data, model=model, modules=["0", "2"], damping=LAM, curvature="ggn"))
    torch.testing.assert_close(approx, block_diag_of(ifunc.ggn(loss, params, data), params, GROUPS))


def test_diagonal_is_the_fisher_diagonal():
    model, params, loss, data = emb_problem(seed=5, activation=nn.Tanh(), task="classification")
    ih = ifunc.ihvp_diagonal(loss, params, data, model=model, modules=["0"], damping=LAM, curvature="empirical_fisher")
    G = ifunc.per_sample_grads(loss, params, data)
    torch.testing.assert_close(dense(ih), torch.diag((G**2).mean(0)))


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 4))
def test_ekfac_never_farther_than_kfac(seed, n, T):
    """Λ is the Frobenius-optimal diagonal in the basis Q_S ⊗ I, so the embedding's EK-FAC block is never farther
    from its empirical Fisher block than K-FAC's."""
    model, params, loss, data = emb_problem(seed=seed, n=n, T=T, activation=nn.Tanh(), task="classification")
    factors = ifunc.fit_kronecker_factors(loss, params, data, model=model, modules=["0"], curvature="empirical_fisher")
    ek = dense(ifunc.ihvp_ekfac(loss, params, factors, model=model, damping=LAM))
    kf = dense(ifunc.ihvp_kfac(loss, params, factors, model=model, damping=LAM))
    G = ifunc.per_sample_grads(loss, params, data)
    idx = torch.arange(layout(params)["0.weight"].start, layout(params)["0.weight"].stop)
    target = (G.T @ G / n)[idx[:, None], idx]
    d_ek, d_kf = (target - ek[idx[:, None], idx]).norm(), (target - kf[idx[:, None], idx]).norm()
    assert d_ek <= d_kf + 1e-9 * (1 + target.norm())


# ---------------------------------------------------------------- factors: the input factor is a vector


def test_input_factor_is_token_frequencies():
    model, params, loss, data = emb_problem(seed=6, padding_idx=3)
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model, modules=["0"], curvature="empirical_fisher")
    emb = f.factors["0"]
    x = data[0]
    counts = torch.bincount(x[x != 3], minlength=V).double() / x.numel()
    assert emb.Q_A is None and emb.A is not None
    torch.testing.assert_close(emb.A, counts)
    torch.testing.assert_close(emb.eig_A, counts)
    assert emb.eig_A[3] == 0 and emb.ekfac is not None and emb.diag is not None
    assert emb.ekfac.shape == emb.diag.shape == (D, V) and emb.S is not None and emb.S.shape == (D, D)
    assert "A [11]" in repr(f)


def test_factors_round_trip_through_a_file(tmp_path):
    model, params, loss, data = emb_problem(seed=7, activation=nn.Tanh(), task="classification")
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model, modules=["0", "2"], curvature="empirical_fisher")
    ifunc.save_factors(tmp_path / "f.h5", f, params)
    g = ifunc.load_factors(tmp_path / "f.h5", params)
    assert g.factors["0"].Q_A is None
    v = torch.randn(3, sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(0))
    a = ifunc.ihvp_ekfac(loss, params, f, model=model, damping=LAM)
    b = ifunc.ihvp_ekfac(loss, params, g, model=model, damping=LAM)
    torch.testing.assert_close(a(v), b(v))


# ---------------------------------------------------------------- scores equal the closure on per-sample gradients


def _lm(tied=False, seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(vocab=V, width=8, heads=2, layers=1, context=6, tied=tied).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, V, (5, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding: the pad tokens' rows of tok and pos get no gradient
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"], b["attention_mask"]))
    return model, ifunc.params_of(model), loss, {"input_ids": ids, "attention_mask": mask}


def _lm_modules(model):
    return ["tok", "pos"] + [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("method", [ifunc.ihvp_kfac, ifunc.ihvp_ekfac])
def test_causal_lm_scores_equal_the_closure_on_per_sample_gradients(method):
    model, params, loss, data = _lm()
    ih = method(loss, params, data, model=model, modules=_lm_modules(model), curvature="empirical_fisher")
    assert ih.info["blocks"]["tok.weight"] == (method.__name__[5:], "tok")
    G = ifunc.per_sample_grads(loss, params, data)
    ref = G @ ih(G).T
    torch.testing.assert_close(ifunc.attribute(loss, params, ih, data, data), ref)
    per_token = ifunc.attribute(loss, params, ih, data, data, per_token=True)
    torch.testing.assert_close(per_token.sum(-1), ref)
    torch.testing.assert_close(ifunc.self_influence(loss, params, ih, data), ref.diagonal())
    modules = ifunc.attribute(loss, params, ih, data, data, per_module=True)
    torch.testing.assert_close(modules.sum(0), ref)


def test_per_token_embedding_share_is_its_gathered_query_column():
    """With the identity closure on the embedding alone, position t's score is ⟨∇_E f, g_t e_(x_t)ᵀ⟩: row x_t of the
    query's embedding gradient dotted with g_t; 0 where the example is padded."""
    model, params, loss, data = _lm(seed=1)
    excl = [p for p in params if p != "tok.weight"]
    ih = ifunc.ihvp_identity(params, model=model, modules=["tok"], exclude=excl)
    s = ifunc.attribute(loss, params, ih, data, data, per_token=True)
    tree = ifunc.per_sample_grads(loss, params, data, flat=False)
    assert isinstance(tree, dict)
    Gq = tree["tok.weight"]  # [q, V, width]
    g = ifunc.capture_layer_grads(loss, params, data, model=model, modules=["tok"])["tok"]  # [b, width, V]
    torch.testing.assert_close(s.sum(-1), torch.einsum("qvc,bcv->qb", Gq, g))
    assert s[:, 1, 4:].abs().max() == 0  # padded positions of example 1
    torch.testing.assert_close(g, Gq.transpose(1, 2))  # captured per-example gradients, [dim, vocab] layout


def test_query_rank_is_exact_at_full_rank_and_close_below():
    model, params, loss, data = _lm(seed=2)
    excl = language.untracked(model, params, modules=["tok"])
    ih = ifunc.ihvp_ekfac(loss, params, data, model=model, modules=["tok"], exclude=excl, curvature="empirical_fisher")
    full = ifunc.attribute(loss, params, ih, data, data)
    torch.testing.assert_close(ifunc.attribute(loss, params, ih, data, data, query_rank=8), full)
    low = ifunc.attribute(loss, params, ih, data, data, query_rank=2)
    per_token = ifunc.attribute(loss, params, ih, data, data, query_rank=2, per_token=True)
    torch.testing.assert_close(per_token.sum(-1), low)
    assert (low - full).norm() < (full.norm() * 0.9)


# ---------------------------------------------------------------- what is tracked, and what is refused


def test_embeddings_are_tracked_only_when_chosen():
    model, params, _, _ = _lm()
    default, uncovered = find_layers(model, params)
    assert "tok" not in [s.name for s in default] and "tok.weight" in uncovered
    named, _ = find_layers(model, params, modules=["tok", "pos"])
    assert [(s.name, s.kind, s.out_features, s.in_features, s.bias) for s in named] == [
        ("tok", "embedding", 8, V, None),
        ("pos", "embedding", 8, 6, None),
    ]
    chosen, _ = find_layers(model, params, modules=lambda n, m: isinstance(m, nn.Embedding))
    assert [s.name for s in chosen] == ["tok", "pos"]


def test_tied_embedding_is_refused_naming_both_uses():
    model, params, loss, data = _lm(tied=True)
    with pytest.raises(WeightUseError, match=r"'tok'.*tied to \['head \(Linear\)'\].*modules=.*exclude=\['tok'\]"):
        ifunc.ihvp_ekfac(loss, params, data, model=model, modules=["tok", "pos"])
    ih = ifunc.ihvp_ekfac(loss, params, data, model=model, modules=["pos"], curvature="empirical_fisher")
    assert ih.info["blocks"]["tok.weight"] == ("diagonal", "tok")  # the default: a diagonal block, exact for both


def test_a_tied_embedding_registered_after_its_head_is_refused_naming_both_uses_too():
    """``params_of`` holds the shared tensor under the first module's name (the head's): the embedding's own weight
    name is then absent, and the refusal must still name the tie, not ask to "track" an impossible name."""

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(D, V, bias=False)
            self.emb = nn.Embedding(V, D)
            self.emb.weight = self.head.weight

        def forward(self, x):
            return self.head(self.emb(x))

    model = HeadFirst().double().eval()
    params = ifunc.params_of(model)
    assert list(params) == ["head.weight"]
    with pytest.raises(WeightUseError, match=r"'emb' is tied to \['head \(Linear\)'\]"):
        find_layers(model, params, modules=["emb"])
    shared = nn.Linear(D, D)
    chain = nn.Sequential(shared, nn.Tanh(), nn.Linear(D, D))
    chain[2].weight = shared.weight  # a Linear tied to an earlier one: its name is not in params either
    with pytest.raises(
        ValueError, match=r"'2.weight' of '2' is not in params \(params holds the same tensor as \['0.weight'\]"
    ):
        find_layers(chain, ifunc.params_of(chain), modules=["2"])


@pytest.mark.parametrize(
    ("option", "match"), [({"max_norm": 1.0}, "max_norm=1.0"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq")]
)
def test_options_that_break_the_gradient_identity_are_refused(option, match):
    model = nn.Sequential(nn.Embedding(V, D, **option), nn.Linear(D, OUT))
    with pytest.raises(ValueError, match=f"embedding '0'.*{match}.*leave it out of modules="):
        find_layers(model, ifunc.params_of(model), modules=["0"])


def test_sparse_gradients_are_handled():
    """nn.Embedding(sparse=True) keeps the identity DW = Σ_t g_t a_tᵀ: the same closure as the dense embedding."""
    model, params, loss, data = emb_problem(seed=8, activation=nn.Tanh(), task="classification", sparse=True)
    ih = ifunc.ihvp_ekfac(loss, params, data, model=model, modules=["0"], curvature="empirical_fisher")
    model, params, loss, data = emb_problem(seed=8, activation=nn.Tanh(), task="classification")
    ref = ifunc.ihvp_ekfac(loss, params, data, model=model, modules=["0"], curvature="empirical_fisher")
    v = torch.randn(2, ih.dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ih(v), ref(v))


def test_a_shared_position_lookup_is_refused():
    """A position table read with arange(T) has no example dimension: refused, naming the fix."""

    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.head = nn.Embedding(5, D), nn.Linear(D, OUT)

        def forward(self, x):
            return self.head(x + self.pos(torch.arange(x.shape[1])))

    model = Pos().double().eval()
    x = torch.randn(4, 5, D, generator=torch.Generator().manual_seed(0))
    loss = lambda p, b: (ifunc.call(model, p, b) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="'pos'.*no dimension of the examples.*modules="):
        ifunc.ihvp_kfac(loss, ifunc.params_of(model), x, model=model, modules=["pos"])
