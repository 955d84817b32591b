"""Kronecker factors saved to HDF5 and loaded back, validated against the model."""

import h5py
import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem


def _fit(seed=0):
    model, params, loss, data = mlp_problem(seed=seed, sizes=(3, 5, 3), n=12)
    factors = ifunc.fit_kronecker_factors(loss, params, data, model=model, curvature="empirical_fisher")
    return model, params, loss, data, factors


def test_round_trip_gives_the_same_closure(tmp_path):
    model, params, loss, data, factors = _fit()
    path = tmp_path / "factors.h5"
    ifunc.save_factors(path, factors, params)
    loaded = ifunc.load_factors(path, params)
    assert loaded.layers == factors.layers and loaded.n == factors.n and loaded.curvature == factors.curvature
    v = torch.randn(ifunc.flatten(params)[0].numel())
    for build in (ifunc.ihvp_ekfac, ifunc.ihvp_kfac):
        torch.testing.assert_close(
            build(loss, params, loaded, model=model, damping=0.1)(v),
            build(loss, params, factors, model=model, damping=0.1)(v),
        )


def test_factors_from_another_model_are_refused(tmp_path):
    _, params, _, _, factors = _fit()
    path = tmp_path / "factors.h5"
    ifunc.save_factors(path, factors, params)
    _, other, _, _ = mlp_problem(seed=0, sizes=(3, 6, 3), n=12)
    with pytest.raises(ValueError, match="another model.*shapes differ"):
        ifunc.load_factors(path, other)
    moved = {k: v + 1 for k, v in params.items()}
    with pytest.raises(ValueError, match="different parameter values"):
        ifunc.load_factors(path, moved)
    assert ifunc.load_factors(path, moved, check_params=False).n == factors.n


def test_existing_files_are_not_overwritten_and_foreign_files_refused(tmp_path):
    _, params, _, _, factors = _fit()
    path = tmp_path / "factors.h5"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ifunc.save_factors(path, factors, params)
    assert path.read_text() == "precious"
    with pytest.raises(ValueError, match="cannot be read"):
        ifunc.load_factors(path, params)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not an ifunc factor file"):
        ifunc.load_factors(foreign, params)
    ifunc.save_factors(path, factors, params, overwrite=True)
    assert ifunc.load_factors(path, params).n == factors.n


def test_progress_bars_can_be_forced_and_silenced(capsys):
    model, params, loss, data = mlp_problem(seed=0, sizes=(3, 5, 3), n=12)
    ifunc.fit_kronecker_factors(loss, params, data, model=model, progress=True)
    shown = capsys.readouterr().err
    assert "ifunc factors" in shown and "ifunc eigendecompositions" in shown and "EK-FAC eigenvalues" in shown
    ifunc.fit_kronecker_factors(loss, params, data, model=model, progress=False)
    ifunc.attribute(loss, params, ifunc.ihvp_identity(params, damping=1.0), data, data, progress=False)
    assert capsys.readouterr().err == ""
    ifunc.attribute(loss, params, ifunc.ihvp_explicit(loss, params, data, damping=1.0), data, data, progress=True)
    assert "ifunc scores" in capsys.readouterr().err
