"""Score stores never mix, lose or silently return wrong data.

Each test checks behaviour and, where a file must not change, its SHA-256 (and inode) before and after.
A second process (``tests/store_worker.py``) plays the other writer, the reader holding the file, and the
unprivileged user who cannot write a read-only store.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import ifunc
from ifunc import store
from ifunc._chunks import Partition
from ifunc._data import DataSource
from ifunc._score_loop import run_chunks
from ifunc._store_sinks import RankStoreSink
from ifunc.testing import mlp_problem

WORKER = Path(__file__).with_name("store_worker.py")
NO_LOCKS = os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE"


class Stop(Exception):
    """Stands for a crash: raised from the training loss once some chunks are on disk."""


def problem():
    """The problem of ``store_worker.problem``: 15 examples, 5 chunks of 3, explicit closure, two queries."""
    _, params, loss, (x, y) = mlp_problem(seed=1, sizes=(3, 5, 3), n=15)
    return params, loss, ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1), (x, y), (x[:2], y[:2])


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def writes():
    """The numbers ``i`` of the chunks ``i/n`` written to any store while the block runs (from the ifunc log)."""
    written: list[int] = []

    class Record(logging.Handler):
        def emit(self, record):
            found = re.search(r"chunk (\d+)/\d+ written", record.getMessage())
            if found:
                written.append(int(found.group(1)))

    logger, handler = logging.getLogger("ifunc"), Record()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield written
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def crashed_after(path, after: int, run) -> None:
    """Run ``run()``, a call writing the store at ``path``, and let its write of chunk ``after + 1`` fail: the store
    is left with its first ``after`` chunks done, as a crash would leave it.

    The crash comes from the store, not from a wrapper of the loss: the loss is part of what the store records.
    """
    real = store.ScoreWriter.write

    def write(self, index, columns, fp):
        if len(self.done) >= after:
            raise Stop
        real(self, index, columns, fp)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Stop):
        patch.setattr(store.ScoreWriter, "write", write)
        run()
    with h5py.File(path, "r") as f:
        done = f["done"]
        assert isinstance(done, h5py.Dataset) and int(done[...].sum()) == after


def partial(path, loss, params, ihvp, train, query, *, after: int, **kw):
    """A score store with its first ``after`` chunks done (:func:`crashed_after`)."""
    run = lambda: ifunc.attribute(loss, params, ihvp, train, query, out=path, progress=False, **kw)  # noqa: E731
    crashed_after(path, after, run)


def changed(x: torch.Tensor, example: int) -> torch.Tensor:
    x = x.clone()
    x[example] += 1.0
    return x


# ---------------------------------------------------------------- 1. resume never mixes data


def test_resume_checks_every_finished_chunk_against_its_fingerprint(tmp_path):
    params, loss, ihvp, (x, y), query = problem()
    path = tmp_path / "s.h5"
    partial(path, loss, params, ihvp, (x, y), query, after=3, chunk_size=3)  # chunks 0, 1, 2 done
    before = sha(path)
    with pytest.raises(
        ValueError,
        match=r"chunk 2 of the training data .*training data changed since the file "
        r"was written.*overwrite=True",
    ):
        ifunc.attribute(loss, params, ihvp, (changed(x, 7), y), query, out=path, chunk_size=3, progress=False)
    assert sha(path) == before  # refused before any write
    # a change in a chunk that is not on disk yet mixes nothing: the run resumes where it stopped
    x_new = changed(x, 13)
    with writes() as written:
        ifunc.attribute(loss, params, ihvp, (x_new, y), query, out=path, chunk_size=3, progress=False)
    assert written == [4, 5]  # finished chunks not recomputed
    expected = ifunc.attribute(loss, params, ihvp, (x_new, y), query)
    np.testing.assert_allclose(ifunc.load_scores(path), expected.numpy(), rtol=1e-5, atol=1e-6)
    # a finished store is checked as well (chunk 4 now holds x_new's example 13)
    before = sha(path)
    with pytest.raises(ValueError, match="chunk 4 of the training data"):
        ifunc.attribute(loss, params, ihvp, (x, y), query, out=path, chunk_size=3, progress=False)
    assert sha(path) == before


def _builders():
    model, params, loss, (x, y) = mlp_problem(seed=2, sizes=(3, 5, 3), n=20)
    return (
        model,
        params,
        loss,
        (x, y),
        {
            "explicit": lambda data: ifunc.ihvp_explicit(loss, params, data, damping=0.1),
            "arnoldi": lambda data: ifunc.ihvp_arnoldi(loss, params, data, damping=0.1, rank=4),
            "ekfac": lambda data: ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1),
            "kfac": lambda data: ifunc.ihvp_kfac(loss, params, data, model=model, damping=0.1),
            "diagonal": lambda data: ifunc.ihvp_diagonal(loss, params, data, model=model, damping=0.1),
        },
    )


@pytest.mark.parametrize("method", ["explicit", "arnoldi", "ekfac", "kfac", "diagonal"])
def test_a_closure_built_on_other_curvature_data_is_refused(method, tmp_path):
    _, params, loss, (x, y), build = _builders()
    path = tmp_path / "s.h5"
    ifunc.attribute(loss, params, build[method]((x, y)), (x, y), (x[:2], y[:2]), out=path, chunk_size=5, progress=False)
    before = sha(path)
    with pytest.raises(ValueError, match=r"different run \(curvature\."):
        ifunc.attribute(
            loss,
            params,
            build[method]((x[:12], y[:12])),
            (x, y),
            (x[:2], y[:2]),
            out=path,
            chunk_size=5,
            progress=False,
        )
    assert sha(path) == before
    with writes() as written:  # the same build again: a no-op (the summaries tolerate last-bit differences)
        ifunc.attribute(
            loss, params, build[method]((x, y)), (x, y), (x[:2], y[:2]), out=path, chunk_size=5, progress=False
        )
    assert written == [] and sha(path) == before


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(tol=1e-8), r"method_info\.tol: file has 1e-10, this call has 1e-08"),
        (
            dict(curvature="empirical_fisher"),
            r"method_info\.curvature: file has 'ggn', this call has 'empirical_fisher'",
        ),
        (dict(dtype=torch.float32), r"score_dtype: file has None, this call has 'torch\.float32'"),
    ],
)
def test_the_settings_of_the_method_are_part_of_what_is_checked(change, words, tmp_path):
    params, loss, _, data, query = problem()
    build = dict(tol=1e-10, curvature="ggn")
    dtype = change.pop("dtype", None)
    path = tmp_path / "s.h5"
    ifunc.attribute(
        loss,
        params,
        ifunc.ihvp_cg(loss, params, data, damping=0.1, **build),
        data,
        query,
        out=path,
        chunk_size=3,
        progress=False,
    )
    before = sha(path)
    with pytest.raises(ValueError, match=f"different run.*{words}"):
        ifunc.attribute(
            loss,
            params,
            ifunc.ihvp_cg(loss, params, data, damping=0.1, **dict(build, **change)),
            data,
            query,
            out=path,
            chunk_size=3,
            progress=False,
            dtype=dtype,
        )
    assert sha(path) == before


def test_a_matrix_free_closure_records_its_data_and_its_identity_is_checked(tmp_path):
    """CG keeps nothing computed from its data: the closure records the data's fingerprint (no warning on resume);
    an ``identity`` is checked too."""
    params, loss, _, data, query = problem()
    cg = ifunc.ihvp_cg(loss, params, data, damping=0.1, tol=1e-10)
    assert isinstance(cg.info["data"], str)
    path = tmp_path / "s.h5"
    ifunc.attribute(loss, params, cg, data, query, out=path, chunk_size=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ifunc.attribute(loss, params, cg, data, query, out=path, chunk_size=3, progress=False)
    cg.identity = "cg on data v1"
    ifunc.attribute(loss, params, cg, data, query, out=path, chunk_size=3, progress=False, overwrite=True)
    with writes() as written:
        ifunc.attribute(loss, params, cg, data, query, out=path, chunk_size=3, progress=False)  # no warning
    assert written == []
    before = sha(path)
    cg.identity = "cg on data v2"
    with pytest.raises(ValueError, match="identity: file has 'cg on data v1', this call has 'cg on data v2'"):
        ifunc.attribute(loss, params, cg, data, query, out=path, chunk_size=3, progress=False)
    assert sha(path) == before


def test_a_custom_callable_closure_is_resumable_only_with_an_identity(tmp_path):
    params, loss, ihvp, data, query = problem()

    def custom(V):
        return ihvp(V)

    path = tmp_path / "s.h5"
    with pytest.warns(UserWarning, match="cannot be resumed if this run stops: ihvp is a custom callable"):
        ifunc.attribute(loss, params, custom, data, query, out=path, chunk_size=3, progress=False)
    before = sha(path)
    with pytest.raises(ValueError, match="custom callable.*cannot tell apart.*ihvp.identity"):
        ifunc.attribute(loss, params, custom, data, query, out=path, chunk_size=3, progress=False)
    assert sha(path) == before
    custom.identity = "explicit, damping 0.1, data v1"
    ifunc.attribute(loss, params, custom, data, query, out=path, chunk_size=3, progress=False, overwrite=True)
    with writes() as written:
        assert ifunc.attribute(loss, params, custom, data, query, out=path, chunk_size=3, progress=False) == path
    assert written == []
    custom.identity = "explicit, damping 0.2, data v1"
    with pytest.raises(ValueError, match="different run.*identity"):
        ifunc.attribute(loss, params, custom, data, query, out=path, chunk_size=3, progress=False)


def test_per_rank_stores_check_fingerprints_in_their_part_and_in_the_merged_file(tmp_path):
    """The ``torchrun`` sink, on one process: part ``out.rank0of1`` then the merged ``out``."""
    _, _, _, (x, y), _ = problem()
    path = tmp_path / "s.h5"

    def run(x, fail_at=None):
        def compute(batch, offset):
            if offset == fail_at:
                raise Stop
            return torch.stack([batch[0].sum(1), batch[0].square().sum(1)])

        sink = RankStoreSink(path, meta={"method": "test"}, overwrite=False)
        source = DataSource((x, y), name="train", ordered=True)
        return run_chunks(source, 3, Partition(), compute, sink, n_query=2, desc="", progress=False)

    with pytest.raises(Stop):
        run(x, fail_at=9)  # chunks 0-2 in the part file
    part = store.part_path(path, 0, 1)
    before = sha(part)
    with pytest.raises(ValueError, match="chunk 1 of the training data"):
        run(changed(x, 4))
    assert sha(part) == before
    assert run(x) == path and not part.exists()
    np.testing.assert_allclose(ifunc.load_scores(path), torch.stack([x.sum(1), x.square().sum(1)]).numpy(), rtol=1e-6)
    before = sha(path)
    with pytest.raises(ValueError, match="chunk 4 of the training data"):
        run(changed(x, 12))
    assert sha(path) == before


# ---------------------------------------------------------------- 2. locks, temporary files, directories


def _start(mode, store_path, tmp_path):
    ready, go = tmp_path / f"{mode}.ready", tmp_path / f"{mode}.go"
    child = subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(store_path), str(ready), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 240
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > end:
            child.kill()
            pytest.fail(f"the {mode} worker did not get ready: {child.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return child, go


def _finish(child, go):
    go.touch()
    _, err = child.communicate(timeout=240)
    assert child.returncode == 0, err[-3000:]


def _untouched(path: Path):
    return sha(path), os.stat(path).st_ino


@pytest.mark.skipif(NO_LOCKS, reason="HDF5 file locking is disabled (HDF5_USE_FILE_LOCKING=FALSE)")
def test_a_second_writer_is_told_another_process_is_writing_and_overwrite_replaces_nothing(tmp_path):
    path = tmp_path / "s.h5"
    child, go = _start("hold", path, tmp_path)  # paused with 2 of 5 chunks written
    try:
        params, loss, ihvp, data, query = problem()
        before = _untouched(path)
        for overwrite in (False, True):
            with pytest.raises(BlockingIOError, match="another process is writing .*s.h5"):
                ifunc.attribute(
                    loss, params, ihvp, data, query, out=path, chunk_size=3, overwrite=overwrite, progress=False
                )
        with pytest.raises(BlockingIOError, match="another process is writing"):
            ifunc.load_scores(path)
        assert _untouched(path) == before  # same bytes, same inode: nothing replaced
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hold.ready", "s.h5"]  # no *.tmp left
    finally:
        _finish(child, go)
    expected = ifunc.attribute(loss, params, ihvp, data, query)
    np.testing.assert_allclose(ifunc.load_scores(path), expected.numpy(), rtol=1e-5, atol=1e-6)  # its run, whole


@pytest.mark.skipif(NO_LOCKS, reason="HDF5 file locking is disabled (HDF5_USE_FILE_LOCKING=FALSE)")
def test_a_file_another_process_reads_is_reread_but_never_replaced(tmp_path):
    params, loss, ihvp, data, query = problem()
    path = tmp_path / "s.h5"
    ifunc.attribute(loss, params, ihvp, data, query, out=path, chunk_size=3, progress=False)
    child, go = _start("read", path, tmp_path)  # holds load_scores(lazy=True)
    try:
        before = _untouched(path)
        assert ifunc.attribute(loss, params, ihvp, data, query, out=path, chunk_size=3, progress=False) == path
        with pytest.raises(BlockingIOError, match="has .*s.h5 open for reading"):
            ifunc.attribute(loss, params, ihvp, data, query, out=path, chunk_size=3, progress=False, overwrite=True)
        assert _untouched(path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["read.ready", "s.h5"]
    finally:
        _finish(child, go)


def test_out_as_a_directory_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    params, loss, ihvp, data, query = problem()
    folder = tmp_path / "results"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="out=.* is a directory; give a file path"):
            ifunc.attribute(loss, params, ihvp, data, query, out=folder, overwrite=overwrite, progress=False)
    assert folder.is_dir() and list(folder.iterdir()) == [] and list(tmp_path.iterdir()) == [folder]


def test_a_failed_creation_leaves_no_temporary_file_and_no_store(tmp_path, monkeypatch):
    params, loss, ihvp, data, query = problem()
    path = tmp_path / "s.h5"
    path.write_text("an old file")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.ScoreWriter, "_layout", full)
    for overwrite, kept in ((False, []), (True, ["s.h5"])):
        if not overwrite:
            path.unlink()
        else:
            path.write_text("an old file")
        with pytest.raises(OSError, match="No space left"):
            ifunc.attribute(loss, params, ihvp, data, query, out=path, overwrite=overwrite, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == kept
    assert path.read_text() == "an old file"  # the old file survives a failed overwrite


# ---------------------------------------------------------------- 3. heuristic damping of the Kronecker family


def test_ekfac_with_heuristic_damping_resumes_and_another_damping_is_refused(tmp_path):
    model, params, loss, (x, y) = mlp_problem(seed=2, sizes=(3, 5, 3), n=20)
    query = (x[:3], y[:3])
    build = lambda: ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=None)  # noqa: E731
    ihvp = build()
    assert isinstance(ihvp.damping, dict)
    path = tmp_path / "k.h5"
    calls = []

    def counting(p, b):
        calls.append(1)
        return loss(p, b)

    partial(path, counting, params, ihvp, (x, y), query, after=2, chunk_size=5, measurement=loss)
    with h5py.File(path, "r") as f:  # the resolved λ per block, no NaN
        stored = json.loads(f["meta"][()])["damping"]
    assert stored == pytest.approx(ihvp.damping) and all(np.isfinite(list(stored.values())))
    calls.clear()

    with writes() as written:  # the identical call, closure rebuilt
        ifunc.attribute(
            counting, params, build(), (x, y), query, measurement=loss, out=path, chunk_size=5, progress=False
        )
    assert written == [3, 4] and len(calls) > 0
    calls.clear()
    assert (
        ifunc.attribute(
            counting, params, build(), (x, y), query, measurement=loss, out=path, chunk_size=5, progress=False
        )
        == path
    )
    assert calls == []  # finished: the loss is never called
    before = sha(path)
    with pytest.raises(ValueError, match=r"different run \(damping\.0: file has"):
        ifunc.attribute(
            counting, params, ihvp.with_damping(0.1), (x, y), query, measurement=loss, out=path, chunk_size=5
        )
    assert sha(path) == before
    expected = ifunc.attribute(loss, params, ihvp, (x, y), query)
    np.testing.assert_allclose(ifunc.load_scores(path), expected.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 4. checksums


def test_a_chunk_changed_on_disk_fails_its_checksum_and_is_named(tmp_path):
    params, loss, ihvp, data, query = problem()
    path = ifunc.attribute(loss, params, ihvp, data, query, out=tmp_path / "s.h5", chunk_size=3, progress=False)
    good = ifunc.load_scores(path)
    with h5py.File(path, "r+") as f:  # chunk 2 = columns 6, 7, 8
        f["scores"][:, 7] = f["scores"][:, 7] + 1.0
    for read in (
        lambda: ifunc.load_scores(path),
        lambda: ifunc.load_scores(path, lazy=True),
        lambda: ifunc.top_k(path, 3),
        lambda: ifunc.top_k(path, 3, block=4),
    ):
        with pytest.raises(ValueError, match=r"s\.h5: chunk 2 fails its checksum"):
            read()
    unchecked = ifunc.load_scores(path, verify=False)
    np.testing.assert_array_equal(np.delete(unchecked, 7, axis=1), np.delete(good, 7, axis=1))
    assert not np.allclose(unchecked[:, 7], good[:, 7])
    assert ifunc.top_k(path, 3, verify=False)[1].shape == (2, 3)


def test_a_store_of_the_previous_format_is_read_unverified_and_not_resumed(tmp_path):
    params, loss, ihvp, data, query = problem()
    scores = ifunc.attribute(loss, params, ihvp, data, query).numpy().astype(np.float32)
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:  # the layout of ifunc <= 0.1.0
        f["scores"] = scores
        f["done"] = np.ones(5, dtype=np.uint8)
        f.attrs["format"] = "ifunc-scores"
        f.attrs["meta"] = json.dumps({"chunk_size": 3, "n_query": 2, "n_train": 15, "method": "explicit"})
    with pytest.warns(UserWarning, match="older ifunc without checksums"):
        np.testing.assert_array_equal(ifunc.load_scores(path), scores)
    before = sha(path)
    with pytest.raises(ValueError, match="written by an older ifunc.*re-run with overwrite=True"):
        ifunc.attribute(loss, params, ihvp, data, query, out=path, chunk_size=3, progress=False)
    assert sha(path) == before


# ---------------------------------------------------------------- 5. finished stores are read-only


def test_rerunning_a_finished_store_never_opens_it_for_writing(tmp_path, monkeypatch):
    """Every HDF5 open is recorded: a finished store is opened with mode "r" only, and nothing is renamed."""
    params, loss, ihvp, data, query = problem()
    path = ifunc.attribute(loss, params, ihvp, data, query, out=tmp_path / "s.h5", chunk_size=3, progress=False)
    before, mtime = sha(path), os.stat(path).st_mtime_ns
    opened, real = [], h5py.File

    def recording(name, mode="r", *args, **kwargs):
        opened.append(mode)
        return real(name, mode, *args, **kwargs)

    def forbidden(*args):
        raise AssertionError(f"a finished store must not be renamed or linked: {args}")

    monkeypatch.setattr(h5py, "File", recording)
    monkeypatch.setattr(os, "replace", forbidden)
    monkeypatch.setattr(os, "link", forbidden)
    with writes() as written:
        assert ifunc.attribute(loss, params, ihvp, data, query, out=path, chunk_size=3, progress=False) == path
    ifunc.load_scores(path)
    ifunc.top_k(path, 2)
    assert written == [] and opened and set(opened) == {"r"}
    assert sha(path) == before and os.stat(path).st_mtime_ns == mtime
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become 'nobody'")
def test_a_finished_store_in_a_read_only_directory_is_readable_and_rerunnable_by_a_user_who_cannot_write(tmp_path):
    """Root ignores file modes, so the worker drops to uid 65534 and first proves it cannot write there."""
    params, loss, ihvp, data, query = problem()
    base = Path(tempfile.mkdtemp(prefix="ifunc-readonly-"))  # tmp_path is private to root
    folder = base / "ro"
    try:
        base.chmod(0o755)
        folder.mkdir()
        path = ifunc.attribute(loss, params, ihvp, data, query, out=folder / "s.h5", chunk_size=3, progress=False)
        before = sha(path)
        path.chmod(0o444)
        folder.chmod(0o555)
        run = subprocess.run(
            [sys.executable, str(WORKER), "readonly", str(path)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout.splitlines()[-1])
        assert report["uid"] == 65534 and not report["file_writable"] and not report["dir_writable"]
        assert report["again"] == str(path)
        np.testing.assert_allclose(report["scores"], ifunc.load_scores(path))
        assert report["top"] == ifunc.top_k(path, 2)[1].tolist()
        assert sha(path) == before and [p.name for p in folder.iterdir()] == ["s.h5"]
    finally:
        folder.chmod(0o755)
        shutil.rmtree(base)


def test_a_store_damaged_in_its_layout_is_named_and_left_untouched(tmp_path):
    """A short /done, a missing /fingerprints, metadata that is not an object or a version that is not a number:
    a named error, never a write at offsets past a dataset's end."""
    import h5py

    from ifunc.testing import mlp_problem

    _, params, loss, (x, y) = mlp_problem(seed=0, sizes=(3, 4, 2), n=12)
    ihvp = ifunc.ihvp_identity(params, damping=1.0)

    def run(path):
        return ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=path, chunk_size=4, progress=False)

    damages = {
        "short done": lambda f: (f.__delitem__("done"), f.create_dataset("done", data=np.zeros(1, dtype=np.uint8))),
        "no fingerprints": lambda f: f.__delitem__("fingerprints"),
        "meta a list": lambda f: (f.__delitem__("meta"), f.__setitem__("meta", "[1, 2]")),
        "version a string": lambda f: f.attrs.__setitem__("version", "2"),
    }
    for name, damage in damages.items():
        path = tmp_path / f"{name.replace(' ', '_')}.h5"
        run(path)
        with h5py.File(path, "r+") as f:
            f["done"][0] = 0  # unfinished: a rerun would resume it
            damage(f)
        before = path.read_bytes()
        with pytest.raises(ValueError, match="damaged|no readable metadata"):
            run(path)
        assert path.read_bytes() == before, name


