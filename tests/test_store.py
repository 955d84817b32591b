"""HDF5 score stores: crash-and-resume, validation, reading without loading."""

import logging
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc.testing import mlp_problem

CHILD = textwrap.dedent("""
    import os, signal, sys, logging
    import torch
    import ifunc
    from ifunc.testing import mlp_problem
    torch.set_default_dtype(torch.float64)
    logging.basicConfig(filename=sys.argv[2], level=logging.INFO, format="%(message)s")
    armed = [False]

    class Arm(logging.Handler):                       # arm once chunk number `kill_after` is on disk
        def emit(self, record):
            armed[0] = armed[0] or f"chunk {sys.argv[3]}/" in record.getMessage()

    logging.getLogger("ifunc").addHandler(Arm())
    _, params, loss, (x, y) = mlp_problem(seed=0, sizes=(3, 5, 3), n=20)
    def train_loss(p, b):
        if armed[0]:
            os.kill(os.getpid(), signal.SIGKILL)      # die in the middle of the next chunk
        return loss(p, b)
    ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1)
    ifunc.attribute(train_loss, params, ihvp, (x, y), (x[:3] + 1, y[:3]), measurement=loss, out=sys.argv[1],
                    chunk_size=2, progress=False)
""")


def _run_child(tmp_path, store, log, kill_after):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run(
        [sys.executable, str(script), str(store), str(log), str(kill_after)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing_finished_chunks(tmp_path):
    store, log = tmp_path / "scores.h5", tmp_path / "run.log"
    killed = _run_child(tmp_path, store, log, kill_after=5)  # killed while computing the 6th chunk
    assert killed.returncode == -9, killed.stderr
    with h5py.File(store, "r") as f:
        assert f["done"][...].tolist() == [1] * 5 + [0] * 5
    with pytest.raises(ValueError, match="incomplete"):
        ifunc.load_scores(store)
    first_log = log.read_text()
    resumed = _run_child(tmp_path, store, log, kill_after="never")
    assert resumed.returncode == 0, resumed.stderr
    second_log = log.read_text()[len(first_log) :]
    written = [line.split()[2] for line in second_log.splitlines() if "written" in line]
    assert written == [f"{i}/10" for i in range(6, 11)], second_log  # only the unfinished chunks
    assert "5 of 10 chunks already done" in second_log

    _, params, loss, (x, y) = mlp_problem(seed=0, sizes=(3, 5, 3), n=20)
    ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1)
    expected = ifunc.attribute(loss, params, ihvp, (x, y), (x[:3] + 1, y[:3]))
    np.testing.assert_allclose(ifunc.load_scores(store), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def setup():
    _, params, loss, (x, y) = mlp_problem(seed=1, sizes=(3, 5, 3), n=15)
    ihvp = ifunc.ihvp_cg(loss, params, (x, y), damping=0.1, tol=1e-10)
    return params, loss, ihvp, (x, y)


def test_streaming_loader_into_a_store_equals_in_memory(setup, tmp_path):
    params, loss, ihvp, (x, y) = setup
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    path = ifunc.attribute(loss, params, ihvp, loader, (x[:2], y[:2]), out=tmp_path / "s.h5", chunk_size=3)
    expected = ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]))
    np.testing.assert_allclose(ifunc.load_scores(path), expected.numpy(), rtol=1e-5, atol=1e-6)
    lazy = ifunc.load_scores(path, lazy=True)
    assert isinstance(lazy, h5py.Dataset) and lazy.shape == (2, 15)
    lazy.file.close()
    values, indices = ifunc.top_k(path, 4, block=4)
    ref = torch.from_numpy(ifunc.load_scores(path)).double().topk(4, dim=1)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(values, ref.values)
    # re-running a finished store recomputes nothing
    calls = []
    counting = lambda p, b: (calls.append(1), loss(p, b))[1]  # noqa: E731
    ifunc.attribute(counting, params, ihvp, loader, (x[:2], y[:2]), out=path, chunk_size=3, measurement=loss)
    assert calls == []


def test_a_store_from_another_model_or_query_set_is_refused_and_left_untouched(setup, tmp_path):
    params, loss, ihvp, (x, y) = setup
    path = tmp_path / "s.h5"
    ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=path, chunk_size=5)
    before = path.read_bytes()
    moved = {k: v + 0.01 for k, v in params.items()}
    with pytest.raises(ValueError, match="different run.*params"):
        ifunc.attribute(loss, moved, ihvp, (x, y), (x[:2], y[:2]), out=path, chunk_size=5)
    with pytest.raises(ValueError, match="different run.*query"):
        ifunc.attribute(loss, params, ihvp, (x, y), (x[:3], y[:3]), out=path, chunk_size=5)
    with pytest.raises(ValueError, match="different run.*damping"):
        ifunc.attribute(loss, params, ihvp.with_damping(0.2), (x, y), (x[:2], y[:2]), out=path, chunk_size=5)
    assert path.read_bytes() == before
    ifunc.attribute(loss, moved, ihvp, (x, y), (x[:2], y[:2]), out=path, chunk_size=5, overwrite=True)
    assert path.read_bytes() != before


def test_truncated_and_foreign_files_give_clear_errors(setup, tmp_path):
    params, loss, ihvp, (x, y) = setup
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match="not an ifunc score store"):
        ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=foreign)
    with pytest.raises(ValueError, match="not an ifunc score store"):
        ifunc.load_scores(foreign)
    good = tmp_path / "s.h5"
    ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=good)
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(good.read_bytes()[:100])
    before = truncated.read_bytes()
    with pytest.raises(ValueError, match="cannot be read.*truncated.*left untouched"):
        ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=truncated)
    assert truncated.read_bytes() == before
    text = tmp_path / "notes.h5"
    text.write_text("my notes")
    with pytest.raises(ValueError, match="cannot be read"):
        ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=text)
    assert text.read_text() == "my notes"


def test_progress_logging_is_quiet_when_asked(setup, tmp_path, caplog, capfd):
    """progress=False prints nothing (no bar, no message, on either stream); the log records remain."""
    params, loss, ihvp, (x, y) = setup
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="ifunc"):
        ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=tmp_path / "s.h5", chunk_size=5, progress=False)
    assert capfd.readouterr() == ("", "")
    assert sum("written" in r.message for r in caplog.records) == 3


def test_kronecker_closures_stream_into_a_store_too(tmp_path):
    model, params, loss, (x, y) = mlp_problem(seed=2, sizes=(3, 5, 3), n=20)
    ihvp = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    expected = ifunc.attribute(loss, params, ihvp, (x, y), (x[:3], y[:3]))
    path = ifunc.attribute(loss, params, ihvp, (x, y), (x[:3], y[:3]), chunk_size=6, out=tmp_path / "k.h5")
    np.testing.assert_allclose(ifunc.load_scores(path), expected.numpy(), rtol=1e-5, atol=1e-6)
