"""The iHVP closure contract, run over every method of the table in ``tests/methods.py``.

Hypothesis draws seeds, sizes and the damping; the problems and vectors are built from them. Each property
is one test, parametrised over the table, so a failure names the method and the property.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.testing import rel_error

from .methods import EXACT, METHODS, Method, Problem, dim, ggn, make_problem
from .strategies import problem_specs, seeds

# λ = ratio · λ_max(GGN) with ratio in [0.25, 1]: the iterative rows (CG, LiSSA) cost ~ λ_max / λ curvature
# products per call, so this bounds their cost; small-λ conditioning is the subject of the per-method files
ratios = st.floats(0.25, 1.0)
coefficients = st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(0.25, 3.0)).map(lambda t: t[0] * t[1])


def _vectors(problem: Problem, k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, dim(problem), generator=torch.Generator().manual_seed(seed))


def _damping(problem: Problem, ratio: float) -> float:
    return ratio * float(torch.linalg.eigvalsh(ggn(problem)).max())


def _setup(method: Method, spec: dict, ratio: float, seed: int, k: int = 3):
    """``(problem, λ, closure, V [k, d])``."""
    problem = method.problem(spec)
    lam = _damping(problem, ratio)
    return problem, lam, method.build(problem, lam), _vectors(problem, k, seed)


@pytest.mark.parametrize("method", EXACT, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_agrees_with_the_dense_solve(method, spec, ratio, seed):
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed)
    A = method.reference(problem) + lam * torch.eye(dim(problem))
    X = ihvp(V)
    assert X.shape == V.shape
    assert rel_error(X, torch.linalg.solve(A, V.T).T) < method.tol
    # and it inverts: (C + λI) f(v) = v, up to the tolerance amplified by the condition number
    assert rel_error(X @ A, V) < method.tol * float(torch.linalg.cond(A))


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_a_stack_equals_single_calls(method, spec, ratio, seed):
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=2)
    X = ihvp(V)
    assert X.shape == V.shape and X.dtype == V.dtype
    assert rel_error(torch.stack([ihvp(v) for v in V]), X) < method.rtol


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_a_pytree_in_gives_the_same_pytree_out(method, spec, ratio, seed):
    """A params-shaped dict (optionally with a leading k on every leaf) gives the same dict back."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=2)
    _, unflatten = ifunc.flatten(problem.params)
    X = ihvp(V)
    for vectors, expected, tol in ((V, X, 1e-12), (V[0], X[0], method.rtol)):
        out = ihvp(unflatten(vectors))
        assert isinstance(out, dict) and list(out) == list(problem.params)
        lead = tuple(vectors.shape[:-1])
        assert {k: tuple(t.shape) for k, t in out.items()} == {k: (*lead, *p.shape) for k, p in problem.params.items()}
        assert rel_error(unflatten.flatten_like(out)[0], expected) < tol


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_symmetric(method, spec, ratio, seed):
    """⟨u, f w⟩ = ⟨f u, w⟩ for every pair: ``U f(W)ᵀ = f(U) Wᵀ``."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=4)
    X = ihvp(V)
    U, W, XU, XW = V[:2], V[2:], X[:2], X[2:]
    scale = float(U.norm(dim=1).max() * W.norm(dim=1).max()) / lam  # ‖f‖ <= 1/λ for every row of the table
    assert float((U @ XW.T - XU @ W.T).abs().max()) < method.rtol * scale


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_positive(method, spec, ratio, seed):
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=4)
    quadratic = (V * ihvp(V)).sum(1)
    assert bool((quadratic > 0).all()), quadratic


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds, a=coefficients, b=coefficients)
def test_linear(method, spec, ratio, seed, a, b):
    """``f(a u + b v) = a f(u) + b f(v)``."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=2)
    X = ihvp(V)
    combined, separate = ihvp(a * V[0] + b * V[1]), a * X[0] + b * X[1]
    scale = float(abs(a) * V[0].norm() + abs(b) * V[1].norm()) / lam
    assert float((combined - separate).norm()) <= method.rtol * scale


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_deterministic(method, spec, ratio, seed):
    """Two calls give the same bits; a second build from the same inputs gives the same answer."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed)
    X = ihvp(V)
    assert torch.equal(ihvp(V), X)
    assert rel_error(method.build(problem, lam)(V), X) < 1e-12


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_more_damping_never_increases_the_norm(method, spec, ratio, seed):
    """``‖f_λ v‖`` is non-increasing in λ (``with_damping`` for the factorised rows, else a rebuild)."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed)
    closures = [ihvp] + [
        ihvp.with_damping(c * lam) if method.free_redamping else method.build(problem, c * lam) for c in (2.0, 4.0)
    ]
    assert [f.damping for f in closures] == [lam, 2 * lam, 4 * lam]
    norms = torch.stack([f(V).norm(dim=1) for f in closures])  # [3 dampings, k vectors]
    assert bool((norms[1:] <= norms[:-1] * (1 + method.rtol)).all()), norms


def _snapshot(model: torch.nn.Module, params: dict):
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "params": {k: v.clone() for k, v in params.items()},
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()] + [t.requires_grad for t in params.values()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(getattr(m, "_backward_pre_hooks", {}))
            for m in model.modules()
        ],
    }


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds, training=st.booleans(), with_grad=st.booleans())
def test_pure(method, spec, ratio, seed, training, with_grad):
    """Building and calling leave the module (parameters, ``.grad``, flags, buffers, hooks) and params untouched."""
    problem = method.problem(spec)
    lam = _damping(problem, ratio)
    model = problem.model
    model.register_buffer("counter", torch.arange(3.0))
    model.train(training)
    if with_grad:  # a stale gradient the user left behind must survive
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    before = _snapshot(model, problem.params)
    ihvp = method.build(problem, lam)
    V = _vectors(problem, 2, seed)
    ihvp(V)
    ihvp(ifunc.flatten(problem.params)[1](V[0]))
    after = _snapshot(model, problem.params)
    changed = [k for k in before if not _same(before[k], after[k])]
    assert not changed, f"{method.name} changed the module's or the params' {changed}"


def test_nystrom_sketch_of_a_singular_ggn():
    """Deep linear net, one example, cross-entropy: rank-1 GGN; rank = d Nyström equals the dense solve.

    The round-off of the curvature products leaves an eigenvalue ~ -1e-15 in ``Ωᵀ H Ω``, above the default
    shift ν ~ 6e-17 (it used to fail the Cholesky); the sketch now shifts past rounding-level negatives.
    """
    problem = make_problem(seed=146, sizes=(1, 1, 2), n=1, activation=None, task="classification")
    nystrom = next(m for m in METHODS if m.name == "nystrom")
    V = _vectors(problem, 3, 0)
    A = ggn(problem) + torch.eye(dim(problem))
    assert rel_error(nystrom.build(problem, 1.0)(V), torch.linalg.solve(A, V.T).T) < nystrom.tol
