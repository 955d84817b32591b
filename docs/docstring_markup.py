"""Griffe extension: the package's reStructuredText docstring markup, rewritten as Markdown for the API page.

ifunc's docstrings use Sphinx markup (roles such as :func:`~ifunc.attribute.attribute`, ``double-backtick``
literals, a ``::`` that opens a literal block); mkdocstrings renders docstrings as Markdown, where that markup shows
up raw. Registered in ``mkdocs.yml`` under the Python handler's ``extensions``, this rewrites every docstring of the
package once it is loaded, before anything is rendered:

- a role becomes a cross-reference when it names an object the API page documents (``docs/api.md``'s ``:::``
  entries and the documented members of their classes), otherwise a code span; ``~a.b.c`` shows ``c``, as in Sphinx;
- ``text::`` at the end of a line becomes ``text:`` (a line holding only ``::`` is dropped): the indented block that
  follows is a code block in Markdown already;
- inside an indented (code) block, double backticks are dropped, since a code block shows its text verbatim;
- a docstring that Python rewrites at import (a decorator filling a ``{PLACEHOLDER}`` line) is taken as Python
  sees it, so the API page shows what ``help()`` shows.

The source files are not changed.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
EXCEPTIONS = re.compile(r"^(\s*)(?:Raises|Warns):\s*$")  # sections whose item heads render as code
PLACEHOLDER = re.compile(r"^\s*\{[A-Z_]+\}\s*$", flags=re.MULTILINE)  # a line a decorator fills at import
API_PAGE = pathlib.Path(__file__).with_name("api.md")
UNRESOLVED = (KeyError, ValueError, griffe.NameResolutionError, griffe.AliasResolutionError, griffe.CyclicAliasError)


def documented_paths(collection: griffe.ModulesCollection, page: pathlib.Path = API_PAGE) -> set[str]:
    """Paths of the objects ``page`` documents: its ``::: path`` entries and their classes' rendered members.

    A class member is rendered (and so gets an anchor) when its name is public and it has a docstring.

    Args:
      collection: the loaded modules, where each ``::: path`` is looked up.
      page: the Markdown page of ``:::`` entries (default ``docs/api.md``).

    Returns:
      The set of dotted paths a cross-reference may point to without breaking a strict build.
    """
    roots = re.findall(r"^:::\s+(\S+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    paths = set(roots)
    for root in roots:
        try:
            obj = collection.get_member(root)
        except UNRESOLVED:
            continue
        if obj.is_class:
            paths.update(
                member.path
                for name, member in obj.members.items()
                if not name.startswith("_") and not member.is_alias and member.docstring is not None
            )
    return paths


def target(owner: griffe.Object, ref: str, collection: griffe.ModulesCollection, module: bool = False) -> str | None:
    """Canonical path of the object ``ref`` names, read in the scope of ``owner`` (``None`` when it names none).

    Unless ``module`` (a ``:mod:`` role), a name that is both a submodule and the function the package re-exports
    under it (``ifunc.attribute``) is the function, as Python binds it.

    Args:
      owner: the object whose docstring holds the reference (its module's imports are in scope).
      ref: the dotted name in the role, ``~`` removed.
      collection: the loaded modules.
      module: whether the role is ``:mod:``.

    Returns:
      The dotted path where the object is defined, or ``None`` (a builtin, a name out of scope).
    """
    head, dot, rest = ref.partition(".")
    try:
        path = ref if head == owner.package.name else owner.resolve(head) + dot + rest
        found = collection.get_member(path)
        canonical = found.canonical_path
    except UNRESOLVED:
        return None
    if found.is_module and not module and "." in path:
        parent, _, name = path.rpartition(".")
        try:
            value = getattr(importlib.import_module(parent), name)
        except (ImportError, AttributeError):
            return canonical
        if not inspect.ismodule(value) and hasattr(value, "__qualname__"):
            return f"{value.__module__}.{value.__qualname__}"
    return canonical


def _role(match: re.Match[str], owner: griffe.Object, collection: Any, documented: set[str], code: bool) -> str:
    kind, tilde, ref = match.group(1), match.group(2), match.group(3).strip()
    shown = ref.rsplit(".", 1)[-1] if tilde else ref
    if code:
        return shown
    path = target(owner, ref, collection, module=kind == "mod")
    return f"[`{shown}`][{path}]" if path in documented else f"`{shown}`"


def _literal_marker(line: str) -> str:
    """``line`` with a closing ``::`` read as reStructuredText reads it: ``text::`` -> ``text:``.

    ``text ::`` becomes ``text``; a line holding only ``::`` becomes empty.
    """
    stripped = line.rstrip()
    if not stripped.endswith("::"):
        return line
    body = stripped[:-2]
    return body.rstrip() if body[-1:].isspace() or not body.strip() else body + ":"


def rewrite(text: str, owner: griffe.Object, collection: Any, documented: set[str]) -> str:
    """``text`` (a docstring) with its reStructuredText markup turned into Markdown, as the module docstring says.

    A line is in a code block when it is indented at least four columns deeper than the paragraph before it and
    follows a blank line (or another code line), as in Markdown. Lines keep their number and order, and rewriting
    twice gives the same text as rewriting once.

    Args:
      text: the docstring, dedented.
      owner: the object it documents (the scope its roles are read in).
      collection: the loaded modules.
      documented: paths a role may link to (:func:`documented_paths`); other roles become code spans.

    Returns:
      The docstring as Markdown.
    """
    out = []
    in_code, paragraph, blank = False, 0, True
    section: int | None = None  # indent of the Raises/Warns header the line is under, if any
    item: int | None = None  # indent of that section's items
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        in_code = bool(line.strip()) and (blank or in_code) and indent >= paragraph + 4
        if not in_code and line.strip():
            if section is not None and indent <= section:
                section = item = None
            if section is not None:
                item = indent if item is None else item
                if indent == item:  # an exception name renders as code: no literal markup in it
                    head, colon, tail = line.partition(": ")
                    line = head.replace("``", "") + colon + tail
            header = EXCEPTIONS.match(line)
            section = len(header.group(1)) if header else section
            line = _literal_marker(ROLE.sub(lambda m: _role(m, owner, collection, documented, False), line))
            paragraph = indent if line.strip() else paragraph  # a dropped '::' line is a blank line, as in Markdown
        elif in_code:
            line = ROLE.sub(lambda m: _role(m, owner, collection, documented, True), line).replace("``", "")
        blank = not line.strip()
        out.append(line)
    return "\n".join(out)


def runtime_docstring(obj: griffe.Object) -> str | None:
    """The docstring of ``obj`` as Python sees it after import (cleaned as ``inspect.cleandoc`` does), if any."""
    if not (obj.is_function or obj.is_class):
        return None
    try:
        value: Any = importlib.import_module(obj.module.path)
        for name in obj.path[len(obj.module.path) + 1 :].split("."):
            value = getattr(value, name)
    except (ImportError, AttributeError):
        return None
    doc = getattr(value, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


class DocstringMarkup(griffe.Extension):
    """Rewrite every docstring of a loaded package from reStructuredText markup to Markdown."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite the docstrings of ``pkg`` and of everything in it (aliases are left to their targets)."""
        collection = loader.modules_collection
        documented = documented_paths(collection)
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            stack.extend(member for member in obj.members.values() if isinstance(member, griffe.Object))
            if obj.docstring is None:
                continue
            if PLACEHOLDER.search(obj.docstring.value):
                obj.docstring.value = runtime_docstring(obj) or obj.docstring.value
            obj.docstring.value = rewrite(obj.docstring.value, obj, collection, documented)
