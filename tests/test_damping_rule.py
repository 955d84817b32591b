"""One rule for the default damping: ``damping=None`` is ``λ = 0.1 × the mean eigenvalue`` of the curvature.

Every row of the method table (``tests/methods.py``) is built with ``damping=None``: the non-Kronecker rows
record one number ``ihvp.damping = 0.1 · tr(C) / d`` (exact where the method has the eigenvalues or the
gradients, a Hutchinson estimate within its standard error elsewhere) and ``info["damping_rule"]``; the
Kronecker family applies the same rule to each block it inverts. Defaults of different methods then compare at
the same λ. One conditioning check refuses or warns about the damped inverse for every eigen-factorised method.
"""

import pytest
import torch

import ifunc
from ifunc.ihvp._damping import DAMPING_FACTOR, DAMPING_RULE, PROBES, block_damping, check_conditioning
from ifunc.testing import mlp_problem

from .methods import METHODS, Method, dim, ggn, make_problem

# d = 31 > PROBES, so the Hutchinson rows estimate (they would be exact at d <= PROBES)
SPEC = {"seed": 3, "sizes": (3, 4, 3), "n": 12, "activation": torch.nn.Tanh, "task": "classification"}


def _rule(C: torch.Tensor) -> float:
    return 0.1 * float(C.trace()) / C.shape[0]


def _hutchinson_error(C: torch.Tensor, probes: int = PROBES) -> float:
    """One standard deviation of the relative error of the Rademacher estimate of ``tr(C)``."""
    off = C - torch.diag(C.diagonal())
    return float((2 * off.square().sum() / probes).sqrt()) / float(C.trace())


