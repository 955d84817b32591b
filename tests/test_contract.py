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

from .methods import EXACT, FULL_BLOCKS, METHODS, Method
from .problems import Problem, dim, ggn, group_of, make_problem, scaled
from .strategies import problem_specs, seeds

# λ = ratio · λ_max(GGN) with ratio in [0.25, 1]: LiSSA costs ~ λ_max / λ curvature products per call, so this
# bounds its cost; small ratios (condition numbers up to ~1e3) are drawn by one test that leaves LiSSA out
ratios = st.floats(0.25, 1.0)
small_ratios = st.floats(1e-3, 0.25)
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


def _check_dense_solve(method: Method, spec: dict, ratio: float, seed: int, *, per_condition: bool = False) -> None:
    """``f(V)`` within ``tol`` of the dense solve (``tol × cond`` with ``per_condition``: a solver that stops on
    its residual is off by up to the condition number times it), and ``(C + λI) f(V) = V``."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed)
    assert method.reference is not None and method.tol is not None
    A = method.reference(problem) + lam * torch.eye(dim(problem))
    cond = float(torch.linalg.cond(A))
    X = ihvp(V)
    assert X.shape == V.shape
    assert rel_error(X, torch.linalg.solve(A, V.T).T) < method.tol * (cond if per_condition else 1.0)
    assert rel_error(X @ A, V) < method.tol * cond


@pytest.mark.parametrize("method", EXACT, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_agrees_with_the_dense_solve(method, spec, ratio, seed):
    _check_dense_solve(method, spec, ratio, seed)


@pytest.mark.parametrize("method", [m for m in EXACT if not m.name.startswith("lissa")], ids=str)
@given(spec=problem_specs(), ratio=small_ratios, seed=seeds)
def test_agrees_with_the_dense_solve_at_small_damping(method, spec, ratio, seed):
    """λ down to 1e-3 λ_max (LiSSA's steps grow like λ_max / λ: its small damping is tests/test_lissa.py's)."""
    _check_dense_solve(method, spec, ratio, seed, per_condition=not method.free_redamping)


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


@pytest.mark.parametrize("method", [m for m in METHODS if m.free_redamping], ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_with_damping_reuses_the_factorisation(method, spec, ratio, seed):
    """``with_damping`` and the calls evaluate the loss no more; each re-damped closure equals a fresh build."""
    problem = method.problem(spec)
    lam = _damping(problem, ratio)
    calls = []
    loss = problem.loss
    counted = ifunc.output_loss(
        lambda p, b: (calls.append(1), loss.outputs(p, b))[1], loss.loss_on_outputs, likelihood=loss.likelihood
    )
    ihvp = method.build(problem._replace(loss=counted), lam)
    built = len(calls)
    V = _vectors(problem, 2, seed)
    swept = {c: ihvp.with_damping(c * lam)(V) for c in (0.5, 1.0, 3.0)}
    assert len(calls) == built, f"{len(calls) - built} loss evaluations after the build"
    assert rel_error(swept[1.0], ihvp(V)) < 1e-12
    for c, X in swept.items():
        assert rel_error(X, method.build(problem, c * lam)(V)) < 1e-9


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds, c=st.sampled_from([0.25, 0.5, 2.0, 4.0]))
def test_scaling_the_loss_divides_the_result(method, spec, ratio, seed, c):
    """Loss × c scales the curvature by ``k = c^degree``; at λ × k the result is the original one divided by k.

    ``c`` is a power of two, so every product scales without rounding: a low-rank row whose top eigenvalues
    are tied (one example) keeps the same eigenvectors, which another ``c`` could swap by rounding.
    """
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=2)
    k = c**method.degree
    X = method.build(scaled(problem, c), k * lam)(V)
    assert rel_error(k * X, ihvp(V)) < method.rtol


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_float32_vectors_under_no_grad(method, spec, ratio, seed):
    """A float64 closure called under ``torch.no_grad()`` with float32 vectors returns float32 (no grad needed)."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed, k=2)
    with torch.no_grad():
        X32 = ihvp(V.float())
    assert X32.dtype == torch.float32 and X32.shape == V.shape
    assert rel_error(X32.double(), ihvp(V)) < max(1e-5, method.tol or 0.0)


# ---------------------------------------------------------------- block-diagonal modes (rows taking blocks=)


@pytest.mark.parametrize("method", [m for m in METHODS if "blocks" in m.options], ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_records_the_block_of_every_parameter(method, spec, ratio, seed):
    """``info["blocks"]``: parameter -> (method, block), the block ``"full"``, the module, or the mapping's
    group; a rank-r row keeps r eigenpairs in each block."""
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed)
    group = group_of(method.options["blocks"])
    assert {n: b for n, (_, b) in ihvp.info["blocks"].items()} == {n: str(group(n)) for n in problem.params}
    if "rank" in method.options:
        n_blocks = len({group(n) for n in problem.params})
        assert ihvp.info["eigenvalues"].numel() == method.options["rank"] * n_blocks


@pytest.mark.parametrize("method", FULL_BLOCKS, ids=str)
@given(spec=problem_specs(), ratio=ratios, seed=seeds)
def test_one_block_of_every_parameter_equals_full(method, spec, ratio, seed):
    problem, lam, ihvp, V = _setup(method, spec, ratio, seed)
    one = method.build(problem, lam, blocks=lambda name: "everything")
    assert {b for _, b in one.info["blocks"].values()} == {"everything"}
    assert rel_error(one(V), ihvp(V)) < method.rtol


@pytest.mark.parametrize("method", FULL_BLOCKS, ids=str)
def test_a_blocks_mapping_names_every_parameter_and_only_parameters(method):
    problem = method.problem({"seed": 0, "sizes": (2, 3, 2), "n": 4, "activation": torch.nn.Tanh, "task": "regression"})
    everything = {name: 0 for name in problem.params}
    with pytest.raises(ValueError, match=r"missing \['2.bias', '2.weight'\]"):
        method.build(problem, None, blocks={"0.bias": 0, "0.weight": 0})
    with pytest.raises(ValueError, match=r"unknown \['fc9.weight'\]"):
        method.build(problem, None, blocks={**everything, "fc9.weight": 1})
    with pytest.raises(ValueError, match='"full", "layer"'):
        method.build(problem, None, blocks="module")
    with pytest.raises(TypeError, match="mapping"):
        method.build(problem, None, blocks=3)


def test_nested_parameter_names_and_their_layers():
    """A nested pytree's parameters are named by their dotted paths; ``"layer"`` groups by the path's prefix."""
    params = {"enc": {"w": torch.tensor([0.5, -1.0])}, "head": torch.tensor([2.0])}
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    loss = lambda p, b: ((b @ p["enc"]["w"]) * p["head"]).square().sum()  # noqa: E731
    ihvp = ifunc.ihvp_explicit(loss, params, x, damping=1.0, blocks="layer")
    assert ihvp.info["blocks"] == {"enc.w": ("explicit", "enc"), "head": ("explicit", "")}


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
    assert nystrom.tol is not None
    V = _vectors(problem, 3, 0)
    A = ggn(problem) + torch.eye(dim(problem))
    assert rel_error(nystrom.build(problem, 1.0)(V), torch.linalg.solve(A, V.T).T) < nystrom.tol
