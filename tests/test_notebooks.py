"""Every notebook in notebooks/ runs top to bottom and shows its figures (CI runs this; a broken notebook fails it).

The kernel runs with matplotlib's inline backend, the one Jupyter uses, so a figure a notebook draws becomes an
``image/png`` output; a notebook that imports matplotlib must produce one, both when executed here and in the
copy stored in the repository (the one a reader sees without running it).
"""

from __future__ import annotations

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _draws(cells) -> bool:
    """Whether any code cell imports matplotlib."""
    return any(cell["cell_type"] == "code" and "matplotlib" in "".join(cell["source"]) for cell in cells)


def _figures(cells) -> int:
    """Number of ``image/png`` outputs in ``cells``."""
    return sum("image/png" in out.get("data", {}) for cell in cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_shows_its_figures(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    if _draws(cells):
        assert _figures(cells) > 0, f"{path.name} draws with matplotlib but is stored without a figure: rerun it"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: small matrices, shared cores
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel then picks the inline backend, as Jupyter does
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    if _draws(notebook.cells):
        assert _figures(notebook.cells) > 0, f"{path.name} drew no figure"
