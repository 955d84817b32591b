"""One byte budget: chunk sizes come from max_memory and the measured bytes of one example."""

import pytest
import torch

import ifunc
from ifunc import _memory
from ifunc.grads import chunk_size_for
from ifunc.testing import mlp_problem


def test_a_small_budget_forces_many_chunks_and_the_same_scores():
    model, params, loss, (x, y) = mlp_problem(seed=1, sizes=(4, 8, 3), n=40)
    ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1)
    per_example = chunk_size_for(loss, params, (x, y), max_memory=1 << 30)
    small = 60_000  # bytes: a handful of examples per chunk
    n_small = chunk_size_for(loss, params, (x, y), max_memory=small)
    assert 1 <= n_small < 40 <= per_example
    ref = ifunc.attribute(loss, params, ihvp, (x, y), (x[:5], y[:5]), chunk_size=40)
    got = ifunc.attribute(loss, params, ihvp, (x, y), (x[:5], y[:5]), max_memory=small)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(
        ifunc.self_influence(loss, params, ihvp, (x, y), max_memory=small),
        ifunc.self_influence(loss, params, ihvp, (x, y), chunk_size=40),
    )


def test_a_budget_below_one_example_raises_with_the_numbers():
    _, params, loss, data = mlp_problem(seed=2)
    with pytest.raises(MemoryError, match=r"one example needs about .*B.*budget is .*B.*raise max_memory"):
        ifunc.per_sample_grads(loss, params, data, max_memory=100)


def test_the_probe_measures_saved_activations():
    w = torch.randn(100, 200, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 100, dtype=torch.float64)
    measured = _memory.probe_bytes(lambda: torch.tanh(x @ w).sum())
    # x (saved by the matmul) and tanh's output [7, 200] (saved by its backward), w itself is a leaf parameter
    assert measured >= (7 * 100 + 7 * 200) * 8


def test_the_default_budget_is_a_fraction_of_the_available_memory():
    assert 0 < _memory.default_budget() <= _memory.available_bytes()
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        _memory.resolve_budget(-1)


def test_kronecker_passes_take_their_chunks_from_the_budget():
    model, params, loss, (x, y) = mlp_problem(seed=3, sizes=(4, 8, 3), n=30)
    train, query = (x, y), (x[:4], y[:4])
    whole = ifunc.fit_kronecker_factors(loss, params, train, model=model, chunk_size=30)
    small = 8_000  # bytes: a few examples per chunk
    parts = ifunc.fit_kronecker_factors(loss, params, train, model=model, max_memory=small)
    for name, f in whole.factors.items():
        torch.testing.assert_close(parts.factors[name].ekfac, f.ekfac)
    ihvp = ifunc.ihvp_ekfac(loss, params, whole, model=model, damping=0.1)
    ref = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=30)
    torch.testing.assert_close(ifunc.attribute(loss, params, ihvp, train, query, max_memory=small), ref)
    torch.testing.assert_close(
        ifunc.self_influence(loss, params, ihvp, train, max_memory=small),
        ifunc.self_influence(loss, params, ihvp, train, chunk_size=30),
    )
    with pytest.raises(MemoryError, match="Kronecker factors: one example needs about"):
        ifunc.fit_kronecker_factors(loss, params, train, model=model, max_memory=64)


def test_categorical_sampling_in_blocks_draws_the_labels_of_one_multinomial(monkeypatch):
    from ifunc import likelihood

    logits = 3 * torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(0))

    def one_shot(out, gen):  # the float64 softmax and one-hot over all rows at once
        probs = torch.softmax(out.to(torch.float64), dim=-1).reshape(-1, out.shape[-1])
        labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        onehot = torch.nn.functional.one_hot(labels, out.shape[-1]).to(probs.dtype)
        return (probs - onehot).reshape(out.shape).to(out.dtype)

    ref = one_shot(logits, torch.Generator().manual_seed(1))
    monkeypatch.setattr(likelihood, "SAMPLE_BLOCK", 3 * 11)  # blocks of 3 rows
    gen = torch.Generator().manual_seed(1)
    got = likelihood.sample_categorical(logits, gen)
    assert torch.equal(got, ref)


