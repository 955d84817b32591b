"""The docs build exactly as README.md and CONTRIBUTING.md tell users to build them, with no warning at all.

``mkdocs build --strict`` (``strict: true`` is also in ``mkdocs.yml``, so ``mkdocs serve`` behaves the same) runs
without ``-q``, so every WARNING line reaches the output and fails the test, not only a non-zero exit code.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
COMMAND = "mkdocs build --strict"  # the command README.md and CONTRIBUTING.md give


def test_the_docs_command_is_the_one_users_are_told_to_run():
    for name in ("README.md", "CONTRIBUTING.md"):
        assert COMMAND in (ROOT / name).read_text(encoding="utf-8"), f"{name} no longer says `{COMMAND}`"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    missing = [page for page in pages if f" {page}" not in nav]
    assert not missing, f"docs pages missing from the mkdocs.yml nav: {missing}"


@pytest.mark.slow
def test_docs_build_strict_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", *COMMAND.split(), "-d", str(site)],  # run in the checkout, as a user does
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    warnings = [line for line in output.splitlines() if re.match(r"\s*WARNING\b", line)]
    assert not warnings, "\n".join(warnings)
    assert (site / "api" / "index.html").exists()
    for page in ("conventions", "methods", "troubleshooting", "benchmarks"):
        assert (site / page / "index.html").exists()
