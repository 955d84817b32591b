"""Half-precision models (``torch.bfloat16``, ``torch.float16``) through every path, against their float64 twins.

A twin is the same model with the same weights and inputs (the half-precision values, exactly representable in
float64), run in float64: the difference between the two is the rounding of the half-precision arithmetic alone.

Tolerances come from the unit roundoff ``u`` of the format (bfloat16 ``2^-8``, float16 ``2^-11``). A score is a
sum of products of gradients, each the result of a forward and a backward pass whose every operation rounds to
``u`` (relative); the solve and every sum run in float32, whose rounding (``2^-24``) is negligible beside it. The
errors of a pass are independent roundings that partly cancel: on these problems the scores of every method are
within 0.6-1.6 ``u`` of the twin's for the two-layer MLP and within 1-4 ``u`` for the two-block causal LM
(attention, softmax and LayerNorms add roundings), so the tests allow ``4 u`` and ``10 u``. A bfloat16
contraction (``attribute(dtype=torch.bfloat16)``) rounds both factors and the result once more: each entry is
within ``3 u_bf16 Σ_j |q̃_j| |g_j|`` of the float32 contraction, a bound tested as it is.
"""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc import language
from ifunc.testing import TinyGPT, mlp_problem, rel_error

HALF = [torch.bfloat16, torch.float16]
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  #: unit roundoff: half the gap between 1 and the next number
MLP_TOL = 4  #: in units of u: scores of the two-layer MLP (measured 0.6-1.6 u)
LM_TOL = 10  #: in units of u: scores of the two-block causal LM (measured 1-4 u)
LAM = 0.1


def _twin(make, dtype):
    """``(half problem, float64 problem)`` built by ``make()``, the float64 one holding the half one's values."""
    half, ref = make(), make()
    for model in (half[0], ref[0]):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).double())
    half[0].to(dtype)
    ref[0].double()

    def cast(batch, to):
        if isinstance(batch, dict):
            return {k: cast(v, to) for k, v in batch.items()}
        if isinstance(batch, tuple):
            return tuple(cast(v, to) for v in batch)
        return batch.to(dtype).to(to) if batch.is_floating_point() else batch

    return (
        (half[0], ifunc.params_of(half[0]), half[1], cast(half[2], dtype)),
        (ref[0], ifunc.params_of(ref[0]), ref[1], cast(ref[2], torch.float64)),
    )


def _mlp():
    model, _, loss, data = mlp_problem(sizes=(4, 6, 3), n=12, seed=0)
    return model, loss, data


def _lm():
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, width=8, heads=2, layers=2, context=7).eval()
    ids = torch.randint(0, 11, (6, 7), generator=torch.Generator().manual_seed(1))
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    return model, loss, {"input_ids": ids}


def _query(data):
    return {k: v[:3] for k, v in data.items()} if isinstance(data, dict) else tuple(v[:3] for v in data)


