"""HDF5 score stores: crash-and-resume, validation, reading without loading."""

import errno
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc import _memory, distributed, store
from ifunc._data import DataSource
from ifunc._store_sinks import resumed_chunk_size
from ifunc.ihvp import ScoreOptions, scorer_for
from ifunc.testing import mlp_problem

from . import store_worker

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
    calls = []
    counting = lambda p, b: (calls.append(1), loss(p, b))[1]  # noqa: E731
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    path = ifunc.attribute(
        counting, params, ihvp, loader, (x[:2], y[:2]), out=tmp_path / "s.h5", chunk_size=3, measurement=loss
    )
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
    calls.clear()
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


# ---------------------------------------------------------------- default chunk size, damaged files, full disks

WORKER = Path(__file__).with_name("store_worker.py")


def _worker(*args):
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=300)


def _free_memory_for(monkeypatch, chunks) -> dict[int, int]:
    """Bytes of free memory that make the default chunk size of the worker's problem each of ``chunks``.

    Each is the geometric middle of the range of free memory that gives that chunk size here, not its edge: the
    worker measures its own probe, and a few bytes more there must not move it to the next size down.
    """
    params, loss, ihvp, train, query = store_worker.problem()
    found: dict[int, int] = {}  # chunk size -> the least free memory giving it
    wanted = set(chunks) | {c + 1 for c in chunks}
    free = 1000
    while wanted - set(found) and free < 1 << 24:
        monkeypatch.setattr(_memory, "available_bytes", lambda free=free: free)
        try:
            scorer = scorer_for(ihvp, loss, params, ScoreOptions())
            scorer.prepare(DataSource(query, name="query"), None)
            found.setdefault(scorer.chunk_size(DataSource(train, name="train"), pairs=True), free)
        except MemoryError:
            pass
        free = int(free * 1.05)
    monkeypatch.undo()
    return {c: int((found[c] * found[c + 1]) ** 0.5) for c in chunks}


@pytest.mark.slow
def test_a_run_killed_on_default_settings_resumes_when_the_free_memory_changed(tmp_path, monkeypatch):
    """The default chunk size follows free memory; a resumed run adopts the file's (3 here, not 4)."""
    free = _free_memory_for(monkeypatch, (3, 4))
    path, reference = tmp_path / "s.h5", tmp_path / "reference.h5"
    killed = _worker("default", path, free[3], 2)  # 5 chunks of 3; killed computing the third
    assert killed.returncode == -9, killed.stderr[-3000:]
    with h5py.File(path, "r") as f:
        assert f["done"][...].tolist() == [1, 1, 0, 0, 0]
    resumed = _worker("default", path, free[4], 0)  # now the default would be 4
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line.split()[2] for line in resumed.stdout.splitlines()] == ["3/5", "4/5", "5/5"]  # chunks 1, 2 kept
    whole = _worker("default", reference, free[3], 0)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert np.array_equal(ifunc.load_scores(path), ifunc.load_scores(reference))  # bit for bit
    with h5py.File(path, "r") as f:
        assert json.loads(f["meta"][()])["chunk_size"] == 3
    params, loss, ihvp, train, query = store_worker.problem()
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"chunk_size: file has 3, this call has 4; .*drop chunk_size=.*chunk_size=3"):
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, progress=False)
    assert path.read_bytes() == before


def test_damaged_metadata_is_named_and_the_scores_stay_readable_unchecked(tmp_path):
    params, loss, ihvp, train, query = store_worker.problem()
    path = ifunc.attribute(loss, params, ihvp, train, query, out=tmp_path / "s.h5", chunk_size=3, progress=False)
    scores = ifunc.load_scores(path)
    for damage in ('{"chunk_size": 3, "n_quer', '{"n_query": 2}', '{"chunk_size": 0}'):
        with h5py.File(path, "r+") as f:
            del f["meta"]
            f["meta"] = damage
        for read in (lambda: ifunc.load_scores(path), lambda: ifunc.top_k(path, 2)):
            with pytest.raises(ValueError, match=r"s\.h5: the store's metadata is damaged .*overwrite=True.*verify="):
                read()
        np.testing.assert_array_equal(ifunc.load_scores(path, verify=False), scores)
        assert torch.equal(ifunc.top_k(path, 2, verify=False)[1], torch.from_numpy(scores).topk(2, dim=1).indices)
        with pytest.raises(ValueError, match="has no readable metadata|different run"):
            ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=3, progress=False)


