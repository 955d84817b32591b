"""fisher and empirical_fisher: each matvec equals its dense definition; errors where a mode cannot apply."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.likelihood import LIKELIHOODS
from ifunc.testing import mlp_problem, rel_error

from .strategies import mlp_problems


def _jacobians(loss, params, data):
    """Per-example output Jacobians ``[n, m, d]``."""
    flat, unflatten = ifunc.flatten(params)
    x, y = data
    rows = []
    for i in range(x.shape[0]):
        rows.append(torch.func.jacrev(lambda f: loss.outputs(unflatten(f), (x[i : i + 1], y[i : i + 1]))[0])(flat))
    return torch.stack(rows)


@given(problem=mlp_problems(), seed=st.integers(0, 1000))
def test_empirical_fisher_is_the_mean_gradient_outer_product(problem, seed):
    _, params, loss, data = problem
    G = ifunc.per_sample_grads(loss, params, data)  # [n, d]
    dense = G.T @ G / G.shape[0]
    V = torch.randn(3, G.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ifunc.hvp(loss, params, data, V, curvature="empirical_fisher"), V @ dense)
    # also for a plain loss (no output split needed), and averaged over several batches
    plain = lambda p, b: loss(p, b)  # noqa: E731
    x, y = data
    split = [(x[:1], y[:1]), (x[1:], y[1:])] if x.shape[0] > 1 else [(x, y)]
    torch.testing.assert_close(ifunc.hvp(plain, params, split, V, curvature="empirical_fisher"), V @ dense)


@given(problem=mlp_problems(), seed=st.integers(0, 1000))
def test_fisher_matvec_is_the_mean_of_sampled_outer_products(problem, seed):
    """With a callable likelihood, the operator is (1/n) Σ_i J_iᵀ g_i g_iᵀ J_i for the draws g_i it returns."""
    _, params, loss, data = problem
    draws = []

    def likelihood(out, generator):
        g = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        draws.append(g)
        return g

    lik_loss = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood=likelihood)
    d = ifunc.flatten(params)[0].numel()
    V = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    got = ifunc.hvp(lik_loss, params, data, V, curvature="fisher", generator=torch.Generator().manual_seed(seed))
    g = draws[-1]  # [n, m]
    J = _jacobians(loss, params, data)  # [n, m, d]
    S = torch.einsum("nm,nmd->nd", g, J)  # per-example J_iᵀ g_i
    torch.testing.assert_close(got, V @ (S.T @ S) / S.shape[0])


def test_fisher_is_a_fixed_matrix_and_deterministic():
    _, params, loss, data = mlp_problem(seed=2, n=6)
    lik = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical")
    op = ifunc.curvature_operator(lik, params, data, curvature="fisher", generator=torch.Generator().manual_seed(3))
    E = torch.eye(op.flat_params.numel())
    F1, F2 = op.matvec(E), op.matvec(E)
    assert torch.equal(F1, F2)  # the labels are replayed on every pass
    torch.testing.assert_close(F1, F1.T)
    assert float(torch.linalg.eigvalsh(F1).min()) > -1e-12
    other = ifunc.curvature_operator(
        lik, params, data, curvature="fisher", generator=torch.Generator().manual_seed(4)
    ).matvec(E)
    assert rel_error(other, F1) > 0.1  # other labels, another one-sample Fisher (0.57 apart here)


@pytest.mark.parametrize("task,likelihood", [("classification", "categorical"), ("regression", "gaussian")])
def test_builtin_likelihoods_give_the_ggn_in_expectation(task, likelihood):
    """E[g gᵀ] is the output Hessian Λ for cross-entropy (softmax) and ½‖·‖² (identity): Fisher → GGN."""
    _, params, loss, (x, y) = mlp_problem(seed=3, sizes=(2, 3, 3), n=2, task=task)
    lik = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood=likelihood)
    reps = 3000  # the same two examples repeated: independent labels for each copy
    big = (x.repeat(reps, 1), y.repeat(reps) if y.dim() == 1 else y.repeat(reps, 1))
    E = torch.eye(ifunc.flatten(params)[0].numel())
    F = ifunc.hvp(lik, params, big, E, curvature="fisher", generator=torch.Generator().manual_seed(0))
    G = ifunc.ggn(loss, params, (x, y))
    assert rel_error(F, G) < 0.08


def test_categorical_rule_samples_from_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0]]).repeat(20000, 1)
    g = LIKELIHOODS["categorical"](logits, torch.Generator().manual_seed(0))
    p = torch.softmax(logits[0], -1)
    torch.testing.assert_close(g.mean(0), torch.zeros(3), atol=0.02, rtol=0)  # E[p − onehot] = 0
    torch.testing.assert_close(g.T @ g / g.shape[0], torch.diag(p) - torch.outer(p, p), atol=0.02, rtol=0)


def test_every_hvp_method_accepts_the_new_curvatures():
    _, params, loss, data = mlp_problem(seed=4, sizes=(2, 3, 2), n=5)
    lik = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical")
    d = ifunc.flatten(params)[0].numel()
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    for curvature in ("fisher", "empirical_fisher"):
        E = torch.eye(d)
        M = ifunc.hvp(lik, params, data, E, curvature=curvature) + 0.5 * E
        expected = torch.linalg.solve(M, v)
        for ihvp in (
            ifunc.ihvp_explicit(lik, params, data, damping=0.5, curvature=curvature),
            ifunc.ihvp_cg(lik, params, data, damping=0.5, curvature=curvature, tol=1e-12),
            ifunc.ihvp_arnoldi(lik, params, data, rank=d, damping=0.5, curvature=curvature),
            ifunc.ihvp_nystrom(lik, params, data, rank=d, damping=0.5, curvature=curvature),
            ifunc.ihvp_lissa(lik, params, data, damping=0.5, curvature=curvature, depth=300),
        ):
            torch.testing.assert_close(ihvp(v), expected, rtol=1e-6, atol=1e-8, msg=f"{ihvp.name} {curvature}")


def test_clear_errors():
    _, params, loss, data = mlp_problem(seed=5)
    with pytest.raises(TypeError, match="likelihood="):
        ifunc.ihvp_cg(loss, params, data, damping=0.1, curvature="fisher")  # output_loss without likelihood
    with pytest.raises(TypeError, match="likelihood="):
        ifunc.hvp(
            lambda p, b: loss(p, b), params, data, torch.zeros(ifunc.flatten(params)[0].numel()), curvature="fisher"
        )
    with pytest.raises(ValueError, match="not built in"):
        ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="poisson")
    bad = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood=lambda out, gen: out[:, :1])
    with pytest.raises(ValueError, match="shaped like outputs"):
        ifunc.curvature_operator(bad, params, data, curvature="fisher").matvec(torch.eye(3, 26))
