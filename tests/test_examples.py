"""The scripts in examples/ run as a user runs them: ``python examples/NAME.py`` (CI runs this)."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    # a fresh interpreter: no test-suite defaults (float64, thread count) leak into the example
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