def test_parts_of_a_run_on_another_number_of_ranks_are_named_not_silently_left(tmp_path):
    """A torchrun store killed on 2 ranks and rerun in one process: its parts follow the 2-rank split."""
    params, loss, ihvp, data, query = problem()
    out = tmp_path / "s.h5"
    part = tmp_path / "s.h5.rank1of2"
    ifunc.attribute(loss, params, ihvp, data, query, out=part, chunk_size=3, progress=False)  # stands in for a part
    with pytest.raises(ValueError, match=r"parts of a run on \[2\] rank\(s\).*nproc-per-node=2.*overwrite=True"):
        ifunc.attribute(loss, params, ihvp, data, query, out=out, chunk_size=3, progress=False)
    assert part.exists() and not out.exists()
    ifunc.attribute(loss, params, ihvp, data, query, out=out, chunk_size=3, progress=False, overwrite=True)
    assert not part.exists() and out.exists()


# ---------------------------------------------------------------- 6. the gradient index


def index_problem():
    """The store problem with its model: 15 examples, chunks of 3; layer "2" projected (2 × 2), layer "0" dense (6)."""
    model, params, loss, (x, y) = mlp_problem(seed=1, sizes=(3, 5, 3), n=15)
    same = {"model": model, "modules": ["2"], "layer_size": 2, "dense_size": 6, "chunk_size": 3, "progress": False}
    return params, loss, (x, y), same


