"""torch.distributed: two gloo ranks under torchrun give the single-process factors and scores."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import ifunc
from ifunc import distributed
from ifunc import store as score_store
from ifunc.testing import rel_error

from . import distributed_worker

HERE = Path(__file__).parent
ROOT = HERE.parent


def _torchrun(script, *args, nproc=2, timeout=240):
    """``python -m torch.distributed.run --nproc-per-node=2`` on CPU, one thread per rank, a free port."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    cmd = [
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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    """The worker's results on two ranks; under pytest-xdist one launch serves every xdist worker."""
    from filelock import FileLock  # a dependency of torch

    base = tmp_path_factory.getbasetemp()
    out = (base.parent if hasattr(request.config, "workerinput") else base) / "two_ranks"
    with FileLock(str(out) + ".lock"):
        if not all((out / f"rank{r}.pt").exists() for r in range(2)):
            out.mkdir(exist_ok=True)
            run = _torchrun(HERE / "distributed_worker.py", out)
            assert run.returncode == 0, run.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return distributed_worker.compute(tmp_path_factory.mktemp("one"))
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_factors_equal_single_process(two_ranks, one_process, curvature):
    keys = [k for k in one_process if k.startswith(curvature + "/")]
    assert keys
    for rank, res in enumerate(two_ranks):
        assert res[f"n_{curvature}"] == one_process[f"n_{curvature}"] == 30
        for k in keys:
            assert rel_error(res[k], one_process[k]) < 1e-6, (rank, k)
    for k in keys:  # every rank holds the same statistics, bit for bit
        assert torch.equal(two_ranks[0][k], two_ranks[1][k]), k


@pytest.mark.slow
@pytest.mark.parametrize(
    "what",
    [
        "scores/ekfac",
        "scores/cg",
        "self/ekfac",
        "self/cg",
        "store/cg",
        "scores/explicit",
        "scores/arnoldi",
        "scores/nystrom",
        "scores/lissa",
    ],
)
def test_scores_equal_single_process(two_ranks, one_process, what):
    expected = one_process[what]
    assert expected.shape == ((4, 30) if "scores" in what or "store" in what else (30,))
    for res in two_ranks:
        np.testing.assert_allclose(res[what].double().numpy(), expected.double().numpy(), rtol=1e-5, atol=1e-6)


def test_hooks_are_the_identity_without_a_process_group():
    assert distributed.world() == (0, 1) and not distributed.active()
    x = torch.arange(3.0)
    assert distributed.reduce_sum([x, 0.0])[0] is x and distributed.reduce_count(7) == 7
    assert [m for m, _ in distributed.shard(range(3))] == [True] * 3
    assert distributed.owner_map([1, 2], lambda v: (torch.tensor(v),), None)[1][0] == 2


KILLED = textwrap.dedent("""
    import logging, os, signal, sys
    import torch
    import ifunc
    from distributed_worker import problem
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    logging.basicConfig(filename=f"{sys.argv[2]}.rank{rank}", level=logging.INFO, format="%(message)s")
    model, params, loss, train, query = problem()
    written = [0]

    def train_loss(p, b):                         # rank 1 dies computing its 3rd chunk on the first run
        if sys.argv[3] == "kill" and rank == 1 and written[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss(p, b)

    class Count(logging.Handler):
        def emit(self, record):
            written[0] += "written" in record.getMessage()

    logging.getLogger("ifunc").addHandler(Count())
    ihvp = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
    ifunc.attribute(train_loss, params, ihvp, train, query, measurement=loss, chunk_size=3, out=sys.argv[1],
                    progress=False)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_killed_rank_resumes_without_recomputing_finished_chunks(tmp_path):
    script, store, log = tmp_path / "killed.py", tmp_path / "scores.h5", tmp_path / "run.log"
    script.write_text(KILLED)
    first = _torchrun(script, store, log, "kill")
    assert first.returncode != 0
    parts = [score_store.part_path(store, r, 2) for r in range(2)]
    done = []
    for part in parts:
        with h5py.File(part, "r") as f:
            done.append(set(np.nonzero(f["done"][...])[0].tolist()))
    assert done[1] == {0, 1}, done  # rank 1's finished chunks survived its death
    assert not store.exists()
    first_logs = [Path(f"{log}.rank{r}").read_text() for r in range(2)]

    second = _torchrun(script, store, log, "resume")
    assert second.returncode == 0, second.stderr[-4000:]
    for r, part in enumerate(parts):
        new = Path(f"{log}.rank{r}").read_text()[len(first_logs[r]) :]
        redone = {
            int(line.split()[2].split("/")[0]) - 1
            for line in new.splitlines()
            if "written" in line and part.name in line
        }
        assert redone == set(range(5 if r == 0 else 5)) - done[r], (r, new)  # 10 chunks: 5 per rank
        assert not part.exists()  # merged into the store, then removed
    logs = [Path(f"{log}.rank{r}").read_text() for r in range(2)]
    third = _torchrun(script, store, log, "resume")  # the store is complete: nothing is computed or copied
    assert third.returncode == 0, third.stderr[-4000:]
    assert all("written" not in Path(f"{log}.rank{r}").read_text()[len(logs[r]) :] for r in range(2))

    model, params, loss, train, query = distributed_worker.problem()
    ihvp = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
    expected = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=3)
    np.testing.assert_allclose(ifunc.load_scores(store), expected.numpy(), rtol=1e-5, atol=1e-6)


SPLIT_BY_HAND = textwrap.dedent("""
    import torch
    import ifunc
    from distributed_worker import problem
    torch.distributed.init_process_group("gloo")
    torch.set_default_dtype(torch.float64)
    model, params, loss, train, query = problem()
    mine = train[torch.distributed.get_rank()::2]          # what a DistributedSampler would hand each rank
    try:
        ifunc.ihvp_cg(loss, params, mine, damping=0.1)
    except ValueError as err:
        print("refused:", err)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_ranks_holding_different_data_are_refused(tmp_path):
    script = tmp_path / "split.py"
    script.write_text(SPLIT_BY_HAND)
    run = _torchrun(script)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("refused:") == 2 and "same, complete data" in run.stdout, run.stdout
