"""Bad input raises a clear error that names the problem and the fix."""

import numpy as np
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


def _count_cases(tmp_path):
    """``(name, call)`` for every count argument of the solvers, the preconditioners, ihvp_error and top_k."""
    _, params, loss, data = mlp_problem(seed=0, sizes=(3, 4, 2), n=6)
    op = ifunc.curvature_operator(loss, params, data)
    d = op.flat_params.numel()
    base = ifunc.ihvp_explicit(loss, params, data, damping=0.1)
    store = str(tmp_path / "s.h5")
    ifunc.attribute(loss, params, base, data, (data[0][:2], data[1][:2]), out=store, progress=False)
    mat = ifunc.ggn(loss, params, data)
    return {
        "ihvp_cg.maxiter": lambda v: ifunc.ihvp_cg(loss, params, data, damping=0.1, maxiter=v),
        "cg_solve.maxiter": lambda v: ifunc.cg_solve(lambda P: P @ mat + 0.1 * P, torch.ones(2, d), maxiter=v),
        "lanczos.steps": lambda v: ifunc.lanczos(op.matvec, d, v),
        "jacobi_preconditioner.probes": lambda v: ifunc.jacobi_preconditioner(op, damping=0.1, probes=v),
        "jacobi_preconditioner.chunk": lambda v: ifunc.jacobi_preconditioner(op, damping=0.1, chunk=v),
        "nystrom_preconditioner.rank": lambda v: ifunc.nystrom_preconditioner(op, rank=v, damping=0.1),
        "ihvp_error.probes": lambda v: ifunc.ihvp_error(base, base, probes=v),
        "top_k.k": lambda v: ifunc.top_k(store, v),
        "top_k.block": lambda v: ifunc.top_k(store, 2, block=v),
    }


_BAD_COUNTS = [
    (True, TypeError, "must be an int >= 1, got the bool True"),
    (np.bool_(True), TypeError, r"must be an int >= 1, got the bool (np\.)?True_?"),
    (torch.tensor(True), TypeError, r"must be an int >= 1, got the bool tensor\(True\)"),
    (2.5, TypeError, r"must be an int >= 1, got 2.5 \(float\)"),
    (2.0, TypeError, r"must be an int >= 1, got 2.0 \(float\)"),
    ("3", TypeError, r"must be an int >= 1, got '3' \(str\)"),
    (0, ValueError, "must be an int >= 1, got 0"),
    (-1, ValueError, "must be an int >= 1, got -1"),
]
_COUNT_NAMES = [
    "ihvp_cg.maxiter", "cg_solve.maxiter", "lanczos.steps", "jacobi_preconditioner.probes",
    "jacobi_preconditioner.chunk", "nystrom_preconditioner.rank", "ihvp_error.probes", "top_k.k", "top_k.block",
]  # fmt: skip


@pytest.mark.parametrize("name", _COUNT_NAMES)
def test_every_count_argument_refuses_bools_floats_strings_and_non_positive_values(name, tmp_path):
    call = _count_cases(tmp_path)[name]
    argument = name.split(".")[1]
    for value, error, pattern in _BAD_COUNTS:
        with pytest.raises(error, match=rf"{name.split('.')[0]}: {argument} {pattern}"):
            call(value)
    for good in (np.int64(3), torch.tensor(3), 3):  # NumPy and 0-d torch integers are accepted like ints
        call(good)


def test_a_jacobi_chunk_gives_the_exact_diagonal_whatever_its_size():
    _, params, loss, data = mlp_problem(seed=0, sizes=(3, 4, 2), n=6)
    op = ifunc.curvature_operator(loss, params, data)
    d = op.flat_params.numel()
    expected = 1 / (torch.diagonal(ifunc.ggn(loss, params, data)) + 0.1)
    for chunk in (1, 5, np.int64(7), d, 10 * d):
        P = ifunc.jacobi_preconditioner(op, damping=0.1, chunk=chunk)
        torch.testing.assert_close(P(torch.ones(1, d))[0], expected)