# every path of the closure table: (name, builder(model, params, loss, data))
BUILDERS = {
    "explicit": lambda m, p, lo, d: ifunc.ihvp_explicit(lo, p, d, damping=LAM),
    "cg": lambda m, p, lo, d: ifunc.ihvp_cg(lo, p, d, damping=LAM),
    "arnoldi": lambda m, p, lo, d: ifunc.ihvp_arnoldi(lo, p, d, rank=51, damping=LAM),
    "nystrom": lambda m, p, lo, d: ifunc.ihvp_nystrom(lo, p, d, rank=51, damping=LAM),
    "lissa": lambda m, p, lo, d: ifunc.ihvp_lissa(lo, p, d, damping=LAM),
    "datainf": lambda m, p, lo, d: ifunc.ihvp_datainf(lo, p, d, damping=LAM),
    "identity": lambda m, p, lo, d: ifunc.ihvp_identity(p, damping=LAM),
    "identity-model": lambda m, p, lo, d: ifunc.ihvp_identity(p, model=m, damping=LAM),
    "diagonal": lambda m, p, lo, d: ifunc.ihvp_diagonal(lo, p, d, model=m, damping=LAM),
    "kfac": lambda m, p, lo, d: ifunc.ihvp_kfac(lo, p, d, model=m, damping=LAM),
    "ekfac": lambda m, p, lo, d: ifunc.ihvp_ekfac(lo, p, d, model=m, damping=LAM),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_closure_scores_a_half_model_in_float32_within_its_roundoff(name, dtype):
    (m, p, lo, d), (m64, p64, lo64, d64) = _twin(_mlp, dtype)
    ihvp, ref = BUILDERS[name](m, p, lo, d), BUILDERS[name](m64, p64, lo64, d64)
    assert ihvp.dtype == torch.float32  # the solve, and what the closure holds
    v = torch.randn(ihvp.dim).to(dtype)
    assert ihvp(v).dtype == dtype  # the closure's contract: the input's dtype back
    scores = ifunc.attribute(lo, p, ihvp, d, _query(d))
    self_terms = ifunc.self_influence(lo, p, ihvp, d)
    assert scores.dtype == self_terms.dtype == torch.float32
    tol = MLP_TOL * U[dtype]
    assert rel_error(scores.double(), ifunc.attribute(lo64, p64, ref, d64, _query(d64))) < tol
    assert rel_error(self_terms.double(), ifunc.self_influence(lo64, p64, ref, d64)) < tol


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_per_sample_grads_of_a_half_model_are_its_dtype_and_within_its_roundoff(dtype):
    (m, p, lo, d), (m64, p64, lo64, d64) = _twin(_mlp, dtype)
    G, G64 = ifunc.per_sample_grads(lo, p, d), ifunc.per_sample_grads(lo64, p64, d64)
    assert G.dtype == dtype
    assert rel_error(G.double(), G64) < MLP_TOL * U[dtype]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_kronecker_statistics_and_bases_of_a_half_model_are_float32_or_wider(dtype):
    (m, p, lo, d), (m64, p64, lo64, d64) = _twin(_mlp, dtype)
    f = ifunc.fit_kronecker_factors(lo, p, d, model=m, curvature="ggn", diagonal=True)
    f64 = ifunc.fit_kronecker_factors(lo64, p64, d64, model=m64, curvature="ggn", diagonal=True)
    for name, layer in f.factors.items():
        assert layer.A is not None and layer.S is not None and layer.Q_A is not None and layer.ekfac is not None
        assert {layer.A.dtype, layer.S.dtype, layer.Q_A.dtype, layer.Q_S.dtype} == {torch.float32}
        assert {layer.eig_A.dtype, layer.eig_S.dtype, layer.ekfac.dtype} == {torch.float32}  # default eigen_dtype
        assert f.eigen_dtype == "float32" and f64.eigen_dtype == "float64"
        ref = f64.factors[name]
        assert ref.A is not None and ref.S is not None
        assert rel_error(layer.A.double(), ref.A) < MLP_TOL * U[dtype]
        assert rel_error(layer.S.double(), ref.S) < MLP_TOL * U[dtype]
    closure = ifunc.ihvp_ekfac(lo, p, f, model=m, damping=LAM)
    assert isinstance(closure, ifunc.KroneckerIHVP)
    for b in closure.blocks:
        assert b.Q_S is not None and b.eigenvalues.dtype == b.Q_S.dtype == torch.float32


def test_kronecker_factors_of_a_half_model_round_trip_a_factor_file_in_float32(tmp_path):
    (m, p, lo, d), _ = _twin(_mlp, torch.bfloat16)
    f = ifunc.fit_kronecker_factors(lo, p, d, model=m)
    ifunc.save_factors(tmp_path / "f.h5", f, p)
    loaded = ifunc.load_factors(tmp_path / "f.h5", p)
    for name, layer in loaded.factors.items():
        for got, want in zip(layer, f.factors[name]):
            if want is not None:
                assert got is not None and got.dtype == torch.float32 and torch.allclose(got, want.float())


@pytest.mark.parametrize("method", [ifunc.ihvp_ekfac, ifunc.ihvp_kfac])
def test_language_model_in_bfloat16_pairwise_per_token_per_module_and_self_influence(method):
    (m, p, lo, d), (m64, p64, lo64, d64) = _twin(_lm, torch.bfloat16)
    ih = method(lo, p, d, model=m, damping=LAM)  # embeddings and LayerNorms are diagonal blocks
    ih64 = method(lo64, p64, d64, model=m64, damping=LAM)
    q, q64 = _query(d), _query(d64)
    tol = LM_TOL * U[torch.bfloat16]
    pair = ifunc.attribute(lo, p, ih, d, q)
    tokens = ifunc.attribute(lo, p, ih, d, q, per_token=True)
    modules = ifunc.attribute(lo, p, ih, d, q, per_module=True)
    assert pair.dtype == tokens.dtype == modules.dtype == torch.float32
    assert rel_error(pair.double(), ifunc.attribute(lo64, p64, ih64, d64, q64)) < tol
    assert rel_error(tokens.double(), ifunc.attribute(lo64, p64, ih64, d64, q64, per_token=True)) < tol
    # the diagonal blocks' per-token split comes from hooks (bfloat16 inputs and output gradients), their pairwise
    # score from the per-example gradient autograd sums in bfloat16: two roundings of one sum, within u
    assert rel_error(tokens.sum(-1), pair) < U[torch.bfloat16]
    assert rel_error(modules.sum(0), pair) < 1e-5
    self_terms = ifunc.self_influence(lo, p, ih, d)
    assert rel_error(self_terms.double(), ifunc.self_influence(lo64, p64, ih64, d64)) < tol


@given(seed=st.integers(0, 2**16), n_query=st.integers(1, 4))
def test_bfloat16_contraction_of_the_generic_scorer_is_within_its_rounding_bound(seed, n_query):
    """``|s_bf16 − s| <= 3 u Σ_j |q̃_j| |g_j|`` entrywise: both factors rounded once, products summed in float32 and
    the sum rounded once (the float32 sums add at most ``d 2^-24`` relative, far below)."""
    model, params, loss, (x, y) = mlp_problem(sizes=(5, 7, 3), n=10, seed=seed, dtype=torch.float32)
    ihvp = ifunc.ihvp_identity(params, damping=0.3)
    query = (x[:n_query], y[:n_query])
    exact = ifunc.attribute(loss, params, ihvp, (x, y), query)
    rounded = ifunc.attribute(loss, params, ihvp, (x, y), query, dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16
    Qp = ihvp(ifunc.per_sample_grads(loss, params, query))
    bound = 3 * U[torch.bfloat16] * (Qp.abs() @ ifunc.per_sample_grads(loss, params, (x, y)).abs().T)
    assert ((rounded.float() - exact).abs() <= bound + 1e-6 * exact.abs().max()).all()


@pytest.mark.parametrize("per_token", [False, True])
def test_bfloat16_contraction_of_the_kronecker_scorer(per_token):
    """Each layer's ``Σ_t g_tᵀ Q̃ a_t`` from bfloat16 ``a, g, Q̃`` (three roundings of ``u``), layers summed in
    float32, the result rounded once: within ``4 u`` of the float32 contraction (relative, over all scores)."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, width=8, heads=2, layers=2, context=7).float().eval()
    ids = torch.randint(0, 11, (6, 7), generator=torch.Generator().manual_seed(1))
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    params, data = ifunc.params_of(model), {"input_ids": ids}
    ih = ifunc.ihvp_ekfac(loss, params, data, model=model, damping=LAM)
    q = _query(data)
    exact = ifunc.attribute(loss, params, ih, data, q, per_token=per_token)
    rounded = ifunc.attribute(loss, params, ih, data, q, per_token=per_token, dtype=torch.bfloat16)
    assert exact.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert rel_error(rounded.float(), exact) < 4 * U[torch.bfloat16]


@pytest.mark.parametrize("name", ["ekfac", "explicit"])
def test_cosine_normalised_scores_of_a_half_model_within_its_roundoff(name):
    (m, p, lo, d), (m64, p64, lo64, d64) = _twin(_mlp, torch.bfloat16)
    got = ifunc.attribute(lo, p, BUILDERS[name](m, p, lo, d), d, _query(d), normalize="cosine")
    want = ifunc.attribute(lo64, p64, BUILDERS[name](m64, p64, lo64, d64), d64, _query(d64), normalize="cosine")
    assert got.dtype == torch.float32
    assert rel_error(got.double(), want) < MLP_TOL * U[torch.bfloat16]


def test_a_score_store_takes_a_half_model(tmp_path):
    (m, p, lo, d), _ = _twin(_mlp, torch.bfloat16)
    ih = ifunc.ihvp_ekfac(lo, p, d, model=m, damping=LAM)
    path = ifunc.attribute(lo, p, ih, d, _query(d), out=tmp_path / "s.h5", chunk_size=5)
    stored = torch.as_tensor(ifunc.load_scores(path))
    assert torch.equal(stored, ifunc.attribute(lo, p, ih, d, _query(d), chunk_size=5))  # float32 both


def test_a_gradient_index_of_a_half_model_agrees_with_its_float64_twin(tmp_path):
    (m, p, lo, d), (m64, p64, lo64, d64) = _twin(_lm, torch.bfloat16)
    index = ifunc.build_index(lo, p, d, tmp_path / "h.h5", model=m, layer_size=4, dense_size=16, seed=3)
    index64 = ifunc.build_index(lo64, p64, d64, tmp_path / "d.h5", model=m64, layer_size=4, dense_size=16, seed=3)
    tol = LM_TOL * U[torch.bfloat16]
    assert rel_error(index.matrix().double(), index64.matrix().double()) < tol  # rows: float32, from float32 sums
    got = ifunc.attribute(lo, p, ifunc.ihvp_projected(index, model=m, damping=LAM), index, _query(d))
    want = ifunc.attribute(lo64, p64, ifunc.ihvp_projected(index64, model=m64, damping=LAM), index64, _query(d64))
    assert got.dtype == torch.float32
    assert rel_error(got.double(), want) < tol


def test_half_precision_solves_and_eigendecompositions_are_refused_by_name(tmp_path):
    (m, p, lo, d), _ = _twin(_mlp, torch.bfloat16)
    with pytest.raises(TypeError, match="eigen_dtype must be torch.float64"):
        ifunc.ihvp_ekfac(lo, p, d, model=m, eigen_dtype=torch.bfloat16)
    index = ifunc.build_index(lo, p, d, tmp_path / "i.h5", layer_size=2, dense_size=8)
    with pytest.raises(TypeError, match="half precision"):
        ifunc.ihvp_projected(index, dtype=torch.bfloat16)


def test_an_ill_conditioned_half_model_warns_naming_its_dtype():
    """bfloat16 products carry a relative error of about u: a solve with damped condition number c >= 1/ε = 128
    has no digit it can promise, and says so; below (c = 116 at λ = 0.01, c ~ 10 at λ = 0.1, where the scores
    above are within 4 u) it is silent. Below the products' rounding the curvature is not even positive definite."""
    (m, p, lo, d), _ = _twin(_mlp, torch.bfloat16)
    with pytest.warns(UserWarning, match=r"condition number 6\.\d+e\+02, beyond what torch.bfloat16 solves"):
        ifunc.ihvp_explicit(lo, p, d, damping=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ifunc.ihvp_explicit(lo, p, d, damping=0.01)
    with pytest.raises(ValueError, match="not positive definite at damping 0.0001.*rounding noise"):
        ifunc.ihvp_explicit(lo, p, d, damping=1e-4)
