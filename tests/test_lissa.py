import warnings

import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem, rel_error


def test_full_batch_lissa_is_the_truncated_neumann_sum():
    _, params, loss, data = mlp_problem(seed=3, n=8)
    G = ifunc.ggn(loss, params, data)
    lam, s, depth = 0.1, 4.0, 7
    A = G + lam * torch.eye(G.shape[0])
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0))
    M = torch.eye(G.shape[0]) - A / s
    expected, term = torch.zeros_like(v), v.clone()
    for _ in range(depth + 1):
        expected += term
        term = M @ term
    expected /= s
    out = ifunc.ihvp_lissa(loss, params, data, damping=lam, scale=s, depth=depth)(v)
    torch.testing.assert_close(out, expected)


def test_arguments_are_keyword_only():
    _, params, loss, data = mlp_problem(seed=3)
    with pytest.raises(TypeError):
        ifunc.ihvp_lissa(loss, params, data, 0.1, 10.0)  # damping and scale cannot be swapped by position


def test_divergence_is_reported():
    _, params, loss, data = mlp_problem(seed=3, n=8)
    lam_max = float(torch.linalg.eigvalsh(ifunc.ggn(loss, params, data)).max())
    too_small = 0.3 * lam_max  # eigenvalues of (H+λ)/s reach > 2
    with pytest.raises(ifunc.LissaDivergenceError, match="diverged.*scale=.*too small"):
        ifunc.ihvp_lissa(loss, params, data, damping=0.01, scale=too_small, depth=30)(
            torch.ones(ifunc.flatten(params)[0].numel())
        )
    with pytest.raises(ValueError, match="diverged to NaN/inf"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ifunc.ihvp_lissa(loss, params, data, damping=0.01, scale=too_small, depth=100_000)(
            torch.ones(ifunc.flatten(params)[0].numel())
        )


def test_minibatch_lissa_is_deterministic_for_a_generator_and_close_to_exact():
    _, params, loss, (x, y) = mlp_problem(seed=4, n=40)
    lam = 0.5
    exact = ifunc.ihvp_explicit(loss, params, (x, y), damping=lam)
    v = torch.randn(exact.dim, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(123)
    ihvp = ifunc.ihvp_lissa(loss, params, (x, y), damping=lam, depth=300, repeat=4, batch_size=20, generator=gen)
    first = ihvp(v)
    torch.testing.assert_close(ihvp(v), first)  # the closure replays its generator state
    assert rel_error(first, exact(v)) < 0.1
    other = ifunc.ihvp_lissa(
        loss,
        params,
        (x, y),
        damping=lam,
        depth=300,
        repeat=4,
        batch_size=20,
        generator=torch.Generator().manual_seed(7),
    )(v)
    assert rel_error(other, exact(v)) < 0.1
    assert rel_error(other, first) > 1e-4  # other mini-batches, another estimate (3.7e-3)


def test_damping_must_be_positive():
    _, params, loss, data = mlp_problem(seed=3)
    with pytest.raises(ValueError, match="damping must be > 0"):
        ifunc.ihvp_lissa(loss, params, data, damping=0.0)


def test_default_steps_are_mini_batches_on_large_data_and_full_on_small():
    from ifunc.ihvp.lissa import DEFAULT_BATCH_SIZE

    _, params, loss, (x, y) = mlp_problem(seed=4, n=DEFAULT_BATCH_SIZE + 16)
    lam = 0.5
    v = torch.randn(ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(0))
    big = ifunc.ihvp_lissa(loss, params, (x, y), damping=lam, depth=200)
    assert big.info["batch_size"] == DEFAULT_BATCH_SIZE
    torch.testing.assert_close(big(v), big(v))  # deterministic: the default generator is replayed
    explicit = ifunc.ihvp_lissa(
        loss, params, (x, y), damping=lam, depth=200, batch_size=DEFAULT_BATCH_SIZE, generator=None
    )
    torch.testing.assert_close(big(v), explicit(v))  # the default is exactly batch_size=DEFAULT_BATCH_SIZE
    assert rel_error(big(v), ifunc.ihvp_explicit(loss, params, (x, y), damping=lam)(v)) < 0.1
    small = ifunc.ihvp_lissa(loss, params, (x[:DEFAULT_BATCH_SIZE], y[:DEFAULT_BATCH_SIZE]), damping=lam, depth=5)
    assert small.info["batch_size"] is None  # all of the data every step: the truncated Neumann sum
    with pytest.raises(ValueError, match="batch_size"):
        ifunc.ihvp_lissa(loss, params, (x, y), damping=lam, batch_size=0)
