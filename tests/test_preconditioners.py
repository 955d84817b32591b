"""Preconditioners: same CG solution in no more iterations; the diagonal and the sketch are right."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.testing import mlp_problem, random_spd


def _problem(d, cond, seed, spread):
    """Random SPD ``S A S``: ``A`` with the given condition number, ``S`` a log-normal diagonal scaling."""
    gen = torch.Generator().manual_seed(seed + 1)
    s = torch.exp(spread * torch.randn(d, generator=gen))
    A = s[:, None] * random_spd(d, cond=cond, seed=seed) * s[None]
    return A, torch.randn(3, d, generator=gen)


@given(
    d=st.integers(2, 30),
    cond=st.floats(1.0, 1e4),
    seed=st.integers(0, 10_000),
    spread=st.floats(0.0, 3.0),
    log_cond_scaled=st.floats(0.0, 2.0),
)
def test_jacobi_same_solution_and_no_more_iterations_when_scaling_dominates(d, cond, seed, spread, log_cond_scaled):
    """Jacobi is not a universal win (it can add iterations on rotated spectra, e.g. d=10, cond=1553,
    seed=287, spread=1): the solution must always agree, and the iteration count must not grow when the
    bad conditioning comes from the diagonal scaling (spread >= 2, inner condition number <= 100)."""
    A, B = _problem(d, cond, seed, spread)
    matvec = lambda V: V @ A  # noqa: E731
    plain = ifunc.cg_solve(matvec, B, tol=1e-8, maxiter=10 * d)
    pre = ifunc.cg_solve(
        matvec, B, tol=1e-8, maxiter=10 * d, preconditioner=ifunc.jacobi_preconditioner(matvec, dim=d, damping=0.0)
    )
    assert bool(pre.converged.all())
    if bool(plain.converged.all()):
        torch.testing.assert_close(pre.x, plain.x, rtol=1e-5, atol=1e-7 * float(plain.x.abs().max()))
    A2, B2 = _problem(d, 10.0**log_cond_scaled, seed, 2.0 + spread / 3)
    matvec2 = lambda V: V @ A2  # noqa: E731
    plain2 = ifunc.cg_solve(matvec2, B2, tol=1e-8, maxiter=10 * d)
    pre2 = ifunc.cg_solve(
        matvec2, B2, tol=1e-8, maxiter=10 * d, preconditioner=ifunc.jacobi_preconditioner(matvec2, dim=d, damping=0.0)
    )
    assert bool(pre2.converged.all())
    assert bool((pre2.iterations <= plain2.iterations).all())


@given(
    d=st.integers(2, 30),
    cond=st.floats(1.0, 1e4),
    seed=st.integers(0, 10_000),
    rank_fraction=st.floats(0.0, 1.0),
    log_damping=st.floats(-6.0, 0.0),
)
def test_nystrom_same_solution_in_no_more_iterations(d, cond, seed, rank_fraction, log_damping):
    A = random_spd(d, cond=cond, seed=seed)
    B = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    lam = 10.0**log_damping
    rank = max(1, round(rank_fraction * d))
    matvec = lambda V: V @ A + lam * V  # noqa: E731
    plain = ifunc.cg_solve(matvec, B, tol=1e-8, maxiter=10 * d)
    pre = ifunc.cg_solve(
        matvec,
        B,
        tol=1e-8,
        maxiter=10 * d,
        preconditioner=ifunc.nystrom_preconditioner(lambda V: V @ A, dim=d, rank=rank, damping=lam),
    )
    assert bool(plain.converged.all()) and bool(pre.converged.all())
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-5, atol=1e-8 * float(plain.x.abs().max()))
    assert bool((pre.iterations <= plain.iterations).all())


def test_full_rank_nystrom_preconditioner_solves_in_one_iteration():
    A = random_spd(15, cond=1e4, seed=2)
    b = torch.randn(15, generator=torch.Generator().manual_seed(0))
    P = ifunc.nystrom_preconditioner(lambda V: V @ A, dim=15, rank=15, damping=1e-3)
    res = ifunc.cg_solve(lambda V: V @ A + 1e-3 * V, b, tol=1e-8, preconditioner=P)
    assert int(res.iterations[0]) <= 2 and bool(res.converged.all())  # P^{-1} ∝ (A + λI)^{-1}: one step up to rounding


def test_jacobi_diagonal_exact_and_hutchinson():
    A = random_spd(12, cond=10, seed=5)
    exact = ifunc.jacobi_preconditioner(lambda V: V @ A, dim=12, damping=0.1)
    torch.testing.assert_close(exact.diagonal, torch.diagonal(A))
    D = torch.diag(torch.linspace(0.5, 3.0, 12))
    one_probe = ifunc.jacobi_preconditioner(lambda V: V @ D, dim=12, damping=0.0, probes=1)
    torch.testing.assert_close(one_probe.diagonal, torch.diagonal(D))  # z ⊙ D z = diag(D) for z = ±1
    many = ifunc.jacobi_preconditioner(
        lambda V: V @ A, dim=12, damping=0.1, probes=4000, generator=torch.Generator().manual_seed(1)
    )
    assert float((many.diagonal - torch.diagonal(A)).abs().max()) < 0.05
    v = torch.ones(12)
    torch.testing.assert_close(exact(v), v / (torch.diagonal(A) + 0.1))


def test_with_ihvp_cg_on_a_model():
    _, params, loss, data = mlp_problem(seed=6, sizes=(3, 6, 3), n=20)
    op = ifunc.curvature_operator(loss, params, data)
    lam = 1e-3
    v = torch.randn(op.flat_params.numel(), generator=torch.Generator().manual_seed(2))
    plain = ifunc.ihvp_cg(loss, params, data, damping=lam, tol=1e-10)(v)
    for P in (
        ifunc.jacobi_preconditioner(op, damping=lam, probes=16),
        ifunc.nystrom_preconditioner(op, rank=10, damping=lam),
    ):
        pre = ifunc.ihvp_cg(loss, params, data, damping=lam, tol=1e-10, preconditioner=P)(v)
        torch.testing.assert_close(pre, plain, rtol=1e-6, atol=1e-8)


def test_errors():
    with pytest.raises(ValueError, match="dim=d"):
        ifunc.jacobi_preconditioner(lambda V: V, damping=0.1)
    with pytest.raises(TypeError, match="curvature_operator"):
        ifunc.nystrom_preconditioner(3, rank=2, damping=0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        ifunc.nystrom_preconditioner(lambda V: V, dim=4, rank=2, damping=0.0)
    with pytest.raises(ValueError, match="rank must be"):
        ifunc.nystrom_preconditioner(lambda V: V, dim=4, rank=5, damping=0.1)
    with pytest.raises(ValueError, match="zero or non-finite"):
        ifunc.jacobi_preconditioner(lambda V: 0 * V, dim=4, damping=0.0)


def test_a_preconditioner_built_without_damping_takes_the_damping_of_ihvp_cg():
    _, params, loss, data = mlp_problem(seed=6, sizes=(3, 6, 3), n=20)
    op = ifunc.curvature_operator(loss, params, data)
    v = torch.randn(op.flat_params.numel(), generator=torch.Generator().manual_seed(2))
    for P in (ifunc.jacobi_preconditioner(op, damping=None), ifunc.nystrom_preconditioner(op, rank=10, damping=None)):
        with pytest.raises(ValueError, match="damping=None"):
            P(v)  # no λ yet: applying it alone is an error, not a silent guess
        ruled = ifunc.ihvp_cg(loss, params, data, tol=1e-10, preconditioner=P)  # the damping=None rule's λ
        plain = ifunc.ihvp_cg(loss, params, data, tol=1e-10)
        assert ruled.damping == plain.damping
        torch.testing.assert_close(ruled(v), plain(v), rtol=1e-6, atol=1e-8)
        redamped = ruled.with_damping(0.3)  # re-damps the preconditioner too, from the kept sketch / diagonal
        torch.testing.assert_close(redamped(v), plain.with_damping(0.3)(v), rtol=1e-6, atol=1e-8)
        damped = P.with_damping(0.3)
        assert damped.damping == 0.3 and P.damping is None  # a value: with_damping returns a new one


def test_deferred_nystrom_cuts_cg_iterations_like_the_damped_one():
    _, params, loss, data = mlp_problem(seed=6, sizes=(3, 6, 3), n=20)
    op = ifunc.curvature_operator(loss, params, data)
    lam = 1e-3
    B = torch.randn(4, op.flat_params.numel(), generator=torch.Generator().manual_seed(3))
    system = lambda V: op.matvec(V) + lam * V  # noqa: E731
    P = ifunc.nystrom_preconditioner(op, rank=10, damping=None)
    plain = ifunc.cg_solve(system, B, tol=1e-8)
    pre = ifunc.cg_solve(system, B, tol=1e-8, preconditioner=P.with_damping(lam))
    same = ifunc.cg_solve(system, B, tol=1e-8, preconditioner=ifunc.nystrom_preconditioner(op, rank=10, damping=lam))
    assert int(pre.iterations.max()) < int(plain.iterations.max())
    torch.testing.assert_close(pre.x, same.x)
