"""Bad input raises a clear error that names the problem and the fix."""

import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem


@pytest.fixture
def problem():
    return mlp_problem(seed=0, sizes=(3, 4, 2), n=6)


def test_non_scalar_loss(problem):
    model, params, loss, data = problem
    vector_loss = lambda p, b: torch.nn.functional.cross_entropy(
        ifunc.call(model, p, b[0]),
        b[1],  # noqa: E731
        reduction="none",
    )
    for build in (
        lambda: ifunc.ihvp_cg(vector_loss, params, data, damping=0.1),
        lambda: ifunc.ihvp_explicit(vector_loss, params, data, damping=0.1),
    ):
        with pytest.raises(ValueError, match="must return a scalar.*reduction='sum'"):
            build()


def test_wrong_vector_length_and_wrong_pytree(problem):
    _, params, loss, data = problem
    ihvp = ifunc.ihvp_explicit(loss, params, data, damping=0.1)
    with pytest.raises(ValueError, match=rf"expected a vector \[{ihvp.dim}\].*got \(5,\)"):
        ihvp(torch.zeros(5))
    with pytest.raises(ValueError, match="does not match the parameters' structure"):
        ihvp({"weight": torch.zeros(3)})
    bad = {k: torch.zeros(7) for k in params}
    with pytest.raises(ValueError, match="leaf of shape"):
        ihvp(bad)


def test_negative_or_nan_damping(problem):
    _, params, loss, data = problem
    for lam in (-1.0, float("nan")):
        for build in (ifunc.ihvp_explicit, ifunc.ihvp_cg):
            with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
                build(loss, params, data, damping=lam)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        ifunc.ihvp_explicit(loss, params, data, damping=0.1).with_damping(-1)


def test_nan_in_data_is_reported(problem):
    _, params, loss, (x, y) = problem
    x = x.clone()
    x[2] = float("inf")
    with pytest.raises(ValueError, match="loss\\(params, batch\\) is (nan|inf)"):
        ifunc.ihvp_cg(loss, params, (x, y), damping=0.1)
    ok = ifunc.ihvp_explicit(loss, params, (x[:2], y[:2]), damping=0.1)
    with pytest.raises(ValueError, match="non-finite gradient for example 2"):
        ifunc.attribute(loss, params, ok, (x, y), (x[:1], y[:1]))


def test_ihvp_for_another_model_and_bad_data(problem):
    _, params, loss, data = problem
    _, other_params, other_loss, other_data = mlp_problem(seed=0, sizes=(3, 6, 2), n=6)
    other = ifunc.ihvp_explicit(other_loss, other_params, other_data, damping=0.1)
    with pytest.raises(ValueError, match="built for .* parameters but params have"):
        ifunc.attribute(loss, params, other, data, data)
    with pytest.raises(TypeError, match="one-shot iterator"):
        ifunc.ihvp_cg(loss, params, iter([data]), damping=0.1)
    with pytest.raises(TypeError, match="ambiguous"):
        ifunc.ihvp_cg(loss, params, list(data), damping=0.1)
    x, y = data
    with pytest.raises(ValueError, match="same leading"):
        ifunc.per_sample_grads(loss, params, (x, y[:3]))
