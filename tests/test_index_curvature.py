"""Curvature in a gradient index's projected space: ``ihvp_projected(index)``, its scores and self-influence.

The exact case: with sizes at their caps the projection is a permutation ``Π`` of the parameters, so the closure
must be the layer-blockwise damped solve of the empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ``, built here densely in
parameter space (float64) and permuted: ``Πᵀ (F_bd + Λ)^{-1} Π`` with ``F_bd`` the blocks of ``F`` (one per layer,
one for the parameters no layer holds) and ``Λ`` each block's ``0.1 × mean eigenvalue``. The index stores float32, so
against exact gradients the tolerance is float32's (stated per test); against the stored rows it is float64's.
"""

from __future__ import annotations

import pytest
import torch

import ifunc
from ifunc.index import GradientIndex, ihvp_projected, project_flat, projected_blocks
from ifunc.testing import mlp_problem


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def problem(request):
    model, params, loss, (x, y) = mlp_problem(seed=5, sizes=(4, 6, 3), n=30, dtype=request.param)
    return model, params, loss, (x, y), (x[:4] + 0.1, y[:4])


def _exact_index(problem, tmp_path, with_model: bool, chunk_size: int = 7) -> GradientIndex:
    model, params, loss, train, _ = problem
    return ifunc.build_index(
        loss,
        params,
        train,
        tmp_path / f"exact-{with_model}-{chunk_size}.h5",
        model=model if with_model else None,
        layer_size=64,
        dense_size=10**6,
        chunk_size=chunk_size,
    )


def _reference(problem, index: GradientIndex):
    """``(Π [d, dim], M = Πᵀ (F_bd + Λ) Π [dim, dim])`` in float64 from the exact per-example gradients."""
    _, params, loss, train, _ = problem
    G = ifunc.per_sample_grads(loss, params, train).double()  # [n, d]
    d = G.shape[1]
    Pi = project_flat(index.projection, torch.eye(d, dtype=torch.float64), params)  # identity projection: [d, dim]
    assert torch.equal(Pi.abs().sum(0), torch.ones(index.dim, dtype=torch.float64))  # a permutation
    F = G.T @ G / G.shape[0]
    owner = torch.empty(d, dtype=torch.long)  # the block of each parameter coordinate, through the permutation
    for b, (_, s) in enumerate(projected_blocks(index.projection)):
        owner[Pi[:, s].sum(1) > 0] = b
    same = owner[:, None] == owner[None, :]
    F_bd = torch.where(same, F, 0.0)
    lam = torch.stack([0.1 * F_bd[owner == b][:, owner == b].diagonal().mean() for b in owner.tolist()])
    return Pi, Pi.T @ (F_bd + torch.diag(lam)) @ Pi


@pytest.mark.parametrize("with_model", [True, False], ids=["layers", "dense"])
def test_an_uncompressed_index_gives_the_blockwise_solve_of_the_empirical_fisher(problem, tmp_path, with_model):
    index = _exact_index(problem, tmp_path, with_model)
    ihvp = ihvp_projected(index)
    assert ihvp.dim == index.dim and set(ihvp.info["damping"]) == {n for n, _ in projected_blocks(index.projection)}
    _, M = _reference(problem, index)
    V = torch.randn(5, index.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.linalg.solve(M, V.T).T
    # float32 rows (and float32 gradients for the f32 problem): 1e-6 of the largest entry, measured at most 3.3e-8
    torch.testing.assert_close(ihvp(V), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(torch.stack([ihvp(v) for v in V]), ihvp(V), rtol=1e-12, atol=0)

    rows = index.matrix().double()  # the same solve from the stored rows themselves: float64 rounding only
    F = rows.T @ rows / index.n
    mask = torch.zeros_like(F, dtype=torch.bool)
    for name, s in projected_blocks(index.projection):
        mask[s, s] = True
        F[s, s] += torch.eye(s.stop - s.start, dtype=torch.float64) * ihvp.info["damping"][name]
    exact_rows = torch.linalg.solve(torch.where(mask, F, 0.0), V.T).T
    torch.testing.assert_close(ihvp(V), exact_rows, rtol=1e-10, atol=1e-10 * float(exact_rows.abs().max()))


@pytest.mark.parametrize("with_model", [True, False], ids=["layers", "dense"])
def test_scores_and_self_influence_from_the_index_equal_the_dense_reference(problem, tmp_path, with_model):
    _, params, loss, train, query = problem
    index = _exact_index(problem, tmp_path, with_model)
    ihvp = ihvp_projected(index)
    Pi, M = _reference(problem, index)
    G = ifunc.per_sample_grads(loss, params, train).double() @ Pi  # [n, dim]
    Q = ifunc.per_sample_grads(loss, params, query).double() @ Pi  # the RAW query gradients, projected
    scores = ifunc.attribute(loss, params, ihvp, index, query)
    expected = Q @ torch.linalg.solve(M, G.T)
    assert scores.dtype == params["0.weight"].dtype and scores.shape == (4, index.n)
    # 1e-6 of the largest score in both dtypes (the rows are float32 in both), measured at most 1.1e-7
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))

    s = ifunc.self_influence(loss, params, ihvp, index)
    s_expected = (G * torch.linalg.solve(M, G.T).T).sum(1)
    assert s.shape == (index.n,) and s.dtype == params["0.weight"].dtype and bool((s > 0).all())
    torch.testing.assert_close(s.double(), s_expected, rtol=1e-6, atol=0)  # measured at most 6.1e-8 relative


