import inspect

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.ihvp.cg import DEFAULT_TOL
from ifunc.testing import mlp_problem, random_spd


@pytest.mark.parametrize("maxiter", [1, 3])
def test_first_iterates_equal_scipy(maxiter):
    A = random_spd(12, cond=50, seed=3)
    b = torch.randn(12, generator=torch.Generator().manual_seed(4))
    res = ifunc.cg_solve(lambda V: V @ A, b, tol=0.0, maxiter=maxiter)
    expected, _ = scipy.sparse.linalg.cg(A.numpy(), b.numpy(), x0=np.zeros(12), rtol=0.0, atol=0.0, maxiter=maxiter)
    np.testing.assert_allclose(res.x.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert int(res.iterations[0]) == maxiter and res.converged.tolist() == [False]


@given(d=st.integers(2, 20), cond=st.floats(1.0, 1e4), seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_exact_after_d_iterations_and_block_equals_single(d, cond, seed, k):
    A = random_spd(d, cond=cond, seed=seed)
    B = torch.randn(k, d, generator=torch.Generator().manual_seed(seed + 1))
    res = ifunc.cg_solve(lambda V: V @ A, B, tol=1e-10, maxiter=4 * d)
    assert res.converged.shape == (k,) and res.converged.dtype == torch.bool and bool(res.converged.all())
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B.T).T, rtol=1e-6, atol=1e-8)
    for i in range(k):
        single = ifunc.cg_solve(lambda V: V @ A, B[i], tol=1e-10, maxiter=4 * d)
        torch.testing.assert_close(single.x, res.x[i], rtol=1e-6, atol=1e-8)
        # the same recurrence; rounding can move the stopping test by an iteration or two on ill-conditioned A
        assert abs(int(single.iterations[0]) - int(res.iterations[i])) <= 2 + d // 10


def test_stops_on_its_tolerance_and_reports_iterations():
    A = random_spd(50, cond=1e3, seed=0)
    b = torch.randn(50, generator=torch.Generator().manual_seed(0))
    loose = ifunc.cg_solve(lambda V: V @ A, b, tol=1e-2, maxiter=1000)
    tight = ifunc.cg_solve(lambda V: V @ A, b, tol=1e-10, maxiter=1000)
    assert bool(loose.converged.all()) and bool(tight.converged.all())
    assert int(loose.iterations[0]) < int(tight.iterations[0]) < 1000
    assert float(loose.residual[0]) <= 1e-2 * float(b.norm())
    assert float((b - A @ loose.x).norm()) == pytest.approx(float(loose.residual[0]), rel=1e-6)


def test_exact_preconditioner_converges_in_one_iteration():
    A = random_spd(30, cond=1e4, seed=5)
    Ainv = torch.linalg.inv(A)
    b = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    res = ifunc.cg_solve(lambda V: V @ A, b, tol=1e-8, preconditioner=lambda R: R @ Ainv)
    assert bool(res.converged.all()) and int(res.iterations.max()) == 1


def test_ihvp_cg_raises_with_the_residual_when_it_does_not_converge():
    _, params, loss, data = mlp_problem(seed=0, sizes=(3, 6, 3), n=10)
    ihvp = ifunc.ihvp_cg(loss, params, data, damping=1e-6, tol=1e-14, maxiter=2)
    with pytest.raises(ifunc.ConvergenceError, match=r"1 of 1 right-hand sides did not converge in 2 iterations: rel"):
        ihvp(torch.ones(ihvp.dim))


def test_ihvp_cg_accepts_another_ihvp_as_preconditioner():
    _, params, loss, data = mlp_problem(seed=1, n=10)
    exact = ifunc.ihvp_explicit(loss, params, data, damping=0.1)
    pcg = ifunc.ihvp_cg(loss, params, data, damping=0.1, tol=1e-10, maxiter=2, preconditioner=exact)
    v = torch.randn(exact.dim)
    torch.testing.assert_close(pcg(v), exact(v))


def test_not_positive_definite_is_reported():
    A = -torch.eye(3)
    with pytest.raises(ValueError, match="not positive definite"):
        ifunc.cg_solve(lambda V: V @ A, torch.ones(3))