def partial_index(path, loss, params, train, *, after: int, **kw):
    """An index with its first ``after`` chunks done (:func:`crashed_after`)."""
    crashed_after(path, after, lambda: ifunc.build_index(loss, params, train, path, **kw))


def test_an_unfinished_index_resumed_with_another_seed_size_params_or_data_is_refused_and_left_untouched(tmp_path):
    params, loss, (x, y), same = index_problem()
    path = tmp_path / "i.h5"
    partial_index(path, loss, params, (x, y), after=2, **same)  # chunks 0, 1 on disk
    before = _untouched(path)
    refused = {
        r"projection\.seed: file has 0, this call has 1": dict(seed=1),
        r"projection\.layers\[0\]\.k_a: file has 2, this call has 3": dict(layer_size=3),
        r"projection\.k_dense: file has 6, this call has 5": dict(dense_size=5),
        r"projection\.excluded: file has \[\], this call has \['0\.bias'\]": dict(exclude=["0.bias"]),
        r"different run \(params: file has": dict(params={k: v + 0.01 for k, v in params.items()}),
        r"chunk 1 of the training data differs": dict(train=(changed(x, 4), y)),
    }
    for words, change in refused.items():
        call = {"loss": loss, "params": params, "train": (x, y), "out": path, **same, **change}
        with pytest.raises(ValueError, match=words):
            ifunc.build_index(**call)
        assert _untouched(path) == before, words  # same bytes, same inode
    assert list(tmp_path.iterdir()) == [path]
    # a change in a chunk that is not on disk yet mixes nothing: the build resumes where it stopped
    x_new = changed(x, 13)
    with writes() as written:
        resumed = ifunc.build_index(loss, params, (x_new, y), path, **same)
    assert written == [3, 4, 5]
    fresh = ifunc.build_index(loss, params, (x_new, y), tmp_path / "fresh.h5", **same)
    assert torch.equal(resumed.matrix(), fresh.matrix())
    before = _untouched(path)  # finished: its chunk 1 is still checked
    with pytest.raises(ValueError, match="chunk 1 of the training data differs"):
        ifunc.build_index(loss, params, (changed(x, 4), y), path, **same)
    assert _untouched(path) == before


