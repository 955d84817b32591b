"""Every iHVP method against the exact dense solve, and the properties every closure must keep."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.testing import mlp_problem, rel_error

from .strategies import dampings, mlp_problems

# (name, builder, relative tolerance vs explicit)
METHODS = {
    "explicit": (lambda loss, p, data, lam: ifunc.ihvp_explicit(loss, p, data, damping=lam), 1e-10),
    "cg": (
        lambda loss, p, data, lam: ifunc.ihvp_cg(loss, p, data, damping=lam, tol=1e-12, atol=1e-14, maxiter=500),
        1e-5,
    ),
    "arnoldi": (
        lambda loss, p, data, lam: ifunc.ihvp_arnoldi(loss, p, data, rank=ifunc.flatten(p)[0].numel(), damping=lam),
        1e-5,
    ),
    # depth ~ (s/λ)·log(1/tol): the truncation error decays like (1 − λ/s)^depth
    "lissa": (
        lambda loss, p, data, lam: ifunc.ihvp_lissa(loss, p, data, damping=lam, depth=min(3000, int(100 / lam))),
        1e-2,
    ),
}


def _dense(loss, params, data, lam):
    G = ifunc.ggn(loss, params, data)
    return G + lam * torch.eye(G.shape[0])


@pytest.mark.parametrize("method", sorted(METHODS))
@given(problem=mlp_problems(), lam=dampings, seed=st.integers(0, 1000))
def test_matches_dense_solve_and_inverts(method, problem, lam, seed):
    _, params, loss, data = problem
    build, tol = METHODS[method]
    lam = max(lam, 0.05) if method == "lissa" else lam
    A = _dense(loss, params, data, lam)
    V = torch.randn(3, A.shape[0], generator=torch.Generator().manual_seed(seed))
    if method == "lissa":  # converge by construction: scale s = λ_max + λ, depth ≈ (s/λ) ln(1e4)
        s = float(torch.linalg.eigvalsh(A).max())
        depth = int(s / lam * 9.3) + 1
        ihvp = ifunc.ihvp_lissa(loss, params, data, damping=lam, scale=s, depth=depth)
    else:
        ihvp = build(loss, params, data, lam)
    X = ihvp(V)
    assert rel_error(X, torch.linalg.solve(A, V.T).T) < tol
    assert rel_error(X @ A, V) < max(tol * float(torch.linalg.cond(A)), 1e-8)  # v == (H + λI) ihvp(v)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_closure_contract(method):
    """[k, d] equals k single calls; pytrees in and out; deterministic; symmetric; positive; no grad needed."""
    _, params, loss, data = mlp_problem(seed=7, sizes=(3, 4, 3), n=8)
    build, tol = METHODS[method]
    ihvp = build(loss, params, data, 0.3)
    d = ihvp.dim
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(4, d, generator=gen)
    X = ihvp(V)
    singles = torch.stack([ihvp(v) for v in V])
    assert rel_error(singles, X) < tol
    assert rel_error(ihvp(V), X) < 1e-12  # deterministic
    u, v = V[0], V[1]
    assert abs(float(u @ ihvp(v) - ihvp(u) @ v)) < 10 * tol * float(u.norm() * v.norm())  # symmetric
    assert float(v @ ihvp(v)) > 0  # positive definite
    tree = ifunc.flatten(params)[1](V)  # pytree with a leading k
    out = ihvp(tree)
    assert set(out) == set(params)
    flat_back = ifunc.flatten(params)[1].flatten_like(out)[0]
    assert rel_error(flat_back, X) < tol
    with torch.no_grad():
        assert rel_error(ihvp(V[0].float()).double(), X[0]) < max(tol, 1e-5)  # float32 in, float32 out
    assert ihvp(V[0].float()).dtype == torch.float32


@pytest.mark.parametrize("method", ["explicit", "cg", "arnoldi"])
def test_more_damping_never_increases_the_norm_and_scaling_the_loss_divides(method):
    _, params, loss, data = mlp_problem(seed=11, n=6)
    build, tol = METHODS[method]
    v = torch.randn(ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(1))
    norms = [float(build(loss, params, data, lam)(v).norm()) for lam in (0.05, 0.2, 1.0, 5.0)]
    assert all(a >= b * (1 - 1e-6) for a, b in zip(norms, norms[1:]))
    scaled = ifunc.output_loss(loss.outputs, lambda out, b: 3.0 * loss.loss_on_outputs(out, b))
    x1 = build(loss, params, data, 0.2)(v)
    x3 = build(scaled, params, data, 0.6)(v)  # (3H + 3λ)^{-1} = (H + λ)^{-1} / 3
    assert rel_error(3 * x3, x1) < 10 * tol


@pytest.mark.parametrize("method", ["explicit", "arnoldi"])
def test_with_damping_costs_no_curvature_products(method):
    _, params, loss, data = mlp_problem(seed=2, n=6)
    calls = []
    counted = ifunc.output_loss(lambda p, b: (calls.append(1), loss.outputs(p, b))[1], loss.loss_on_outputs)
    build, _ = METHODS[method]
    ihvp = build(counted, params, data, 0.1)
    before = len(calls)
    v = torch.randn(ihvp.dim)
    swept = [ihvp.with_damping(lam)(v) for lam in (0.01, 0.1, 1.0)]
    assert len(calls) == before  # no recomputation, ever
    torch.testing.assert_close(swept[1], ihvp(v))
    fresh = build(loss, params, data, 1.0)(v)
    assert rel_error(swept[2], fresh) < 1e-6
