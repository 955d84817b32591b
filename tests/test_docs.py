"""The docs build exactly as README.md and CONTRIBUTING.md tell users to build them, and read as a user reads them.

``mkdocs build --strict`` (``strict: true`` is also in ``mkdocs.yml``, so ``mkdocs serve`` behaves the same) runs
without ``-q``, so every WARNING line reaches the output and fails the test, not only a non-zero exit code. The API
page renders the package's docstrings, written with reStructuredText markup, through the griffe extension in
``docs/docstring_markup.py``: its rewriting is tested here line by line, and the built page is checked for any
markup left raw. The front door (README, docs, changelog, notebooks, benchmark and package sources, the demo's
``--help``) stands alone: no pointer to files outside the repository or to internal issue numbers.
"""

from __future__ import annotations

import pathlib
import re
import runpy
import subprocess
import sys
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).parent.parent
COMMAND = "mkdocs build --strict"  # the command README.md and CONTRIBUTING.md give
RAW_MARKUP = re.compile(r":(func|class|meth|mod|data|attr|exc):|``|\{[A-Z_]{3,}\}")  # roles, literals, placeholders


def test_the_docs_command_is_the_one_users_are_told_to_run():
    for name in ("README.md", "CONTRIBUTING.md"):
        assert COMMAND in (ROOT / name).read_text(encoding="utf-8"), f"{name} no longer says `{COMMAND}`"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    missing = [page for page in pages if f" {page}" not in nav]
    assert not missing, f"docs pages missing from the mkdocs.yml nav: {missing}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(output, site directory)`` of one strict build of the checkout, shared by the tests that read it."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run(
        [sys.executable, "-m", *COMMAND.split(), "-d", str(site)],  # run in the checkout, as a user does
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output, site


@pytest.mark.slow
def test_docs_build_strict_without_warnings(built):
    output, site = built
    warnings = [line for line in output.splitlines() if re.match(r"\s*WARNING\b", line)]
    assert not warnings, "\n".join(warnings)
    assert (site / "api" / "index.html").exists()
    for page in ("conventions", "methods", "troubleshooting", "benchmarks"):
        assert (site / page / "index.html").exists()
    assert not list(site.rglob("*.py")), "the docs folder's griffe extension was copied into the site"


@pytest.mark.slow
def test_api_page_renders_no_restructuredtext(built):
    html = (built[1] / "api" / "index.html").read_text(encoding="utf-8")
    raw = [html[max(0, m.start() - 60) : m.end() + 40] for m in RAW_MARKUP.finditer(html)]
    assert not raw, f"{len(raw)} raw markup left on the API page, e.g.\n" + "\n---\n".join(raw[:5])
    assert not re.search(r"::\s*</p>", html), "a reStructuredText '::' ends a paragraph of the API page"
    # roles naming documented functions became links: ihvp_ekfac's arguments (filled in at import) point to call()
    ekfac = html[html.index('id="ifunc.ihvp.kronecker.methods.ihvp_ekfac"') :]
    ekfac = ekfac[: ekfac.index('id="ifunc.ihvp.kronecker.methods.ihvp_kfac"')]
    assert 'href="#ifunc.functional.call"' in ekfac
    assert 'href="#ifunc.attribute.attribute"' in html  # the function ifunc.attribute, not the module


# ------------------------------------------------------------------------------------- the extension, line by line
def _load_markup():
    """The extension module's names, run from its file (the docs folder is not a package)."""
    return types.SimpleNamespace(**runpy.run_path(str(ROOT / "docs" / "docstring_markup.py")))


PACKAGE = {
    "__init__.py": "from demo.core import solve\n",
    "core.py": "def solve():\n    '''Solve.'''\n\n\nclass Thing:\n    '''A thing.'''\n\n    def run(self):\n"
    "        '''Run.'''\n",
}


@pytest.fixture(scope="module")
def markup():
    pytest.importorskip("griffe")
    return _load_markup()


@pytest.fixture(scope="module")
def rewrite(markup):
    """``rewrite(text)``: the extension's rewriting of a docstring of ``demo.core.Thing``, ``demo.core.solve`` shown."""
    griffe = pytest.importorskip("griffe")
    with griffe.temporary_visited_package("demo", PACKAGE) as pkg:
        owner, documented = pkg["core.Thing"], {"demo.core.solve"}
        yield lambda text: markup.rewrite(text, owner, pkg.modules_collection, documented)


def test_a_role_naming_a_documented_object_is_a_cross_reference(rewrite):
    assert rewrite("Uses :func:`~demo.core.solve`.") == "Uses [`solve`][demo.core.solve]."
    assert rewrite("Uses :func:`demo.solve` and :func:`solve`.") == (
        "Uses [`demo.solve`][demo.core.solve] and [`solve`][demo.core.solve]."
    )  # a re-export and a name in scope resolve to where the object is defined


def test_any_other_role_is_a_code_span(rewrite):
    assert rewrite(":meth:`Thing.run`, :class:`~demo.core.Thing`, :class:`OSError`, :mod:`demo`") == (
        "`Thing.run`, `Thing`, `OSError`, `demo`"
    )


def test_literal_block_markers_and_literals(rewrite):
    text = "Then::\n\n    ``(H + λI)^{-1} v``, with :func:`solve`\n\nso ``x`` stays a code span ::\n\n    code\n::\n"
    assert rewrite(text) == "Then:\n\n    (H + λI)^{-1} v, with solve\n\nso ``x`` stays a code span\n\n    code\n\n"


def test_exception_names_lose_their_literal_markup(rewrite):
    text = "Raises:\n  A / B (``ValueError``): when ``x`` is bad\n    and ``y`` too.\n\nExample:\n  ``a``: b"
    assert rewrite(text) == (
        "Raises:\n  A / B (ValueError): when ``x`` is bad\n    and ``y`` too.\n\nExample:\n  ``a``: b"
    )


FRAGMENTS = ["", "text", ":func:`~demo.core.solve` here", "``x`` and :class:`Thing`", "see::", "see ::", "::"]
FRAGMENTS += ["Raises:", "ValueError (``x``): bad", "``(a + b)``,", ":meth:`Thing.run`::"]


@given(st.lists(st.tuples(st.sampled_from([0, 2, 4, 8]), st.sampled_from(FRAGMENTS)), max_size=12))
def test_rewriting_removes_every_role_keeps_the_lines_and_is_idempotent(markup, rewrite, lines):
    text = "\n".join(" " * indent + fragment for indent, fragment in lines)
    once = rewrite(text)
    assert not markup.ROLE.search(once)
    assert len(once.split("\n")) == len(text.split("\n"))
    assert rewrite(once) == once


# --------------------------------------------------------------------------------------------- stands alone
INTERNAL = re.compile(r"PEERS\.md|\bissues? #?\d+|shared/", re.IGNORECASE)
TRACKER = re.compile(
    r"(?<![\w&#/{\"'-])#\d+\b(?!\()"
)  # "(#16)", "see #16"; not "&#39;", "#fff", "page#1" or demo output "#820(3)"


def _front_door():
    yield from (ROOT / name for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md"))
    for folder, pattern in (("docs", "*"), ("notebooks", "*.ipynb"), ("benchmarks", "*.py"), ("ifunc", "*.py")):
        yield from sorted(p for p in (ROOT / folder).rglob(pattern) if p.is_file() and p.suffix != ".png")


def test_the_front_door_names_no_file_outside_the_repository_and_no_internal_issue():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}"
        for path in _front_door()
        if "__pycache__" not in path.parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if INTERNAL.search(line) or (path.suffix == ".md" and TRACKER.search(line))
    ]
    assert not found, "\n".join(found)


def test_demo_help_reads_as_plain_text(capsys):
    from ifunc.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "python -m ifunc demo" in help_text
    assert not RAW_MARKUP.search(help_text), help_text
