"""Building and reopening a gradient index: exact projected gradients, chunking, kill-and-resume, refusals."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import ifunc
from ifunc.index import build_index, open_index, project_flat
from ifunc.testing import mlp_problem

ROOT = Path(__file__).resolve().parent.parent
SIZES: dict[str, Any] = {"layer_size": 2, "dense_size": 6}
#: how the index is built: every layer captured; one layer captured and one dense; no model (all dense); exclusion
CASES = {
    "layers": lambda model: {"model": model},
    "layer+dense": lambda model: {"model": model, "modules": ["2"]},
    "no model": lambda model: {},
    "excluded": lambda model: {"model": model, "exclude": ["0.bias"]},
}


def problem(dtype=torch.float64, activation: Any = nn.Tanh):
    """A 3-5-3 MLP (``mlp_problem``, seed 0) with 20 examples; another ``activation`` keeps the parameter values."""
    return mlp_problem(seed=0, sizes=(3, 5, 3), n=20, dtype=dtype, activation=activation)


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a store but its metadata: the rows, which chunks are done, fingerprints, checksums."""
    with h5py.File(path, "r") as f:
        return {k: np.asarray(f[k]) for k in ("scores", "done", "fingerprints", "checksums")}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_rows_are_the_projected_per_example_gradients(tmp_path, case, dtype):
    model, params, loss, train = problem(dtype)
    index = build_index(
        loss, params, train, tmp_path / "i.h5", chunk_size=6, progress=False, **SIZES, **CASES[case](model)
    )
    assert (index.n, index.chunk, index.meta["kind"]) == (20, 6, "gradient index")
    P = index.projection
    assert index.dim == P.dim and P == open_index(index.path).projection
    assert [L.name for L in P.layers] == {
        "layers": ["0", "2"],
        "layer+dense": ["2"],
        "no model": [],
        "excluded": ["0", "2"],
    }[case]
    if case == "excluded":
        assert P.excluded == ("0.bias",) and P.layers[0].bias is None
    exact = project_flat(P, ifunc.per_sample_grads(loss, params, train), params)  # vmap(grad), then projected
    rows = index.matrix()
    assert rows.dtype == torch.float32 and rows.shape == (20, P.dim)
    torch.testing.assert_close(rows, exact.float(), rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    assert [(o, len(r)) for o, r in index.chunks()] == [(0, 6), (6, 6), (12, 6), (18, 2)]


def test_chunking_does_not_change_the_rows_and_a_finished_index_is_not_recomputed(tmp_path):
    model, params, loss, train = problem()
    calls = []
    counting = lambda p, b: (calls.append(1), loss(p, b))[1]  # noqa: E731
    rows = {
        c: build_index(counting, params, train, tmp_path / f"{c}.h5", model=model, chunk_size=c, **SIZES).matrix()
        for c in (3, 7, None)
    }
    for c in (7, None):
        torch.testing.assert_close(rows[c], rows[3], rtol=1e-6, atol=1e-7)
    calls.clear()
    again = build_index(counting, params, train, tmp_path / "3.h5", model=model, **SIZES)  # adopts chunk 3
    assert calls == [] and again.chunk == 3 and torch.equal(again.matrix(), rows[3])


def test_another_seed_size_params_loss_or_model_is_refused_and_the_file_left_untouched(tmp_path):
    model, params, loss, train = problem()
    path = tmp_path / "i.h5"
    build_index(loss, params, train, path, model=model, chunk_size=5, **SIZES)
    before = path.read_bytes()
    relu_model, relu_params, relu_loss, _ = problem(activation=nn.ReLU)  # same parameter values, another forward
    moved = {k: v + 0.01 for k, v in params.items()}
    scaled = lambda p, b: 2 * loss(p, b)  # noqa: E731
    refused = {
        "projection.seed": dict(loss=loss, params=params, model=model, seed=1),
        "projection.k_dense": dict(loss=loss, params=params, model=model, modules=["2"]),
        "params": dict(loss=loss, params=moved, model=model),
        "defined_by.loss": dict(loss=scaled, params=params, model=model),
        "defined_by.model": dict(loss=relu_loss, params=relu_params, model=relu_model),
    }
    for what, kw in refused.items():
        with pytest.raises(ValueError, match=rf"different run \(.*{what}"):
            build_index(train=train, out=path, chunk_size=5, **{**SIZES, **kw})
    assert path.read_bytes() == before
    build_index(scaled, params, train, path, model=model, overwrite=True, **SIZES)
    assert path.read_bytes() != before


def test_open_index_refuses_unfinished_foreign_and_damaged_files(tmp_path):
    model, params, loss, (x, y) = problem()

    fail = [True]

    def failing(p, b):  # fails in the third chunk while `fail[0]`: two chunks are on disk
        if fail[0] and b[0].shape[0] == 4 and torch.equal(b[0], x[8:12]):
            raise RuntimeError("stop")
        return loss(p, b)

    path, same = tmp_path / "i.h5", {"model": model, "chunk_size": 4, "identity": "mlp, failing loss", **SIZES}
    with pytest.raises(RuntimeError, match="stop"):
        build_index(failing, params, (x, y), path, **same)
    with pytest.raises(ValueError, match=r"unfinished gradient index \(3 of 5 chunks missing\).*re-run"):
        open_index(path)
    scores = ifunc.attribute(loss, params, ifunc.ihvp_identity(params), (x, y), (x[:2], y[:2]), out=tmp_path / "s.h5")
    with pytest.raises(ValueError, match="score store .* but not a gradient index"):
        open_index(scores)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match="not an ifunc score store"):
        open_index(tmp_path / "foreign.h5")
    fail[0] = False
    index = build_index(failing, params, (x, y), path, **same)  # resumes, then finishes
    assert len(list(index.chunks())) == 5
    with h5py.File(path, "r") as f:
        at = f["scores"].id.get_offset() + 4 * (index.n * 1 + 9)  # row 1, column 9: chunk 2
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.float32(123.0).tobytes())
    with pytest.raises(ValueError, match=r"chunk 2 \(examples 8\.\.11\) fails its checksum"):
        index.matrix()