def test_overwrite_replaces_an_index_with_the_new_run(tmp_path):
    params, loss, data, same = index_problem()
    path = tmp_path / "i.h5"
    ifunc.build_index(loss, params, data, path, **same)
    before = sha(path)
    with pytest.raises(ValueError, match=r"different run \(.*projection\.seed"):
        ifunc.build_index(loss, params, data, path, seed=7, **same)
    assert sha(path) == before
    replaced = ifunc.build_index(loss, params, data, path, seed=7, overwrite=True, **same)
    fresh = ifunc.build_index(loss, params, data, tmp_path / "fresh.h5", seed=7, **same)
    assert ifunc.open_index(path).projection == fresh.projection and fresh.projection.seed == 7
    assert torch.equal(replaced.matrix(), fresh.matrix()) and sha(path) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.h5", "i.h5"]  # no *.tmp left


HOLD_INDEX = """
import logging, sys, time
from pathlib import Path
import torch
import ifunc
from ifunc.testing import mlp_problem
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
out, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
model, params, loss, train = mlp_problem(seed=1, sizes=(3, 5, 3), n=15)
written = [0]

class Count(logging.Handler):
    def emit(self, record):
        written[0] += "written" in record.getMessage()

logging.getLogger("ifunc").addHandler(Count())
logging.getLogger("ifunc").setLevel(logging.INFO)

def train_loss(p, b):  # pauses in the third chunk, holding the file open for writing
    if written[0] == 2 and not ready.exists():
        ready.touch()
        end = time.monotonic() + 240
        while not go.exists() and time.monotonic() < end:
            time.sleep(0.02)
    return loss(p, b)

ifunc.build_index(train_loss, params, train, out, model=model, modules=["2"], layer_size=2, dense_size=6,
                  chunk_size=3, identity="held index", progress=False)
"""