def test_kronecker_chunks_count_what_an_example_adds_not_the_parameters():
    from ifunc.ihvp.kronecker.budget import capture_chunk_size
    from ifunc.ihvp.kronecker.layers import find_layers

    # 4 MB of weights, 8 kB of activations per example: a 1 MB budget holds dozens of examples
    model, params, loss, (x, y) = mlp_problem(seed=4, sizes=(1000, 1000, 3), n=64, dtype=torch.float32)
    layers, _ = find_layers(model, params)
    n = capture_chunk_size(loss, params, model, layers, (x, y), max_memory=1 << 20, what="test")
    assert n >= 16


def test_the_default_kronecker_chunk_is_capped_in_bytes_with_the_same_factors(monkeypatch):
    from ifunc.ihvp.kronecker import budget

    model, params, loss, (x, y) = mlp_problem(seed=5, sizes=(4, 8, 3), n=30)
    ref = ifunc.fit_kronecker_factors(loss, params, (x, y), model=model, sample="categorical", chunk_size=30)
    monkeypatch.setattr(_memory, "DEFAULT_CHUNK_BYTES", 2_000)  # a few examples per chunk by default
    layers = list(ref.layers)
    assert budget.capture_chunk_size(loss, params, model, layers, (x, y), max_memory=None, what="t") < 10
    got = ifunc.fit_kronecker_factors(loss, params, (x, y), model=model, sample="categorical")
    for name, f in ref.factors.items():  # the same sampled labels in any chunking
        torch.testing.assert_close(got.factors[name].S, f.S)
        torch.testing.assert_close(got.factors[name].ekfac, f.ekfac)


