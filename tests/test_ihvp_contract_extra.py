"""The closure contract for Nyström, DataInf and the block-diagonal modes (same checks as the core methods)."""

import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem, rel_error

BUILDERS = {
    "nystrom-low-rank": lambda loss, p, data, lam: ifunc.ihvp_nystrom(loss, p, data, rank=6, damping=lam),
    "nystrom-layer": lambda loss, p, data, lam: ifunc.ihvp_nystrom(loss, p, data, rank=5, damping=lam, blocks="layer"),
    "datainf": lambda loss, p, data, lam: ifunc.ihvp_datainf(loss, p, data, damping=lam),
    "datainf-fisher": lambda loss, p, data, lam: ifunc.ihvp_datainf(
        ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical"),
        p,
        data,
        damping=lam,
        curvature="fisher",
    ),
    "explicit-layer": lambda loss, p, data, lam: ifunc.ihvp_explicit(loss, p, data, damping=lam, blocks="layer"),
    "cg-layer": lambda loss, p, data, lam: ifunc.ihvp_cg(loss, p, data, damping=lam, blocks="layer", tol=1e-12),
    "arnoldi-layer": lambda loss, p, data, lam: ifunc.ihvp_arnoldi(loss, p, data, rank=4, damping=lam, blocks="layer"),
    "explicit-empirical-fisher": lambda loss, p, data, lam: ifunc.ihvp_explicit(
        loss, p, data, damping=lam, curvature="empirical_fisher"
    ),
}


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_closure_contract(method):
    """[k, d] equals k single calls; deterministic; symmetric; positive; pytrees; float32 in and out."""
    _, params, loss, data = mlp_problem(seed=7, sizes=(3, 4, 3), n=8)
    ihvp = BUILDERS[method](loss, params, data, 0.3)
    V = torch.randn(4, ihvp.dim, generator=torch.Generator().manual_seed(0))
    X = ihvp(V)
    assert rel_error(torch.stack([ihvp(v) for v in V]), X) < 1e-8
    assert rel_error(BUILDERS[method](loss, params, data, 0.3)(V), X) < 1e-12  # deterministic build and call
    u, v = V[0], V[1]
    assert abs(float(u @ ihvp(v) - ihvp(u) @ v)) < 1e-8 * float(u.norm() * v.norm())
    assert bool(((V * X).sum(1) > 0).all())
    unflatten = ifunc.flatten(params)[1]
    out = ihvp(unflatten(V))
    assert set(out) == set(params) and rel_error(unflatten.flatten_like(out)[0], X) < 1e-12
    with torch.no_grad():
        single = ihvp(V[0].float())
    assert single.dtype == torch.float32 and rel_error(single.double(), X[0]) < 1e-5


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_more_damping_never_increases_the_norm(method):
    _, params, loss, data = mlp_problem(seed=11, n=6)
    v = torch.randn(ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(1))
    norms = [float(BUILDERS[method](loss, params, data, lam)(v).norm()) for lam in (0.05, 0.2, 1.0)]
    assert all(a >= b * (1 - 1e-8) for a, b in zip(norms, norms[1:]))