@pytest.mark.parametrize("method", [m for m in METHODS if m.rule_curvature is not None], ids=str)
def test_default_is_one_number_at_a_tenth_of_the_mean_eigenvalue(method: Method):
    problem = method.problem(SPEC)
    ihvp = method.build(problem, None)
    assert type(ihvp.damping) is float and ihvp.damping > 0
    assert ihvp.info["damping_rule"] == DAMPING_RULE
    assert repr(ihvp).endswith(f"damping={ihvp.damping:g})")
    assert method.rule_curvature is not None
    C = method.rule_curvature(problem)
    expected = _rule(C)
    assert ihvp.info["damping_trace"] == pytest.approx(10 * ihvp.damping * dim(problem), rel=1e-12)
    if method.rule_exact:
        assert ihvp.info["damping_estimator"] == "exact"
        assert ihvp.damping == pytest.approx(expected, rel=1e-8)
    else:
        assert abs(ihvp.damping / expected - 1) < 4 * _hutchinson_error(C)
    # the closure is the damped solve at that λ
    V = torch.randn(2, dim(problem), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ihvp(V), method.build(problem, ihvp.damping)(V), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", [m for m in METHODS if m.rule_curvature is None], ids=str)
def test_kronecker_family_keeps_its_per_block_rule(method: Method):
    ihvp = method.build(method.problem(SPEC), None)
    if method.name == "identity":  # no curvature: λ = 1, plain gradient dot products
        assert ihvp.damping == 1.0
    else:
        assert isinstance(ihvp.damping, dict) and all(lam > 0 for lam in ihvp.damping.values())


def test_explicit_cg_and_full_rank_arnoldi_agree_on_the_default():
    """Same problem, defaults: λ within a few % of each other and of ``0.1 · tr(H) / d`` computed densely."""
    problem = make_problem(seed=0, sizes=(4, 6, 3), n=40, activation=torch.nn.Tanh, task="classification")
    d = dim(problem)
    assert d > PROBES  # CG estimates
    exact = _rule(ggn(problem))
    explicit = ifunc.ihvp_explicit(problem.loss, problem.params, problem.data)
    cg = ifunc.ihvp_cg(problem.loss, problem.params, problem.data)
    arnoldi = ifunc.ihvp_arnoldi(problem.loss, problem.params, problem.data, rank=d)
    assert cg.info["damping_estimator"] == f"hutchinson ({PROBES} probes)"
    assert explicit.damping == pytest.approx(exact, rel=1e-10)
    assert arnoldi.damping == pytest.approx(exact, rel=1e-8)
    assert cg.damping == pytest.approx(exact, rel=0.05)


def test_block_modes_resolve_the_same_number_as_the_full_curvature():
    """The block diagonal keeps the trace of ``H``: ``blocks="layer"`` gives the full-curvature λ."""
    p = make_problem(**SPEC)
    full = ifunc.ihvp_explicit(p.loss, p.params, p.data)
    layer = ifunc.ihvp_explicit(p.loss, p.params, p.data, blocks="layer")
    assert layer.damping == pytest.approx(full.damping, rel=1e-10)
    assert (
        ifunc.ihvp_cg(p.loss, p.params, p.data, blocks="layer").damping
        == ifunc.ihvp_cg(p.loss, p.params, p.data).damping
    )


def test_low_rank_methods_use_the_mean_of_all_eigenvalues_not_the_top_ones():
    p = make_problem(seed=0, sizes=(4, 6, 3), n=40, activation=torch.nn.Tanh, task="classification")
    w = torch.linalg.eigvalsh(ggn(p))
    arnoldi = ifunc.ihvp_arnoldi(p.loss, p.params, p.data, rank=3)
    nystrom = ifunc.ihvp_nystrom(p.loss, p.params, p.data, rank=3)
    for ihvp in (arnoldi, nystrom):
        assert ihvp.damping == pytest.approx(0.1 * float(w.mean()), rel=0.1)
        assert ihvp.damping < 0.5 * 0.1 * float(w[-3:].mean())


@pytest.mark.parametrize(
    "build",
    [
        lambda p, g: ifunc.ihvp_cg(p.loss, p.params, p.data, generator=g),
        lambda p, g: ifunc.ihvp_lissa(p.loss, p.params, p.data, depth=1, generator=g),
        lambda p, g: ifunc.ihvp_arnoldi(p.loss, p.params, p.data, rank=3, oversample=3, generator=g),
        lambda p, g: ifunc.ihvp_nystrom(p.loss, p.params, p.data, rank=3, generator=g),
    ],
    ids=["cg", "lissa", "arnoldi", "nystrom"],
)
def test_estimate_is_deterministic_and_leaves_the_global_rng_alone(build):
    p = make_problem(**SPEC)
    before = torch.get_rng_state()
    first = build(p, None).damping
    assert torch.equal(torch.get_rng_state(), before)
    assert build(p, None).damping == first
    # a given generator seeds the probes; the same seed gives the same λ
    assert build(p, torch.Generator().manual_seed(5)).damping == build(p, torch.Generator().manual_seed(5)).damping


def test_a_given_generator_is_not_advanced_by_the_estimate():
    p = make_problem(**SPEC)
    gen = torch.Generator().manual_seed(11)
    state = gen.get_state()
    ifunc.ihvp_cg(p.loss, p.params, p.data, generator=gen)
    assert torch.equal(gen.get_state(), state)


def test_explicit_damping_is_unchanged_and_redamping_drops_the_rule():
    p = make_problem(**SPEC)
    given = ifunc.ihvp_explicit(p.loss, p.params, p.data, damping=0.25)
    assert given.damping == 0.25 and "damping_rule" not in given.info
    auto = ifunc.ihvp_explicit(p.loss, p.params, p.data)
    again = auto.with_damping(0.25)
    assert again.damping == 0.25 and "damping_rule" not in again.info
    V = torch.randn(3, dim(p), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(again(V), given(V), rtol=1e-12, atol=0)


def _negative_problem(d: int = 30):
    """``loss = −½ Σ_i (x_iᵀ w)²``: Hessian ``−XᵀX / n``, negative definite (trace < 0)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, d, generator=gen)
    params = {"w": torch.randn(d, generator=gen)}
    return (lambda q, b: -0.5 * (b @ q["w"]).square().sum()), params, x


@pytest.mark.parametrize(
    "build",
    [
        lambda loss, p, x: ifunc.ihvp_explicit(loss, p, x),
        lambda loss, p, x: ifunc.ihvp_cg(loss, p, x),
        lambda loss, p, x: ifunc.ihvp_lissa(loss, p, x),
        lambda loss, p, x: ifunc.ihvp_arnoldi(loss, p, x, rank=3),
        lambda loss, p, x: ifunc.ihvp_from_matrix(-torch.eye(4), {"w": torch.zeros(4)}),
    ],
    ids=["explicit", "cg", "lissa", "arnoldi", "from_matrix"],
)
def test_a_non_positive_trace_asks_for_an_explicit_damping(build):
    loss, params, x = _negative_problem()
    with pytest.raises(ValueError, match=r"damping=None .* is not positive.*Pass damping= explicitly"):
        build(loss, params, x)


def test_datainf_with_zero_gradients_asks_for_an_explicit_damping():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    params = {"layer.w": torch.zeros(4)}  # at w = 0 every gradient 2 x (xᵀw) vanishes: tr(F) = 0
    loss = lambda q, b: (b @ q["layer.w"]).square().sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"ihvp_datainf: damping=None .* is not positive"):
        ifunc.ihvp_datainf(loss, params, x)


def test_the_per_block_mode_is_the_same_rule_on_the_block():
    values = torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert block_damping(values, None, "layer 'fc'", who="ekfac") == DAMPING_FACTOR * float(values.mean())
    assert block_damping(values, 0.5, "layer 'fc'", who="ekfac") == 0.5
    with pytest.raises(ValueError, match=r"ekfac: damping=None .* of layer 'fc', but .* not positive.*Pass damping="):
        block_damping(torch.zeros(3), None, "layer 'fc'", who="ekfac")


@pytest.mark.parametrize(
    "eigenvalues, damping, dtype, outcome",
    [
        ([-1.0, 2.0], 0.5, torch.float64, "not positive definite at damping 0.5.*raise damping above 1.000e\\+00"),
        ([0.0, 2.0], 0.0, torch.float64, "not positive definite at damping 0 .*use damping > 0"),
        ([1e-9, 1.0], 0.0, torch.float32, "numerically singular at damping 0.*use damping > 0"),
        ([1e-9, 1.0], 1e-9, torch.float32, "warn"),
        ([1e-9, 1.0], 1e-9, torch.float64, None),
        ([], 0.0, torch.float64, None),
    ],
)
def test_one_conditioning_check(eigenvalues, damping, dtype, outcome):
    """Raise when the damped inverse does not exist or is rounding noise, warn when the dtype loses it."""
    w = torch.tensor(eigenvalues, dtype=torch.float64)
    check = lambda: check_conditioning(w, damping, dtype, who="m", what="the block")  # noqa: E731
    if outcome == "warn":
        with pytest.warns(UserWarning, match=rf"m: the block has damped condition number .* beyond what {dtype}"):
            check()
    elif outcome is not None:
        with pytest.raises(ValueError, match="m: the block .*" + outcome):
            check()
    else:
        check()


def test_explicit_and_kronecker_blocks_share_the_check():
    """The same zero eigenvalue at damping 0 is refused in the same words by both families."""
    model, params, _, _ = mlp_problem(seed=0, sizes=(2, 2), n=1, task="regression")
    with pytest.raises(ValueError, match="ihvp_explicit: the curvature plus λI is not positive definite at damping 0"):
        ifunc.ihvp_from_matrix(torch.diag(torch.tensor([0.0, 1.0, 1.0, 2.0, 1.0, 1.0])), params, damping=0.0)
    with pytest.raises(ValueError, match="identity: the block of layer '0' plus λI is not positive definite"):
        ifunc.ihvp_identity(params, model=model, damping=1.0).with_damping(0.0)


def test_rounding_noise_below_zero_is_named_as_such_not_as_an_indefinite_curvature():
    eigenvalues = torch.tensor([-3e-8, 0.0, 1.0])  # a singular PSD curvature computed in float32
    with pytest.raises(ValueError, match="rounding noise of a singular curvature"):
        check_conditioning(eigenvalues, 0.0, torch.float32, who="t")
    with pytest.raises(ValueError, match=r"raise damping above 1\.000e-03"):
        check_conditioning(torch.tensor([-1e-3, 1.0], dtype=torch.float64), 0.0, torch.float64, who="t")
