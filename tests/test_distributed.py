"""torch.distributed: two gloo ranks under torchrun give the single-process factors and scores.

Crossed with the dtypes users use: a float32 model in a float32 process (torch's default) and a float64 model
(``.double()``) in that same float32 process, for every Kronecker method and the operator-based ones. One torchrun
launch (tests/distributed_worker.py) computes all of it; the one-process reference runs while it does.
Tolerances, relative (‖got − expected‖ / ‖expected‖): float32 1e-4, float64 1e-9 (measured: ≤ 2.1e-6 and
≤ 5.5e-13, the largest for an eigenbasis in float32 and for CG's tolerance-stopped solve in float64); the ranks
agree with each other bit for bit.
"""

import contextlib
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import ifunc
from ifunc import distributed
from ifunc import store as score_store
from ifunc.testing import rel_error

from . import distributed_killed, distributed_worker
from .distributed_worker import DTYPES, FACTOR_FIELDS, METHODS, SELF

HERE = Path(__file__).parent
ROOT = HERE.parent
TOL = {"float32": 1e-4, "float64": 1e-9}


def _command(script, *args, nproc=2) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node=2`` on a free port, no restarts."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        "--max-restarts=0",
        str(script),
        *map(str, args),
    ]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))


def _torchrun(script, *args, nproc=2, timeout=240):
    """Run ``script`` on ``nproc`` CPU ranks (one thread each) and wait for it."""
    return subprocess.run(
        _command(script, *args, nproc=nproc), capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT
    )


@contextlib.contextmanager
def _as_a_user():
    """torch's own default dtype (float32), as in the processes torchrun starts (conftest sets float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# The tests with launches of their own come first: pytest-xdist hands out consecutive tests, so one worker runs
# them while another makes the shared launch below.


def _written(text: str, part: str) -> set[int]:
    """Local chunk indices a rank's log says it wrote to its part file (lines ``... written i/n ... part``)."""
    return {int(line.split()[2].split("/")[0]) - 1 for line in text.splitlines() if "written" in line and part in line}


@pytest.mark.slow
def test_killed_rank_resumes_without_recomputing_finished_chunks(tmp_path):
    """Default settings, float32: the default chunk size is the same on the relaunch, so finished chunks hold."""
    script, store, log = HERE / "distributed_killed.py", tmp_path / "scores.h5", tmp_path / "run.log"
    first = _torchrun(script, store, log, "kill")
    assert first.returncode != 0
    parts = [score_store.part_path(store, r, 2) for r in range(2)]
    done = []
    for part in parts:
        with h5py.File(part, "r") as f:
            flags = f["done"]
            assert isinstance(flags, h5py.Dataset)
            done.append(set(np.nonzero(flags[...])[0].tolist()))
    assert done[1] == {0, 1}, done  # rank 1's finished chunks survived its death
    assert not store.exists()
    first_logs = [Path(f"{log}.rank{r}").read_text() for r in range(2)]

    second = _torchrun(script, store, log, "resume")
    assert second.returncode == 0, second.stderr[-4000:]
    for r, (part, local) in enumerate(zip(parts, [4, 3])):  # 7 chunks of at most MAX_CHUNK: 4 on rank 0, 3 on rank 1
        new = Path(f"{log}.rank{r}").read_text()[len(first_logs[r]) :]
        assert _written(new, part.name) == set(range(local)) - done[r], (r, new)
        assert not part.exists()  # merged into the store, then removed

    with _as_a_user():
        model, params, loss, train, query = distributed_killed.problem()
        ihvp = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
        expected = ifunc.attribute(loss, params, ihvp, train, query, progress=False)
    got = torch.from_numpy(ifunc.load_scores(store))
    assert got.shape == (4, distributed_killed.N) and rel_error(got, expected) < TOL["float32"]


def _example() -> dict:
    """The functions of examples/distributed_scores.py (run as a module, not as ``__main__``)."""
    return runpy.run_path(str(ROOT / "examples" / "distributed_scores.py"))