CHILD = textwrap.dedent("""
    import logging, os, signal, sys
    import torch
    from ifunc.index import build_index
    from ifunc.testing import mlp_problem
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    logging.basicConfig(filename=sys.argv[2], level=logging.INFO, format="%(message)s")
    armed = [False]

    class Arm(logging.Handler):                       # arm once chunk number `kill_after` is on disk
        def emit(self, record):
            armed[0] = armed[0] or f"chunk {sys.argv[3]}/" in record.getMessage()

    logging.getLogger("ifunc").addHandler(Arm())
    model, params, loss, train = mlp_problem(seed=0, sizes=(3, 5, 3), n=20)
    def train_loss(p, b):
        if armed[0]:
            os.kill(os.getpid(), signal.SIGKILL)      # die in the middle of the next chunk
        return loss(p, b)
    build_index(train_loss, params, train, sys.argv[1], model=model, modules=["2"], chunk_size=2, layer_size=2,
                dense_size=6, progress=False)
""")


def test_a_killed_build_resumes_to_the_same_bits_without_recomputing_finished_chunks(tmp_path):
    script, path, log = tmp_path / "child.py", tmp_path / "i.h5", tmp_path / "run.log"
    script.write_text(CHILD)

    def run(kill_after):
        cmd = [sys.executable, str(script), str(path), str(log), str(kill_after)]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))
        )

    killed = run(5)  # killed while computing the 6th of 10 chunks
    assert killed.returncode == -9, killed.stderr
    assert datasets(path)["done"].tolist() == [1] * 5 + [0] * 5
    with pytest.raises(ValueError, match=r"unfinished gradient index \(5 of 10 chunks missing\)"):
        open_index(path)
    first = log.read_text()
    resumed = run("never")
    assert resumed.returncode == 0, resumed.stderr
    second = log.read_text()[len(first) :]
    assert [line.split()[2] for line in second.splitlines() if "written" in line] == [f"{i}/10" for i in range(6, 11)]

    torch.set_num_threads(1)
    model, params, loss, train = problem()
    whole = build_index(loss, params, train, tmp_path / "whole.h5", model=model, modules=["2"], chunk_size=2, **SIZES)
    got, want = datasets(path), datasets(whole.path)
    for k in want:
        assert np.array_equal(got[k], want[k]), k  # bit for bit, fingerprints and checksums included
    assert open_index(path).projection == whole.projection