def test_fitting_reads_one_chunk_at_a_time_and_does_not_depend_on_the_chunking(problem, tmp_path, monkeypatch):
    _, params, loss, _, query = problem
    small, whole = _exact_index(problem, tmp_path, True, chunk_size=7), _exact_index(problem, tmp_path, True, 30)
    read = []
    chunks = GradientIndex.chunks

    def counted(self):
        for offset, rows in chunks(self):
            read.append(len(rows))
            yield offset, rows

    monkeypatch.setattr(GradientIndex, "chunks", counted)
    a = ihvp_projected(small)
    assert read == [7, 7, 7, 7, 2]  # every stored chunk once, none held together
    b = ihvp_projected(whole)
    for name, _ in projected_blocks(small.projection):
        torch.testing.assert_close(a.info[f"eigenvalues {name}"], b.info[f"eigenvalues {name}"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        ifunc.self_influence(loss, params, a, small), ifunc.self_influence(loss, params, b, whole), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        ifunc.attribute(loss, params, a, small, query, chunk_size=4),
        ifunc.attribute(loss, params, b, whole, query),
        rtol=1e-5,
        atol=1e-6,
    )
    # the raw query gradients are projected a few queries at a time: one query at a time gives the same scores
    one_by_one, together = (ifunc.attribute(loss, params, a, small, query, chunk_size=c) for c in (1, None))
    tol = 1e-12 if query[0].dtype == torch.float64 else 1e-5
    torch.testing.assert_close(one_by_one, together, rtol=tol, atol=tol * float(together.abs().max()))


def test_damping_follows_the_kronecker_rule_and_rebuilds_without_refitting(problem, tmp_path):
    index = _exact_index(problem, tmp_path, True)
    rule, fixed = ihvp_projected(index), ihvp_projected(index, damping=0.3)
    for name, _ in projected_blocks(index.projection):
        assert rule.info["damping"][name] == pytest.approx(
            0.1 * float(rule.info[f"eigenvalues {name}"].mean()), rel=1e-12
        )
    assert fixed.damping == 0.3 and fixed.describe()["damping"] == {n: 0.3 for n in rule.info["damping"]}
    V = torch.randn(3, index.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(rule.with_damping(0.3)(V), fixed(V))  # the same eigendecomposition, re-damped
    single = ihvp_projected(index, dtype=torch.float32)  # solves in float32, returns the input's dtype
    assert single(V).dtype == torch.float64 and single.dtype == torch.float32
    torch.testing.assert_close(single(V), rule(V), rtol=1e-4, atol=1e-4 * float(rule(V).abs().max()))


def test_bad_inputs_are_refused_by_name(problem, tmp_path, monkeypatch):
    model, params, loss, train, query = problem
    index = _exact_index(problem, tmp_path, False)  # one dense block of 51 coordinates from 30 examples
    ihvp = ihvp_projected(index)
    with pytest.raises(TypeError, match="projected coordinates of a gradient index"):
        ifunc.attribute(loss, params, ihvp, train, query)
    with pytest.raises(TypeError, match="projected coordinates of a gradient index"):
        ifunc.self_influence(loss, params, ihvp, train)
    other = ifunc.build_index(loss, params, train, tmp_path / "other.h5", model=model, layer_size=2)
    with pytest.raises(ValueError, match="another gradient index"):
        ifunc.attribute(loss, params, ihvp, other, query)
    with pytest.raises(ValueError, match="another gradient index"):
        ifunc.self_influence(loss, params, ihvp, other)
    moved = {k: v + 0.01 for k, v in params.items()}  # the same projection, an index at other parameters
    at_moved = ifunc.build_index(loss, moved, train, tmp_path / "moved.h5", layer_size=64, dense_size=10**6)
    with pytest.raises(ValueError, match="other parameters"):
        ifunc.attribute(loss, moved, ihvp, at_moved, query)
    monkeypatch.setattr("ifunc.index.curvature.MAX_BLOCK", 40)  # the dense block has 51 coordinates
    with pytest.raises(ValueError, match="51 projected coordinates.*smaller layer_size"):
        ihvp_projected(index)
    monkeypatch.undo()
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        ihvp_projected(index, dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="whole queries"):
        ifunc.attribute(loss, params, ihvp, index, query, per_module=True)
    with pytest.raises(NotImplementedError, match="ihvp_projected"):  # a parameter-space closure: no self-influence
        ifunc.self_influence(loss, params, ifunc.ihvp_explicit(loss, params, train, damping=0.1), index)
    with pytest.raises(TypeError, match="from a gradient index"):
        ihvp_projected(train)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        ihvp_projected(index, damping=-1.0)
    with pytest.raises(TypeError, match="damping must be a number"):
        ihvp_projected(index, damping="small")
    with pytest.raises(ValueError, match="damping 0"):  # rank 30 < 51 coordinates: singular without damping
        ihvp_projected(index, damping=0.0)


def test_a_compressed_index_query_writes_a_resumable_store_that_records_the_curvature(problem, tmp_path):
    model, params, loss, train, query = problem
    index = ifunc.build_index(loss, params, train, tmp_path / "i.h5", model=model, layer_size=2, chunk_size=8)
    ihvp = ihvp_projected(index)
    in_memory = ifunc.attribute(loss, params, ihvp, index, query)
    rows = index.matrix().double()
    Q = project_flat(index.projection, ifunc.per_sample_grads(loss, params, query).double(), params)
    expected = ihvp(Q) @ rows.T  # raw queries projected, then the projected closure, then the rows
    torch.testing.assert_close(in_memory.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    path = ifunc.attribute(loss, params, ihvp, index, query, out=tmp_path / "s.h5")
    stored = torch.as_tensor(ifunc.load_scores(path)).to(in_memory.dtype)
    torch.testing.assert_close(stored, in_memory, rtol=1e-5, atol=1e-6)
    assert ifunc.attribute(loss, params, ihvp, index, query, out=tmp_path / "s.h5") == path  # finished: a no-op
    with pytest.raises(ValueError, match="different run"):  # another damping is another curvature
        ifunc.attribute(loss, params, ihvp.with_damping(1.0), index, query, out=tmp_path / "s.h5")


@pytest.mark.parametrize("with_model", [True, False], ids=["layers", "dense"])
def test_queries_projected_through_the_model_give_the_same_scores(problem, tmp_path, with_model):
    model, params, loss, train, query = problem
    index = ifunc.build_index(
        loss, params, train, tmp_path / "i.h5", model=model if with_model else None, layer_size=3, dense_size=5
    )
    flat, captured = ihvp_projected(index), ihvp_projected(index, model=model)
    expected = ifunc.attribute(loss, params, flat, index, query)
    got = ifunc.attribute(loss, params, captured, index, query)
    tol = 1e-10 if query[0].dtype == torch.float64 else 1e-4  # the same projection, summed in another order
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    one_by_one = ifunc.attribute(loss, params, captured, index, query, chunk_size=1)
    torch.testing.assert_close(one_by_one, got, rtol=tol, atol=tol * float(got.abs().max()))
    if with_model:  # a model without the index's layers is refused by name
        other_model = mlp_problem(seed=5, sizes=(4, 7, 3), n=30, dtype=query[0].dtype)[0]  # 7 hidden units, not 6
        with pytest.raises(ValueError, match="does not hold the index's layers"):
            ifunc.attribute(loss, params, ihvp_projected(index, model=other_model), index, query)


def test_a_closure_with_a_model_checks_each_callable_once_and_keeps_the_same_scores(problem, tmp_path, monkeypatch):
    """The capture of ``model=`` and its probe of a callable are kept by the closure (and by ``with_damping``'s):
    a later query with that callable probes nothing and scores as the first; another callable is probed once."""
    from ifunc.ihvp.kronecker import capture, score

    model, params, loss, train, query = problem
    index = ifunc.build_index(loss, params, train, tmp_path / "i.h5", model=model, layer_size=3, dense_size=5)
    probes = []
    real = capture.probe_layers
    monkeypatch.setattr(score, "probe_layers", lambda *a, **k: probes.append(a[0]) or real(*a, **k))
    own = ihvp_projected(index, model=model)
    first = ifunc.attribute(loss, params, own, index, query)
    again = ifunc.attribute(loss, params, own, index, query)
    assert probes == [loss] and torch.equal(first, again)
    redamped = own.with_damping(0.5)
    ifunc.attribute(loss, params, redamped, index, query)
    assert probes == [loss]  # the re-damped closure shares what was checked

    def measurement(p, batch):
        return loss(p, batch)

    m1 = ifunc.attribute(loss, params, own, index, query, measurement=measurement)
    m2 = ifunc.attribute(loss, params, own, index, query, measurement=measurement)
    assert probes == [loss, measurement] and torch.equal(m1, m2)
    torch.testing.assert_close(m1, first, rtol=0, atol=0)  # the same function: the same projected queries
