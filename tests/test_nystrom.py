"""Nyström sketch: exact at full rank, error shrinking with rank, PSD checks, free re-damping."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.testing import mlp_problem, random_spd, rel_error

from .strategies import dampings, mlp_problems


@given(problem=mlp_problems(), lam=dampings, seed=st.integers(0, 1000))
def test_full_rank_matches_explicit(problem, lam, seed):
    _, params, loss, data = problem
    d = ifunc.flatten(params)[0].numel()
    V = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    exact = ifunc.ihvp_explicit(loss, params, data, damping=lam)(V)
    ihvp = ifunc.ihvp_nystrom(loss, params, data, rank=d, damping=lam, generator=torch.Generator().manual_seed(seed))
    assert rel_error(ihvp(V), exact) < 1e-8


@given(d=st.integers(6, 30), seed=st.integers(0, 10_000), decay=st.floats(1.5, 4.0))
def test_sketch_error_decreases_with_rank(d, seed, decay):
    """‖H − Ĥ_r‖ is non-increasing in r for nested sketches (same Ω columns) and 0 at r = d."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    w = torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    H = (Q * w) @ Q.T
    errors = []
    for r in range(1, d + 1):
        U, lam = ifunc.nystrom_sketch(lambda V: V @ H, d, r, generator=torch.Generator().manual_seed(seed))
        errors.append(float(torch.linalg.matrix_norm(H - (U * lam) @ U.T, ord=2)))
    # nested column spaces (a QR of a prefix of the same Gaussian columns): the Nyström error shrinks
    assert all(b <= a * (1 + 1e-6) + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10 * float(w[0])


def test_ihvp_error_decreases_with_rank_on_a_model():
    _, params, loss, data = mlp_problem(seed=2, sizes=(3, 5, 3), n=10)
    d = ifunc.flatten(params)[0].numel()
    V = torch.randn(4, d, generator=torch.Generator().manual_seed(1))
    exact = ifunc.ihvp_explicit(loss, params, data, damping=0.05)(V)
    errors = [rel_error(ifunc.ihvp_nystrom(loss, params, data, rank=r, damping=0.05)(V), exact) for r in (2, 8, 16, d)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-8


def test_with_damping_is_free_and_exact():
    _, params, loss, data = mlp_problem(seed=3, sizes=(2, 3, 2), n=6)
    d = ifunc.flatten(params)[0].numel()
    calls = []
    counted = ifunc.output_loss(lambda p, b: (calls.append(1), loss.outputs(p, b))[1], loss.loss_on_outputs)
    ihvp = ifunc.ihvp_nystrom(counted, params, data, rank=d, damping=0.3)
    before = len(calls)
    other = ihvp.with_damping(0.7)
    assert len(calls) == before and other.damping == 0.7
    G = ifunc.ggn(loss, params, data)
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(other(v), torch.linalg.solve(G + 0.7 * torch.eye(d), v))


def test_deterministic_for_a_generator_and_global_rng_untouched():
    _, params, loss, data = mlp_problem(seed=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ifunc.ihvp_nystrom(loss, params, data, rank=4, damping=0.1, generator=torch.Generator().manual_seed(5))
    b = ifunc.ihvp_nystrom(loss, params, data, rank=4, damping=0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    v = torch.ones(a.dim)
    torch.testing.assert_close(a(v), b(v), rtol=0, atol=0)


def test_errors_name_the_problem():
    _, params, loss, data = mlp_problem(seed=5)
    d = ifunc.flatten(params)[0].numel()
    with pytest.raises(ValueError, match="rank must be"):
        ifunc.ihvp_nystrom(loss, params, data, rank=0, damping=0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        ifunc.ihvp_nystrom(loss, params, data, rank=2, damping=0.0)
    A = -random_spd(d, seed=1)  # negative definite: no Nyström approximation
    with pytest.raises(ValueError, match="positive semi-definite"):
        ifunc.nystrom_sketch(lambda V: V @ A, d, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "rank, error, pattern",
    [
        (True, TypeError, "rank must be an int >= 1, got the bool True"),
        (2.0, TypeError, r"rank must be an int >= 1, got 2\.0 \(float\)"),
        (0, ValueError, "rank must be an int >= 1, got 0"),
        (-3, ValueError, "rank must be an int >= 1, got -3"),
    ],
)
def test_rank_must_be_a_positive_int_in_every_nystrom_entry_point(rank, error, pattern):
    """``True`` is an int in Python: without the check ``rank=True`` failed inside ``torch.eye``."""
    _, params, loss, data = mlp_problem(seed=5)
    op = ifunc.curvature_operator(loss, params, data)
    d = op.flat_params.numel()
    with pytest.raises(error, match=f"ihvp_nystrom: {pattern}"):
        ifunc.ihvp_nystrom(loss, params, data, rank=rank, damping=0.1)
    with pytest.raises((TypeError, ValueError), match="nystrom_preconditioner: rank must be an int"):
        ifunc.nystrom_preconditioner(op, rank=rank, damping=0.1)  # its own range check comes first
    with pytest.raises(error, match=pattern):
        ifunc.nystrom_sketch(op.matvec, d, rank, generator=torch.Generator().manual_seed(0))


def test_a_numpy_integer_rank_is_accepted():
    np = pytest.importorskip("numpy")
    _, params, loss, data = mlp_problem(seed=5)
    a = ifunc.ihvp_nystrom(loss, params, data, rank=np.int64(3), damping=0.1)
    b = ifunc.ihvp_nystrom(loss, params, data, rank=3, damping=0.1)
    v = torch.ones(a.dim)
    torch.testing.assert_close(a(v), b(v), rtol=0, atol=0)
