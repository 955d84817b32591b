"""Kronecker factors saved to HDF5 and loaded back, validated against the model."""

import os
import re
import subprocess
import sys
import textwrap

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


DIES_SAVING = textwrap.dedent("""
    import os, signal, sys
    import h5py, torch
    import ifunc
    from ifunc.testing import mlp_problem
    torch.set_default_dtype(torch.float64)
    model, params, loss, data = mlp_problem(seed=0, sizes=(3, 5, 3), n=12)
    factors = ifunc.fit_kronecker_factors(loss, params, data, model=model, curvature="empirical_fisher")
    real, made = h5py.Group.create_dataset, [0]

    def dying(self, *args, **kwargs):                   # SIGKILL in the middle of writing the tensors
        made[0] += 1
        if made[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    h5py.Group.create_dataset = dying
    ifunc.save_factors(sys.argv[1], factors, params)
""")

TEMPORARY = re.compile(r"factors\.h5\.\d+-[0-9a-f]{12}\.tmp")


def test_a_save_killed_midway_leaves_a_temporary_that_the_next_load_or_save_removes(tmp_path):
    _, params, _, _, factors = _fit()
    path = tmp_path / "factors.h5"
    script = tmp_path / "dies.py"
    script.write_text(DIES_SAVING)
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-3000:]
    script.unlink()
    (stale,) = tmp_path.iterdir()  # no factors.h5: only the temporary of the killed save
    assert TEMPORARY.fullmatch(stale.name)
    with pytest.raises(ValueError, match=r"is a temporary file of an interrupted ifunc save, not an ifunc factor"):
        ifunc.load_factors(stale, params)
    assert stale.exists()
    with pytest.raises(ValueError, match=r"factors\.h5 cannot be read as an ifunc factor file"):
        ifunc.load_factors(path, params)  # nothing saved there; the stale temporary is gone
    assert list(tmp_path.iterdir()) == []

    # left by hand: a killed process's (removed), an older name without a pid (removed), this live process's
    # (kept: it may be saving), one another process holds open (kept), another file's (kept)
    dead = tmp_path / f"factors.h5.{_dead_pid()}-0123456789ab.tmp"
    old = tmp_path / "factors.h5.0123456789ab.tmp"
    live = tmp_path / f"factors.h5.{os.getpid()}-0123456789ab.tmp"
    other = tmp_path / "other.h5.99999999-0123456789ab.tmp"
    for p in (dead, old, live, other):
        p.write_bytes(b"half a file")
    ifunc.save_factors(path, factors, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])
    loaded = ifunc.load_factors(path, params)
    assert loaded.layers == factors.layers and loaded.n == factors.n


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="no HDF5 file locks")
def test_a_temporary_that_a_save_in_progress_holds_is_never_removed(tmp_path):
    _, params, _, _, factors = _fit()
    path = tmp_path / "factors.h5"
    busy = tmp_path / f"factors.h5.{_dead_pid()}-0123456789ab.tmp"
    with h5py.File(busy, "w"):  # HDF5 holds its lock, as a save in progress does
        ifunc.save_factors(path, factors, params)
        assert busy.exists()
    ifunc.save_factors(path, factors, params, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)
