"""ihvp_error: zero against itself, clearly non-zero for a poor approximation, Spearman as SciPy's."""

import pytest
import scipy.stats
import torch

import ifunc
from ifunc.quality import spearman
from ifunc.testing import mlp_problem


def _setup():
    _, params, loss, (x, y) = mlp_problem(seed=8, sizes=(3, 5, 3), n=16)
    exact = ifunc.ihvp_explicit(loss, params, (x[:12], y[:12]), damping=0.01)
    Q = ifunc.per_sample_grads(loss, params, (x[12:], y[12:]))
    T = ifunc.per_sample_grads(loss, params, (x[:12], y[:12]))
    return params, loss, (x[:12], y[:12]), exact, Q, T


def test_reference_against_itself_reports_zero():
    _, _, _, exact, Q, T = _setup()
    report = ifunc.ihvp_error(exact, exact, probes=5, queries=Q, train=T)
    assert report.probe_error == 0 and report.probe_error_max == 0 and report.query_error == 0
    assert report.score_cosine == pytest.approx(1.0) and report.score_spearman == pytest.approx(1.0)


def test_identity_against_explicit_reports_clearly_non_zero():
    params, _, _, exact, Q, T = _setup()
    d = exact.dim
    identity = ifunc.ihvp_from_matrix(torch.zeros(d, d), params, damping=1.0)  # v -> v
    report = ifunc.ihvp_error(identity, exact, probes=5, queries=Q, train=T)
    assert report.probe_error > 0.5 and report.probe_error_max >= report.probe_error
    assert report.query_error > 0.5
    assert report.score_cosine < 0.99 and report.score_spearman < 0.99


def test_better_approximations_report_smaller_errors():
    params, loss, data, exact, Q, T = _setup()
    d = exact.dim
    errors = [
        ifunc.ihvp_error(ifunc.ihvp_nystrom(loss, params, data, rank=r, damping=0.01), exact, queries=Q, train=T)
        for r in (2, 10, d)
    ]
    assert errors[0].probe_error > errors[1].probe_error > errors[2].probe_error
    assert errors[2].probe_error < 1e-8 and errors[2].score_spearman == pytest.approx(1.0)
    # without train gradients the scores are query x query; pytrees are accepted too
    low = ifunc.ihvp_nystrom(loss, params, data, rank=2, damping=0.01)
    by_tree = ifunc.ihvp_error(low, exact, queries=exact.unflatten(Q))
    by_flat = ifunc.ihvp_error(low, exact, queries=Q)
    assert by_tree.query_error == pytest.approx(errors[0].query_error)
    assert by_tree.score_cosine == pytest.approx(by_flat.score_cosine)
    assert by_tree.score_spearman == pytest.approx(by_flat.score_spearman)
    assert 0 < by_tree.score_cosine < 1


def test_probes_are_deterministic_for_a_generator():
    params, loss, data, exact, _, _ = _setup()
    approx = ifunc.ihvp_nystrom(loss, params, data, rank=3, damping=0.01)
    a = ifunc.ihvp_error(approx, exact, generator=torch.Generator().manual_seed(3))
    b = ifunc.ihvp_error(approx, exact, generator=torch.Generator().manual_seed(3))
    assert a == b and a.query_error is None and a.score_spearman is None


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 30), generator=gen).double()
    b = a + torch.randn(4, 30, generator=gen)
    ours = spearman(a, b)
    for q in range(4):
        assert float(ours[q]) == pytest.approx(scipy.stats.spearmanr(a[q].numpy(), b[q].numpy()).statistic)


def test_errors():
    params, _, _, exact, Q, T = _setup()
    with pytest.raises(ValueError, match="probes must be"):
        ifunc.ihvp_error(exact, exact, probes=0)
    with pytest.raises(ValueError, match="queries"):
        ifunc.ihvp_error(exact, exact, train=T)
    with pytest.raises(ValueError, match=r"\[m, d="):
        ifunc.ihvp_error(exact, exact, queries=Q[:, :3])
    other = ifunc.ihvp_from_matrix(torch.eye(2), torch.zeros(2), damping=1.0)
    with pytest.raises(ValueError, match="same parameters"):
        ifunc.ihvp_error(exact, other)
