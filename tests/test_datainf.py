"""DataInf: exact for one example per block, never below the exact block solve, free re-damping."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.testing import mlp_problem, rel_error

from .strategies import dampings, mlp_problems


@given(problem=mlp_problems(), lam=dampings, seed=st.integers(0, 1000), blocks=st.sampled_from(["layer", "full"]))
def test_one_example_matches_explicit(problem, lam, seed, blocks):
    _, params, loss, (x, y) = problem
    one = (x[:1], y[:1])
    d = ifunc.flatten(params)[0].numel()
    V = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    exact = ifunc.ihvp_explicit(loss, params, one, damping=lam, curvature="empirical_fisher", blocks=blocks)
    datainf = ifunc.ihvp_datainf(loss, params, one, damping=lam, blocks=blocks)
    assert rel_error(datainf(V), exact(V)) < 1e-9


def test_one_example_true_fisher_matches_explicit():
    _, params, loss, (x, y) = mlp_problem(seed=1, sizes=(3, 4, 3), n=1)
    lik = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical")
    v = torch.randn(ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(0))
    kw = dict(damping=0.1, curvature="fisher", blocks="layer")
    exact = ifunc.ihvp_explicit(lik, params, (x, y), generator=torch.Generator().manual_seed(7), **kw)
    datainf = ifunc.ihvp_datainf(lik, params, (x, y), generator=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(datainf(v), exact(v))


@given(problem=mlp_problems(), lam=dampings, seed=st.integers(0, 1000))
def test_never_below_the_exact_block_solve(problem, lam, seed):
    """Operator convexity of the inverse: mean of inverses ⪰ inverse of the mean."""
    _, params, loss, data = problem
    d = ifunc.flatten(params)[0].numel()
    V = torch.randn(4, d, generator=torch.Generator().manual_seed(seed))
    exact = ifunc.ihvp_explicit(loss, params, data, damping=lam, curvature="empirical_fisher", blocks="layer")
    approx = ifunc.ihvp_datainf(loss, params, data, damping=lam)
    gap = (V * approx(V)).sum(1) - (V * exact(V)).sum(1)
    assert bool((gap >= -1e-9 * (V * exact(V)).sum(1).abs()).all())


def test_repeated_example_is_exact_and_chunking_does_not_matter():
    _, params, loss, (x, y) = mlp_problem(seed=2, sizes=(2, 3, 2), n=1)
    many = (x.repeat(7, 1), y.repeat(7))  # all gradients equal: mean of inverses = inverse of mean
    v = torch.randn(ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(1))
    exact = ifunc.ihvp_explicit(loss, params, many, damping=0.3, curvature="empirical_fisher", blocks="layer")
    a = ifunc.ihvp_datainf(loss, params, many, damping=0.3, chunk_size=3)
    b = ifunc.ihvp_datainf(loss, params, [(many[0][:2], many[1][:2]), (many[0][2:], many[1][2:])], damping=0.3)
    torch.testing.assert_close(a(v), exact(v))
    torch.testing.assert_close(a(v), b(v))


def test_with_damping_is_free():
    _, params, loss, data = mlp_problem(seed=3, n=5)
    calls = []
    counted = lambda p, b: (calls.append(1), loss(p, b))[1]  # noqa: E731
    ihvp = ifunc.ihvp_datainf(counted, params, data, damping=0.1)
    before = len(calls)
    v = torch.ones(ihvp.dim)
    redamped = ihvp.with_damping(0.5)
    assert len(calls) == before
    torch.testing.assert_close(redamped(v), ifunc.ihvp_datainf(loss, params, data, damping=0.5)(v))
    assert {b for _, b in ihvp.info["blocks"].values()} == {"0", "2"} and ihvp.info["n"] == 5
    assert ihvp.info["blocks"]["0.weight"] == ("datainf", "0")


def test_errors():
    _, params, loss, data = mlp_problem(seed=4)
    with pytest.raises(ValueError, match="rank-one"):
        ifunc.ihvp_datainf(loss, params, data, damping=0.1, curvature="ggn")
    with pytest.raises(ValueError, match="damping must be > 0"):
        ifunc.ihvp_datainf(loss, params, data, damping=0.0)
    with pytest.raises(TypeError, match="likelihood="):
        ifunc.ihvp_datainf(loss, params, data, damping=0.1, curvature="fisher")
    x, y = data
    x = x.clone()
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="example 3"):
        ifunc.ihvp_datainf(loss, params, (x, y), damping=0.1, chunk_size=2)