@pytest.mark.slow
def test_documented_example_runs_under_torchrun_in_float32(tmp_path):
    """``torchrun --nproc-per-node=2 examples/distributed_scores.py --out scores.h5``, as docs/distributed.md says."""
    pytest.importorskip("sklearn")
    store = tmp_path / "scores.h5"
    run = _torchrun(ROOT / "examples" / "distributed_scores.py", "--out", store)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "2 rank(s): scores (8, 1200)" in run.stdout, run.stdout
    assert not list(tmp_path.glob("scores.h5.rank*"))  # merged, then removed
    scores = torch.from_numpy(ifunc.load_scores(store))
    assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    printed = [list(map(int, m)) for m in re.findall(r"training images \[(\d+), (\d+), (\d+)\]", run.stdout)]
    assert printed == [scores[q].topk(3).indices.tolist() for q in range(3)]

    example = _example()  # the same script in one process: the same model (one thread), float32 throughout
    with _as_a_user():
        x, y, xq, yq = example["digits"]()
        model = example["train"](x, y)
        assert next(model.parameters()).dtype == torch.float32
        batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]
        expected = example["influence"](model, batches, (xq[:8], yq[:8]))
    assert rel_error(scores, expected) < TOL["float32"]


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """``(per-rank results, one-process results)`` of the worker; one launch serves every xdist worker."""
    from filelock import FileLock  # a dependency of torch

    base = tmp_path_factory.getbasetemp()
    out = (base.parent if hasattr(request.config, "workerinput") else base) / "two_ranks"
    with FileLock(str(out) + ".lock"):
        if not (out / "one.pt").exists():
            (out / "one").mkdir(parents=True, exist_ok=True)
            cmd = _command(HERE / "distributed_worker.py", out)
            run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
            try:
                with _as_a_user():  # the reference, computed while the two ranks run
                    one = distributed_worker.compute_all(out / "one")
            finally:
                _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-4000:]
            torch.save(one, out / "one.pt")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], torch.load(out / "one.pt")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_factors_equal_single_process(launched, dtype, curvature):
    ranks, one = launched
    keys = [k for k in one if k.startswith(f"{dtype}/{curvature}/")]
    assert len(keys) == 2 * len(FACTOR_FIELDS)  # two layers
    for res in ranks:
        assert res[f"{dtype}/n_{curvature}"] == one[f"{dtype}/n_{curvature}"] == 30
        for k in keys:  # eigen_dtype's default is the params' precision: every field in the params' dtype
            assert res[k].dtype == one[k].dtype == DTYPES[dtype], k
            assert rel_error(res[k].double(), one[k].double()) < TOL[dtype], k
    for k in keys:  # every rank holds the same factors, bit for bit
        assert torch.equal(ranks[0][k], ranks[1][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_with_one_input_share_its_decomposition_across_ranks(launched, dtype):
    """``left`` and ``right`` read the same input: one rank decomposes their ``A``, the other rank's layer takes it."""
    ranks, one = launched
    for res in (*ranks, one):
        for field in ("A", "eig_A", "Q_A"):
            assert torch.equal(res[f"{dtype}/shared/left/{field}"], res[f"{dtype}/shared/right/{field}"]), field
        assert not torch.equal(res[f"{dtype}/shared/left/S"], res[f"{dtype}/shared/right/S"])
    for k in [k for k in one if k.startswith(f"{dtype}/shared/")]:
        assert rel_error(ranks[0][k].double(), one[k].double()) < TOL[dtype], k
        assert torch.equal(ranks[0][k], ranks[1][k]), k


SCORES = {
    **{f"scores/{m}": (4, 30) for m in METHODS},
    **{f"self/{m}": (30,) for m in SELF},
    "modules/ekfac": (2, 4, 30),  # per_module=True
    "lowrank/ekfac": (4, 30),  # query_rank=2
    "store/ekfac": (4, 30),  # per-rank stores merged by rank 0
    "store/cg": (4, 30),
    "store/index": (30, 10),  # a gradient index (build_index): rows [n, dim], per-rank parts merged by rank 0
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("what", SCORES)
def test_scores_equal_single_process(launched, dtype, what):
    ranks, one = launched
    key = f"{dtype}/{what}"
    expected = one[key]
    assert expected.shape == SCORES[what]
    # stores hold float32 whatever the params' dtype; in memory the scores follow the params
    assert expected.dtype == (torch.float32 if what.startswith("store/") else DTYPES[dtype])
    for res in ranks:
        assert res[key].dtype == expected.dtype
        assert rel_error(res[key].double(), expected.double()) < TOL[dtype], key
    assert torch.equal(ranks[0][key], ranks[1][key])


@pytest.mark.slow
def test_worker_covers_every_case(launched):
    ranks, one = launched
    fits = ("ggn", "fisher", "n_ggn", "n_fisher", "shared")  # factors, compared by the tests above
    scored = {k.split("/", 1)[1] for k in one if k.split("/")[1] not in fits}
    kinds = {f"{kind}/{m}" for kind in ("bf16", "written", "rewritten", "topk") for m in ("ekfac", "cg")}
    assert scored == set(SCORES) | kinds | {"topk/index"}
    assert set(ranks[0]) == set(one) | {"refused", "params_refused", "collectives"}


@pytest.mark.slow
def test_a_complete_store_is_neither_recomputed_nor_copied(launched):
    """Rerunning a finished ``attribute(..., out=)`` writes no chunk (its scores, read after, are compared above)."""
    ranks, one = launched
    for res in [*ranks, one]:
        assert all(res[f"{d}/written/{m}"] >= 4 for d in DTYPES for m in ("ekfac", "cg"))  # 8 chunks, 4 a rank
        assert [res[f"{d}/rewritten/{m}"] for d in DTYPES for m in ("ekfac", "cg")] == [0, 0, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ekfac", "cg"])
def test_bfloat16_contraction_equals_single_process(launched, method):
    """``attribute(..., dtype=torch.bfloat16)`` (a documented option) gathers bfloat16 columns across ranks."""
    ranks, one = launched
    expected = one[f"float32/bf16/{method}"]
    assert expected.dtype == torch.bfloat16
    for res in ranks:
        got = res[f"float32/bf16/{method}"]
        assert got.dtype == torch.bfloat16 and rel_error(got.double(), expected.double()) < 1e-2


@pytest.mark.slow
def test_top_k_sink_gives_every_rank_a_stable_sort_of_the_full_matrix(launched):
    """Each rank keeps the best 5 of its own chunks (of the data or of an index); the ranks' candidates all-gathered."""
    for key in (f"{dtype}/topk/{method}" for dtype in DTYPES for method in ("ekfac", "cg", "index")):
        got = [res[key] for res in [*launched[0], launched[1]]]
        assert all(torch.equal(g[k], g[f"sorted_{k}"]) for g in got for k in g if not k.startswith("sorted")), key
        assert all(torch.equal(got[0][k], got[1][k]) for k in got[0]), key  # the ranks bit for bit
        assert all(torch.equal(got[0][k], got[2][k]) for k in got[0] if "indices" in k), key  # = one process


@pytest.mark.slow
def test_collectives_take_the_owners_dtype_and_name_disagreements(launched):
    ranks, _ = launched
    for res in ranks:
        c = res["collectives"]
        for item in c["owner_map"]:  # placeholders in the other dtype: the owner's values and dtypes everywhere
            assert item[0].dtype == torch.float64 and torch.equal(item[0], torch.full((3,), 1.5, dtype=torch.float64))
            assert item[1].dtype == torch.float32 and torch.equal(item[1], torch.full((2, 2), 2.5, dtype=torch.float32))
        assert re.search(r"zeros standing in for 'layer0'.*\[\[\(3,\)\], \[\(4,\)\]\]", c["owner_map_shape"])
        assert re.search(
            r"layer '0' statistic A \(rank 0: torch.float32 \[3\], rank 1: torch.float64 \[3\]\); "
            r"every rank must hold the same parameters in the same dtype",
            c["reduce_sum"],
        )
        assert re.search(
            r"score columns .*rank 0: torch.float32 \[2\], rank 1: torch.float32 \[3\]", c["gather_columns"]
        )
        assert re.search(r"tensor 0 broadcast from rank 0 .*\[4, 3\].*\[5, 3\].*same query data", c["broadcast"])
        assert c["gather_rows"].dtype == torch.float64  # not the process's default float32
        assert torch.equal(c["gather_rows"], torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.slow
def test_ranks_holding_different_data_are_refused(launched):
    ranks, _ = launched
    for res in ranks:  # every rank is told, none waits forever
        assert "same, complete data" in res["refused"], res["refused"]


@pytest.mark.slow
def test_ranks_holding_different_parameters_are_refused(launched):
    ranks, _ = launched
    for res in ranks:  # every rank is told, none waits forever; the message shows each rank's dtypes
        for case, message in res["params_refused"].items():
            assert "different data or parameters" in message and "same parameters" in message, (case, message)
        assert (
            "torch.float64" in res["params_refused"]["dtype/cg"]
            and "torch.float32" in res["params_refused"]["dtype/cg"]
        )


def test_hooks_are_the_identity_without_a_process_group():
    assert distributed.world() == (0, 1) and not distributed.active()
    x = torch.arange(3.0)
    assert distributed.reduce_sum([x, 0.0])[0] is x and distributed.reduce_count(7) == 7
    assert distributed.owner_map([1, 2], lambda v: (torch.tensor(v),), lambda v: (), [0, 0])[1][0] == 2
    assert torch.equal(distributed.gather_columns([x[None]], [3], [0]), x[None])
    assert distributed.broadcast_from_rank0({"a": x})["a"] is x
    rows = torch.ones(2, 3, dtype=torch.float32)
    assert distributed.gather_rows(rows, [2], 3) is rows
