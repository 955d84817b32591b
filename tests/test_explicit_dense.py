"""The dense solve of ``ihvp_explicit``: the matrix from Jacobians / gradients equals the one from curvature products,
and the Cholesky solve equals the eigendecomposition's, with the same errors and warnings."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc._data import DataSource
from ifunc.ihvp._blocks import resolve_blocks
from ifunc.ihvp._dense import dense_curvature, symmetric_product
from ifunc.ihvp._dense_solve import EIGH_AFTER, DenseSolver, _lowest_estimate
from ifunc.testing import mlp_problem, random_spd


def _matrices(loss, params, data, curvature, way, blocks="full"):
    op = ifunc.curvature_operator(loss, params, data, curvature=curvature, generator=torch.Generator().manual_seed(3))
    groups = resolve_blocks(blocks, op.unflatten)
    source = DataSource(data, ordered=curvature == "fisher")
    mats, used, _ = dense_curvature(loss, op, source, groups, generator=torch.Generator().manual_seed(3), way=way)
    assert used == way
    return mats


def _sequence_problem(dtype=torch.float64):
    """Outputs ``[b, T, V]``, cross-entropy summed over examples and positions (a GGN block-diagonal over T)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(6, 2, 3, generator=gen, dtype=dtype)  # 6 sequences of 2 positions
    y = torch.randint(0, 5, (6, 2), generator=gen)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]),
        lambda out, b: F.cross_entropy(out.reshape(-1, 5), b[1].reshape(-1), reduction="sum"),
    )
    return ifunc.params_of(model), loss, (x, y)