def test_converged_is_per_right_hand_side():
    """A zero right-hand side converges at once; a hard one does not within the cap: ``[True, False]``."""
    A = random_spd(20, cond=1e4, seed=1)
    B = torch.stack([torch.zeros(20), torch.randn(20, generator=torch.Generator().manual_seed(2))])
    res = ifunc.cg_solve(lambda V: V @ A, B, tol=1e-12, maxiter=3)
    assert res.converged.tolist() == [True, False]
    assert res.iterations.tolist() == [0, 3]


def test_cg_solve_and_ihvp_cg_share_one_default_tol():
    for fn in (ifunc.cg_solve, ifunc.ihvp_cg):
        assert inspect.signature(fn).parameters["tol"].default == DEFAULT_TOL


def test_ihvp_cg_names_how_many_right_hand_sides_failed():
    _, params, loss, data = mlp_problem(seed=0, sizes=(3, 6, 3), n=10)
    ihvp = ifunc.ihvp_cg(loss, params, data, damping=1e-6, tol=1e-14, maxiter=2)
    V = torch.stack([torch.zeros(ihvp.dim), torch.ones(ihvp.dim), -torch.ones(ihvp.dim)])
    with pytest.raises(ifunc.ConvergenceError, match=r"^ihvp_cg: 2 of 3 right-hand sides did not converge"):
        ihvp(V)


def test_ihvp_cg_default_damping_converges_on_an_mlp():
    """``damping=None`` (λ = 0.1 × mean eigenvalue) converges where the old default 0.0 ran out of iterations."""
    _, params, loss, data = mlp_problem(seed=0, sizes=(3, 6, 3), n=10)
    ihvp = ifunc.ihvp_cg(loss, params, data)
    assert isinstance(ihvp.damping, float) and ihvp.damping > 0
    x = ihvp(torch.ones(ihvp.dim))
    assert torch.isfinite(x).all()


def _f32_problem(lam):
    model, _, loss, (x, y) = mlp_problem(seed=3, sizes=(4, 16, 3), n=60, dtype=torch.float32)
    params = ifunc.params_of(model.float())
    G = ifunc.ggn(loss, {k: v.double() for k, v in params.items()}, (x.double(), y))
    V = torch.randn(4, G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return params, loss, (x, y), G, V


def test_float32_cg_checks_the_true_residual_not_the_recursive_one():
    """In float32 the recursive residual drifts below tol while ``(H + λI)x − v`` does not: either the true
    residual meets tol (after restarts from x) or the error names the dtype's floor."""
    params, loss, data, G, V = _f32_problem(1e-2)
    A = G + 1e-2 * torch.eye(G.shape[0], dtype=torch.float64)
    X = ifunc.ihvp_cg(loss, params, data, damping=1e-2)(V.float()).double()
    assert float(((X @ A - V).norm(dim=1) / V.norm(dim=1)).max()) <= 2e-5  # tol 1e-5, measured in float64
    with pytest.raises(ifunc.ConvergenceError, match=r"true relative residual .* stalls at .*torch.float32 rounding "):
        ifunc.ihvp_cg(loss, params, data, damping=1e-4)(V.float())
    # cg_solve reports the true residual and marks the stall, without raising
    op = ifunc.curvature_operator(loss, params, data)
    res = ifunc.cg_solve(lambda P: op.matvec(P) + 1e-4 * P, V.float())
    true = (V.float() - op.matvec(res.x) - 1e-4 * res.x).norm(dim=1)
    torch.testing.assert_close(res.residual, true, rtol=1e-3, atol=0)
    assert res.converged.tolist() == (res.residual <= 1e-5 * V.float().norm(dim=1)).tolist()
    assert res.stalled is not None and bool((res.stalled | res.converged).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tol_below_the_dtype_rounding_is_met_at_the_floor(dtype):
    A = random_spd(20, cond=10, seed=2).to(dtype)
    b = torch.randn(20, generator=torch.Generator().manual_seed(3)).to(dtype)
    res = ifunc.cg_solve(lambda V: V @ A, b, tol=1e-30)
    assert float(res.residual[0]) <= 4 * torch.finfo(dtype).eps * float(b.norm())
    assert bool(res.stalled[0]) and not bool(res.converged[0])