LIMITED = textwrap.dedent("""
    import errno, json, os, resource, sys
    import ifunc
    from store_worker import problem
    params, loss, ihvp, train, query = problem()
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    report = {}
    for name in ("s.h5", "new.h5"):            # resume the existing store; create a new one
        try:
            ifunc.attribute(loss, params, ihvp, train, query, out=os.path.join(sys.argv[1], name), chunk_size=3,
                            progress=False)
            report[name] = None
        except OSError as err:
            report[name] = [type(err).__name__, err.errno, str(err)]
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_a_file_size_limit_is_named_and_loses_nothing_written(tmp_path):
    params, loss, ihvp, train, query = store_worker.problem()
    path = tmp_path / "s.h5"
    real = store.ScoreWriter.write

    def crash_after_two(self, index, columns, fp):
        if len(self.done) == 2:
            raise KeyboardInterrupt
        real(self, index, columns, fp)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(store.ScoreWriter, "write", crash_after_two)
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=3, progress=False)
    with h5py.File(path, "r") as f:  # the finished chunks 0 and 1: columns 0..5
        first = f["scores"][:, :6]
        limit = f["scores"].id.get_offset() + 4 * 15  # writes beyond the first row of scores fail
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    env = dict(os.environ, PYTHONPATH=str(WORKER.parent))
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(limit)], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    kind, code, message = report["s.h5"]
    assert (kind, code) == ("OSError", errno.EFBIG)
    assert re.search(
        r"writing chunk 2 of .*s\.h5 failed: a file-size limit \(ulimit -f\) was reached \(.*File too large.*\); "
        r"the 2 chunks already completed are kept .* re-running the same call resumes",
        message,
    ), message
    kind, code, message = report["new.h5"]
    assert (kind, code) == ("OSError", errno.EFBIG)
    assert re.search(r"creating .*new\.h5 failed: a file-size limit .*nothing changed at that path", message), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["limited.py", "s.h5"]  # no new.h5, no temporary
    with h5py.File(path, "r") as f:  # what was written survives, unchanged
        assert f["done"][...].tolist() == [1, 1, 0, 0, 0]
        assert np.array_equal(f["scores"][:, :6], first)
    ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=3, progress=False)  # limit lifted
    whole = ifunc.attribute(loss, params, ihvp, train, query, out=tmp_path / "whole.h5", chunk_size=3, progress=False)
    assert np.array_equal(ifunc.load_scores(path), ifunc.load_scores(whole))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, "float32", np.float32])
def test_a_non_floating_dtype_is_refused_everywhere(dtype):
    params, loss, ihvp, train, query = store_worker.problem()
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        ifunc.attribute(loss, params, ihvp, train, query, dtype=dtype, progress=False)
    gen = torch.Generator().manual_seed(0)
    for build in (
        lambda: ifunc.nystrom_sketch(lambda V: V, 4, 2, generator=gen, dtype=dtype),
        lambda: ifunc.jacobi_preconditioner(lambda V: V, damping=0.1, dim=4, dtype=dtype),
        lambda: ifunc.nystrom_preconditioner(lambda V: V, rank=2, damping=0.1, dim=4, dtype=dtype),
    ):
        with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
            build()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floating_dtypes_give_the_scores_in_that_dtype(dtype):
    params, loss, ihvp, train, query = store_worker.problem()
    scores = ifunc.attribute(loss, params, ihvp, train, query, dtype=dtype, progress=False)
    reference = ifunc.attribute(loss, params, ihvp, train, query, progress=False)
    assert scores.dtype == dtype
    torch.testing.assert_close(scores, reference.to(dtype))


def test_under_torchrun_the_chunk_size_is_adopted_from_a_ranks_part_too(tmp_path, monkeypatch):
    """Rank 0 reads the chunk size for every rank: from ``out``, else from any rank's part ``out.rank{r}of{W}``."""
    path = tmp_path / "s.h5"
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "broadcast_result", lambda fn: fn())
    assert resumed_chunk_size(path) is None
    with store.ScoreWriter(store.part_path(path, 1, 2), n_query=2, n_train=6, chunk_size=3, meta={}):
        pass
    assert resumed_chunk_size(path) == 3
    with store.ScoreWriter(path, n_query=2, n_train=12, chunk_size=4, meta={}):
        pass
    assert resumed_chunk_size(path) == 4  # the merged file first