@pytest.mark.skipif(NO_LOCKS, reason="HDF5 file locking is disabled (HDF5_USE_FILE_LOCKING=FALSE)")
def test_an_index_another_process_is_building_is_neither_joined_replaced_nor_read(tmp_path):
    params, loss, data, same = index_problem()
    path, script = tmp_path / "i.h5", tmp_path / "hold.py"
    script.write_text(HOLD_INDEX)
    ready, go = tmp_path / "ready", tmp_path / "go"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), str(ready), str(go)], stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 240
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > end:
                child.kill()
                pytest.fail(f"the index writer did not get ready: {child.communicate()[1][-3000:]}")
            time.sleep(0.05)
        before = _untouched(path)
        for overwrite in (False, True):
            with pytest.raises(BlockingIOError, match=r"another process is writing .*i\.h5"):
                ifunc.build_index(loss, params, data, path, identity="held index", overwrite=overwrite, **same)
        with pytest.raises(BlockingIOError, match="another process is writing"):
            ifunc.open_index(path)
        assert _untouched(path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hold.py", "i.h5", "ready"]  # no *.tmp left
    finally:
        go.touch()
        _, err = child.communicate(timeout=240)
    assert child.returncode == 0, err[-3000:]
    fresh = ifunc.build_index(loss, params, data, tmp_path / "fresh.h5", **same)
    assert torch.equal(ifunc.open_index(path).matrix(), fresh.matrix())  # the writer's build, whole
