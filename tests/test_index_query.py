"""Queries against a gradient index: ``attribute(loss, params, ihvp, index, query)`` reads no training example.

The scores are the closure's preconditioned queries, projected like the training gradients, against the stored
rows; where the projection is the identity (sizes at their caps) they equal the scores from the training data.
"""

from __future__ import annotations

import pytest
import torch

import ifunc
from ifunc.index import project_flat
from ifunc.testing import mlp_problem


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def problem(request):
    model, params, loss, (x, y) = mlp_problem(seed=5, sizes=(4, 6, 3), n=30, dtype=request.param)
    return model, params, loss, (x, y), (x[:4] + 0.1, y[:4])


def _closures(model, params, loss, train):
    return {
        "explicit": ifunc.ihvp_explicit(loss, params, train, damping=0.1),
        "ekfac": ifunc.ihvp_ekfac(loss, params, train, model=model),
        "cg": ifunc.ihvp_cg(loss, params, train, damping=0.1, tol=1e-5),
    }


@pytest.mark.parametrize("with_model", [True, False], ids=["layers", "dense"])
def test_an_uncompressed_index_gives_the_scores_of_the_training_data(problem, tmp_path, with_model):
    """Sizes at their caps make the projection the identity: the index holds the exact gradients."""
    model, params, loss, train, query = problem
    index = ifunc.build_index(
        loss, params, train, tmp_path / "i.h5", model=model if with_model else None, layer_size=64, dense_size=10**6
    )
    tol = 1e-4 if params["0.weight"].dtype == torch.float32 else 1e-6  # the index keeps float32
    for name, ihvp in _closures(model, params, loss, train).items():
        direct = ifunc.attribute(loss, params, ihvp, train, query)
        from_index = ifunc.attribute(loss, params, ihvp, index, query)
        torch.testing.assert_close(from_index, direct, rtol=tol, atol=tol * float(direct.abs().max()), msg=name)


def test_index_scores_are_the_projected_queries_against_the_stored_rows(problem, tmp_path):
    model, params, loss, train, query = problem
    index = ifunc.build_index(loss, params, train, tmp_path / "i.h5", model=model, layer_size=2, dense_size=3)
    rows = index.matrix()
    for name, ihvp in _closures(model, params, loss, train).items():
        Q = ihvp(ifunc.per_sample_grads(loss, params, query))
        expected = project_flat(index.projection, Q, params) @ rows.to(Q.dtype).T
        got = ifunc.attribute(loss, params, ihvp, index, query, chunk_size=7)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def test_a_larger_projection_ranks_more_like_the_training_data(tmp_path):
    """Fidelity is measured, not assumed: the per-query Spearman with the exact scores of 200 examples grows with the
    projection (a random projection preserves inner products only in expectation, with an error ~ 1/√k)."""
    model, params, loss, (x, y) = mlp_problem(seed=2, sizes=(8, 16, 4), n=200)
    query = (x[:5] + 0.05, y[:5])
    ekfac = ifunc.ihvp_ekfac(loss, params, (x, y), model=model)
    direct = ifunc.attribute(loss, params, ekfac, (x, y), query)
    mean = {}
    for k in (4, 16):
        index = ifunc.build_index(loss, params, (x, y), tmp_path / f"{k}.h5", model=model, layer_size=k)
        from_index = ifunc.attribute(loss, params, ekfac, index, query)
        mean[k] = sum(_spearman(a, b) for a, b in zip(from_index, direct)) / len(direct)
    # measured at seeds 0, 1, 2 of the projection: k = 4 (32 of 212 coordinates) 0.29, 0.28, 0.25;
    # k = 16 (208 of 212, the first layer exact) 0.72, 0.75, 0.80
    assert mean[16] > 0.6 and mean[16] > mean[4] + 0.2, mean


def test_an_index_query_writes_a_resumable_store_and_refuses_other_parameters(problem, tmp_path):
    model, params, loss, train, query = problem
    index = ifunc.build_index(loss, params, train, tmp_path / "i.h5", model=model, chunk_size=8)
    ekfac = ifunc.ihvp_ekfac(loss, params, train, model=model)
    in_memory = ifunc.attribute(loss, params, ekfac, index, query)
    path = ifunc.attribute(loss, params, ekfac, index, query, out=tmp_path / "s.h5")
    torch.testing.assert_close(
        torch.as_tensor(ifunc.load_scores(path)).to(in_memory.dtype), in_memory, rtol=1e-5, atol=1e-6
    )
    assert ifunc.attribute(loss, params, ekfac, index, query, out=tmp_path / "s.h5") == path  # finished: a no-op
    moved = {k: v + 0.01 for k, v in params.items()}
    with pytest.raises(ValueError, match="gradients at other parameters"):
        ifunc.attribute(loss, moved, ekfac, index, query)
    with pytest.raises(NotImplementedError, match="ihvp_projected"):  # the curvature of the projected space
        ifunc.self_influence(loss, params, ekfac, index)
    with pytest.raises(NotImplementedError, match="whole queries"):
        ifunc.attribute(loss, params, ekfac, index, query, per_module=True)


def test_a_reopened_index_answers_like_the_one_just_built(problem, tmp_path):
    model, params, loss, train, query = problem
    built = ifunc.build_index(loss, params, train, tmp_path / "i.h5", model=model)
    explicit = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    reopened = ifunc.open_index(tmp_path / "i.h5")
    assert torch.equal(
        ifunc.attribute(loss, params, explicit, reopened, query), ifunc.attribute(loss, params, explicit, built, query)
    )


def test_an_edited_projection_or_missing_checksums_are_refused_when_opened(tmp_path):
    import json

    import h5py

    model, params, loss, (x, y) = mlp_problem(seed=5, sizes=(4, 6, 3), n=12)
    path = tmp_path / "i.h5"
    ifunc.build_index(loss, params, (x, y), path, model=model, layer_size=2)
    for edit in ({"seed": 7}, {"seed": -1}, {"excluded": "2.bias"}):
        damaged = tmp_path / f"edited-{len(edit)}-{next(iter(edit.values()))}.h5"
        damaged.write_bytes(path.read_bytes())
        with h5py.File(damaged, "r+") as f:
            meta = json.loads(f["meta"][()])
            meta["projection"].update(edit)
            del f["meta"]
            f["meta"] = json.dumps(meta)
        with pytest.raises(ValueError, match="metadata is damaged"):
            ifunc.open_index(damaged)
    with h5py.File(path, "r+") as f:
        del f["checksums"]
    with pytest.raises(ValueError, match="no checksums"):
        ifunc.open_index(path)