def _close(a, b, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", ["full", "layer"])
@pytest.mark.parametrize(
    "curvature, way", [("ggn", "jacobians"), ("empirical_fisher", "gradients"), ("fisher", "gradients")]
)
def test_jacobians_and_gradients_form_the_matrix_of_the_curvature_products(dtype, blocks, curvature, way):
    _, params, loss, data = mlp_problem(seed=1, sizes=(3, 4, 3), n=9, dtype=dtype)
    loss = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical")
    fast = _matrices(loss, params, [data, data], curvature, way, blocks)  # two batches: averaged, not inverted
    slow = _matrices(loss, params, [data, data], curvature, "products", blocks)
    assert len(fast) == (1 if blocks == "full" else 2)
    for a, b in zip(fast, slow):
        assert a.dtype == torch.float64 and torch.equal(a, a.T)
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_example_and_sequence_outputs(dtype):
    _, params, loss, (x, y) = mlp_problem(seed=2, sizes=(3, 4, 3), n=5, dtype=dtype)
    one = (x[:1], y[:1])
    _close(
        _matrices(loss, params, one, "ggn", "jacobians")[0], _matrices(loss, params, one, "ggn", "products")[0], dtype
    )
    params, loss, data = _sequence_problem(dtype)
    seq = _matrices(loss, params, data, "ggn", "jacobians")[0]
    _close(seq, _matrices(loss, params, data, "ggn", "products")[0], dtype)
    _close(seq, ifunc.ggn(loss, params, data).to(torch.float64), dtype)


def test_the_fastest_exact_way_is_chosen_and_gives_the_dense_reference():
    _, params, loss, data = mlp_problem(seed=3, sizes=(3, 4, 2), n=8)
    op = ifunc.curvature_operator(loss, params, data)
    groups = resolve_blocks("full", op.unflatten)
    for curvature, way in [("ggn", "jacobians"), ("empirical_fisher", "gradients"), ("hessian", "products")]:
        op = ifunc.curvature_operator(loss, params, data, curvature=curvature)
        mats, used, psd = dense_curvature(loss, op, DataSource(data), groups)
        assert used == way and psd == (curvature != "hessian")
    plain = lambda p, b: loss(p, b)  # noqa: E731  (no output split: the GGN is not available, the Hessian is)
    op = ifunc.curvature_operator(plain, params, data)
    assert dense_curvature(plain, op, DataSource(data), groups)[1] == "products"
    with pytest.raises(ValueError, match="does not form the 'hessian' curvature"):
        dense_curvature(plain, op, DataSource(data), groups, way="jacobians")


def test_a_dataloader_gives_the_same_closure_as_one_batch():
    _, params, loss, (x, y) = mlp_problem(seed=4, sizes=(3, 4, 3), n=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    V = torch.randn(4, ifunc.flatten(params)[0].numel())
    G = ifunc.ggn(loss, params, (x, y))
    expected = torch.linalg.solve(G + 0.1 * torch.eye(G.shape[0]), V.T).T
    for data in [(x, y), loader, TensorDataset(x, y)]:
        torch.testing.assert_close(ifunc.ihvp_explicit(loss, params, data, damping=0.1)(V), expected)


def test_symmetric_panels_equal_the_full_product():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 11, generator=gen)
    W = torch.randn(20, 20, generator=gen)
    B = (W + W.T) @ A  # Aᵀ B symmetric
    out = torch.zeros(11, 11)
    symmetric_product(A, B, out, panel=3)
    torch.testing.assert_close(out, A.T @ B)
    assert torch.equal(out, out.T)


def test_cholesky_and_eigendecomposition_give_the_same_solves_across_dampings():
    _, params, loss, data = mlp_problem(seed=5, sizes=(3, 5, 3), n=12)
    G = ifunc.ggn(loss, params, data)
    d = G.shape[0]
    V = torch.randn(3, d)
    ihvp = ifunc.ihvp_explicit(loss, params, data, damping=1e-2)
    for lam in [1e-2, 0.3, 2.0, 5.0]:  # the third damping switches to the eigendecomposition
        closure = ihvp if lam == 1e-2 else ihvp.with_damping(lam)
        torch.testing.assert_close(closure(V), torch.linalg.solve(G + lam * torch.eye(d), V.T).T)
    solver = DenseSolver([G.clone()], psd=True, dtype=torch.float64, who="t")
    cholesky = [solver.solves(lam)[0](V) for lam in [0.1, 0.2]]
    assert solver._eigh is None and solver.choleskys == EIGH_AFTER
    eigen = [solver.solves(lam)[0](V) for lam in [0.1, 0.2]]
    assert solver._eigh is not None
    for a, b in zip(cholesky, eigen):
        torch.testing.assert_close(a, b)


def test_eigenvalues_are_computed_when_read_and_are_those_of_the_curvature():
    _, params, loss, data = mlp_problem(seed=6, sizes=(3, 4, 2), n=7)
    ihvp = ifunc.ihvp_explicit(loss, params, data, damping=0.1, blocks="layer")
    assert "eigenvalues" in ihvp.info and "eigenvalues" in repr(ihvp.info)  # listed, not yet computed
    G = ifunc.ggn(loss, params, data)
    groups = resolve_blocks("layer", ihvp.unflatten)
    expected = torch.cat([torch.linalg.eigvalsh(G[b.index][:, b.index]) for b in groups])
    torch.testing.assert_close(ihvp.info["eigenvalues"], expected)
    assert ihvp.describe()["curvature"]["info eigenvalues"][0] == G.shape[0]


def test_the_rule_uses_the_exact_trace():
    _, params, loss, data = mlp_problem(seed=7, sizes=(3, 4, 2), n=7)
    ihvp = ifunc.ihvp_explicit(loss, params, data)
    G = ifunc.ggn(loss, params, data)
    assert ihvp.damping == pytest.approx(0.1 * float(G.trace()) / G.shape[0], rel=1e-12)
    assert ihvp.info["damping_estimator"] == "exact"


def test_a_singular_curvature_at_damping_zero_is_refused_by_name():
    _, params, loss, (x, y) = mlp_problem(seed=8, sizes=(3, 4, 3), n=1)  # one example: rank <= 2 of d = 31
    with pytest.raises(ValueError, match="ihvp_explicit: the curvature (is numerically singular|plus λI is not pos)"):
        ifunc.ihvp_explicit(loss, params, (x, y), damping=0.0)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    nearly = Q @ torch.diag(torch.tensor([1e-18, 1e-3, 1.0, 1.0, 2.0, 3.0])) @ Q.T  # Cholesky may well succeed
    with pytest.raises(ValueError, match="ihvp_explicit: the curvature (is numerically singular|plus λI is not pos)"):
        ifunc.ihvp_from_matrix(nearly, {"w": torch.zeros(6)}, damping=0.0)


@pytest.mark.parametrize("psd", [True, False])
def test_an_ill_conditioned_solve_warns_and_a_well_conditioned_one_does_not(psd):
    A = random_spd(8, cond=1e7, seed=2)
    V = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="damped condition number"):
        solve = DenseSolver([A], psd=psd, dtype=torch.float32, who="t").solves(1e-12)[0]
    torch.testing.assert_close(solve(V), torch.linalg.solve(A + 1e-12 * torch.eye(8), V.T).T, rtol=1e-6, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DenseSolver([random_spd(8, cond=1e3, seed=2)], psd=psd, dtype=torch.float32, who="t").solves(1e-3)
        DenseSolver([random_spd(8, cond=1e3, seed=2)], psd=psd, dtype=torch.float32, who="t").solves(0.0)


def test_an_indefinite_matrix_is_refused_with_the_eigenvalues():
    A = torch.diag(torch.tensor([-1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"not positive definite.*raise damping above 1\.000e\+00"):
        ifunc.ihvp_from_matrix(A, {"w": torch.zeros(3)}, damping=0.5)
    ok = ifunc.ihvp_from_matrix(A, {"w": torch.zeros(3)}, damping=1.5)
    torch.testing.assert_close(ok(torch.ones(3)), torch.tensor([2.0, 0.4, 1 / 3.5]))


@given(d=st.integers(1, 40), log_cond=st.floats(0, 8), seed=st.integers(0, 10**6))
def test_the_inverse_iteration_never_underestimates_the_smallest_eigenvalue(d, log_cond, seed):
    A = random_spd(d, cond=10**log_cond, seed=seed)
    low = float(torch.linalg.eigvalsh(A)[0])
    estimate = _lowest_estimate(torch.linalg.cholesky(A))
    assert low * (1 - 1e-9) <= estimate <= 10 * low


@given(
    d=st.integers(1, 8),
    log_cond=st.floats(0, 6),
    seed=st.integers(0, 10**6),
    dampings=st.lists(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]), min_size=1, max_size=4),
)
def test_from_matrix_agrees_with_a_dense_solve_at_every_damping(d, log_cond, seed, dampings):
    A = random_spd(d, cond=10**log_cond, seed=seed)
    V = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    ihvp = ifunc.ihvp_from_matrix(A, {"w": torch.zeros(d)}, damping=dampings[0])
    for lam in dampings:
        closure = ihvp.with_damping(lam)
        expected = torch.linalg.solve(A + lam * torch.eye(d), V.T).T
        torch.testing.assert_close(closure(V), expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_a_store_summary_of_a_psd_curvature_needs_no_eigendecomposition(monkeypatch):
    """``describe`` (a score store's metadata) summarises GGN/Fisher eigenvalues from the matrix: tr M, ‖M‖_F²."""
    _, params, loss, data = mlp_problem(seed=6, sizes=(3, 4, 2), n=7)
    for curvature in ("ggn", "empirical_fisher"):
        ihvp = ifunc.ihvp_explicit(loss, params, data, damping=0.1, curvature=curvature, blocks="layer")
        calls = []
        eigvalsh = torch.linalg.eigvalsh
        monkeypatch.setattr(torch.linalg, "eigvalsh", lambda M: calls.append(1) or eigvalsh(M))
        described = ihvp.describe()
        assert calls == []  # the summary came from the matrices
        monkeypatch.undo()
        got = described["curvature"]["info eigenvalues"]
        w = ihvp.info["eigenvalues"]  # now computed: the summary is theirs, to rounding
        assert got[0] == w.numel()
        torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor([float(w.abs().sum()), float(w.square().sum())]))
        assert "eigenvalues" not in described["method_info"]
        assert ihvp.describe() == described  # the same metadata before and after the eigenvalues were computed


def test_an_indefinite_hessian_is_summarised_by_its_eigenvalues():
    _, params, loss, data = mlp_problem(seed=6, sizes=(3, 4, 2), n=7)
    ihvp = ifunc.ihvp_explicit(loss, params, data, damping=10.0, curvature="hessian")
    w = ihvp.info["eigenvalues"]
    assert bool((w < 0).any())  # Σ|w| is not the trace here
    got = ihvp.describe()["curvature"]["info eigenvalues"]
    assert got == [w.numel(), float(w.abs().sum()), float(w.square().sum())]


def test_a_float32_softmax_ggn_is_known_to_be_psd():
    """A softmax output Hessian is singular: its float32 rounding sits at -u·‖Λ‖, still PSD (no eigvalsh at build)."""
    _, params, loss, data = mlp_problem(seed=2, sizes=(5, 8, 6), n=30, dtype=torch.float32)
    op = ifunc.curvature_operator(loss, params, data, curvature="ggn")
    _, way, psd = dense_curvature(loss, op, DataSource(data), resolve_blocks("full", op.unflatten))
    assert way == "jacobians" and psd


def test_many_outputs_per_parameter_choose_the_columns():
    """``m`` outputs per example beyond ``d / 8``: the ``[m, m]`` Hessians and ``n m d²`` cost more than columns."""
    params, loss, data = _sequence_problem()  # m = 2 positions x 5 classes = 10 outputs, d = 41
    op = ifunc.curvature_operator(loss, params, data, curvature="ggn")
    groups = resolve_blocks("full", op.unflatten)
    assert dense_curvature(loss, op, DataSource(data), groups)[1] == "products"
    forced, way, _ = dense_curvature(loss, op, DataSource(data), groups, way="jacobians")  # still possible, asked
    assert way == "jacobians"
    _close(forced[0], dense_curvature(loss, op, DataSource(data), groups)[0][0], torch.float64)
