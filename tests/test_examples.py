"""The scripts in examples/ run (smoke test; CI runs this)."""
import pathlib
import runpy

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, capsys):
    pytest.importorskip("sklearn")
    runpy.run_path(str(path), run_name="__main__")
    assert "total" in capsys.readouterr().out