@pytest.mark.parametrize("eigen_dtype", [None, torch.float64], ids=["default", "float64"])
def test_float32_factors_keep_bases_in_the_params_dtype_and_eigenvalues_in_eigen_dtype(eigen_dtype):
    model, params, loss, (x, y) = mlp_problem(seed=6, sizes=(4, 8, 3), n=20, dtype=torch.float32)
    f = ifunc.fit_kronecker_factors(loss, params, (x, y), model=model, eigen_dtype=eigen_dtype).factors["2"]
    assert f.A.dtype == f.S.dtype == f.Q_A.dtype == f.Q_S.dtype == torch.float32
    assert f.ekfac is not None
    assert f.eig_A.dtype == f.eig_S.dtype == f.ekfac.dtype == (eigen_dtype or torch.float32)  # default: the params'
    w, Q = torch.linalg.eigh(f.S.double())  # the float64 decomposition, cast (up to the signs of the vectors)
    torch.testing.assert_close(f.eig_S.double(), w.clamp_min(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((f.Q_S.double().T @ Q).abs(), torch.eye(len(w), dtype=torch.float64), atol=1e-4, rtol=0)


def test_factors_without_covariances_give_the_same_closure_and_round_trip(tmp_path):
    model, params, loss, (x, y) = mlp_problem(seed=7, sizes=(4, 8, 3), n=20)
    kept = ifunc.fit_kronecker_factors(loss, params, (x, y), model=model)
    lean = ifunc.fit_kronecker_factors(loss, params, (x, y), model=model, keep_covariances=False)
    assert all(f.A is None and f.S is None for f in lean.factors.values())
    assert "Q_S [3, 3]" in repr(lean) and "'A [" not in repr(lean) and "'A [5, 5]" in repr(kept)
    path = tmp_path / "lean.h5"
    ifunc.save_factors(path, lean, params)
    loaded = ifunc.load_factors(path, params)
    assert loaded.factors["2"].A is None
    v = torch.randn(4, sum(p.numel() for p in params.values()), dtype=x.dtype)
    ref = ifunc.ihvp_ekfac(loss, params, kept, model=model, damping=0.1)(v)
    for factors in (lean, loaded):
        torch.testing.assert_close(ifunc.ihvp_ekfac(loss, params, factors, model=model, damping=0.1)(v), ref)
    torch.testing.assert_close(ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)(v), ref)


def test_the_default_kronecker_chunk_holds_at_most_default_positions(monkeypatch):
    from ifunc import language
    from ifunc.ihvp.kronecker import budget
    from ifunc.testing import TinyGPT

    model = TinyGPT(vocab=11, width=8, heads=2, layers=1, context=8).double().eval()
    params = ifunc.params_of(model)
    ids = torch.randint(0, 11, (20, 8), generator=torch.Generator().manual_seed(0))
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    data = {"input_ids": ids}
    ref = ifunc.attribute(loss, params, ifunc.ihvp_ekfac(loss, params, data, model=model, chunk_size=20), data, data)
    layers = [blk.spec for blk in ifunc.ihvp_identity(params, model=model).blocks]
    default = _memory.DEFAULT_POSITIONS // 8  # 8 tokens per sequence
    assert budget.capture_chunk_size(loss, params, model, layers, data, max_memory=None, what="t") == default
    monkeypatch.setattr(_memory, "DEFAULT_POSITIONS", 24)  # 3 sequences of 8 tokens per chunk
    assert budget.capture_chunk_size(loss, params, model, layers, data, max_memory=None, what="t") == _memory.MIN_CHUNK
    monkeypatch.setattr(_memory, "MIN_CHUNK", 1)
    assert budget.capture_chunk_size(loss, params, model, layers, data, max_memory=None, what="t") == 3
    assert budget.capture_chunk_size(loss, params, model, layers, data, max_memory=1 << 30, what="t") > 3
    got = ifunc.attribute(loss, params, ifunc.ihvp_ekfac(loss, params, data, model=model), data, data)
    torch.testing.assert_close(got, ref)


def test_one_cap_bounds_the_chunks_of_every_pass():
    # the rule: MAX_CHUNK examples; by default also DEFAULT_POSITIONS positions, but never below MIN_CHUNK examples
    assert _memory.chunk_cap(None) == _memory.chunk_cap(1 << 40) == _memory.MAX_CHUNK == 4096
    assert _memory.chunk_cap(None, positions=64) == _memory.DEFAULT_POSITIONS // 64
    assert _memory.chunk_cap(None, positions=1 << 20) == _memory.MIN_CHUNK
    assert _memory.chunk_cap(1 << 40, positions=1 << 20) == _memory.MAX_CHUNK
    # a generous budget: the per-example gradients and a one-position Kronecker pass both stop at the one cap
    from ifunc.ihvp.kronecker.budget import capture_chunk_size
    from ifunc.ihvp.kronecker.layers import find_layers

    model, params, loss, (x, y) = mlp_problem(seed=8, sizes=(4, 8, 3), n=4)
    layers, _ = find_layers(model, params)
    assert chunk_size_for(loss, params, (x, y), max_memory=1 << 40) == _memory.MAX_CHUNK
    assert capture_chunk_size(loss, params, model, layers, (x, y), max_memory=1 << 40, what="t") == _memory.MAX_CHUNK


class _Wide(torch.nn.Module):
    """Two positions per example through two 128 × 128 layers: a per-example gradient is 16,384 values a layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(128, 128), torch.nn.Linear(128, 3)

    def forward(self, x):  # [b, 2, 128] -> [b, 3]
        return self.b(torch.tanh(self.a(x))).sum(dim=1)


@pytest.mark.parametrize("pairs", [False, True])
def test_kronecker_scoring_chunks_count_the_contractions_temporaries(pairs):
    """Self-influence at T > 1 forms each example's gradient of the widest layer (three ``out · in`` arrays);
    pairwise scores form it too. Both are counted against max_memory, not only the captured forward."""
    from ifunc._data import DataSource
    from ifunc.ihvp import ScoreOptions

    torch.manual_seed(0)
    model = _Wide().double()
    params = ifunc.params_of(model)
    x, y = torch.randn(64, 2, 128, dtype=torch.float64), torch.randint(0, 3, (64,))

    def loss(p, b):
        return torch.nn.functional.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")

    ihvp = ifunc.ihvp_ekfac(loss, params, (x, y), model=model)
    budget = 4 << 20
    scorer = ihvp.scorer(loss, params, ScoreOptions(max_memory=budget))
    if pairs:
        scorer.prepare(DataSource((x[:3], y[:3]), name="query"), None)
    chunk = scorer.chunk_size(DataSource((x, y), name="train"), pairs=pairs)
    per_example = (3 if not pairs else 1) * 128 * 129 * 8  # the widest layer's temporaries, with its bias column
    assert chunk * per_example <= budget, (chunk, per_example)
    assert chunk >= 1
    got = ifunc.self_influence(loss, params, ihvp, (x, y), max_memory=budget)
    torch.testing.assert_close(got, ifunc.self_influence(loss, params, ihvp, (x, y), chunk_size=64))
