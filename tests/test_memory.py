"""One byte budget (issue 16): chunk sizes come from max_memory and the measured bytes of one example."""

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
