"""The hash walk of :func:`ifunc._identity.content_hash`: values, code, closures, globals and classes.

:class:`_Walk` feeds one SHA-256 with what defines a value's behaviour, by the rules listed in
:mod:`ifunc._identity`: plain values by ``repr``, containers element by element, tensors by content, functions by
code, defaults, closure cells and (outside installed libraries) the globals they read, classes by their bodies.
An ``nn.Module`` is hashed by its structure in :class:`ifunc._identity._Hasher`, the walk :func:`content_hash` runs.
A value the walk cannot identify raises :class:`UnidentifiableError` naming where it sits.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import logging
import os
import re
import sys
import sysconfig
import types

import torch

from ._data import fingerprint

__all__ = ["UnidentifiableError", "MAX_DEPTH"]

#: levels of nesting (closure -> global -> attribute -> ...) followed before a value counts as unidentifiable
MAX_DEPTH = 48

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_BUILTIN = (
    types.BuiltinFunctionType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)
_GLOBAL_OPS = {"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME"}
#: attribute names known to hold a per-process value that defines nothing (Hugging Face's GenerationConfig keeps
#: ``hash()`` of a string there, which Python seeds anew in every process)
_VOLATILE = frozenset({"_original_object_hash"})


class UnidentifiableError(ValueError):
    """A value whose behaviour cannot be hashed stably; ``path`` names where it sits (``loss -> closure 'f'``)."""

    def __init__(self, path: str, reason: str, message: str | None = None):
        super().__init__(message or f"{path}: {reason}")
        self.path, self.reason = path, reason


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(sorted(r.rstrip(os.sep) + os.sep for r in roots))


def _global_names(code: types.CodeType) -> set[str]:
    """The names the code (and the code nested in it) looks up as globals (not attribute names)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


class _Walk:
    """One walk: the running SHA-256, the objects already hashed (by id, kept alive) and the library test."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.alive: list = []  # visited objects stay alive, so their ids stay unique during the walk
        self.roots = _library_roots()
        self.libraries: dict[str, bool] = {}
        self.tracked: dict[str, tuple] = {}

    def put(self, *tokens) -> None:
        for token in tokens:
            data = token if isinstance(token, bytes) else str(token).encode()
            self.sha.update(f"{len(data)}:".encode())
            self.sha.update(data)

    def once(self, value) -> bool:
        """True the first time ``value`` is met; afterwards a back-reference to its first visit is hashed."""
        key = id(value)
        if key in self.seen:
            self.put("ref", self.seen[key])
            return False
        self.seen[key] = len(self.seen)
        self.alive.append(value)
        return True

    def library(self, module: str | None) -> bool:
        """Code of an installed library (stdlib, site-packages, ifunc): hashed as code, its globals by name only."""
        if not module or module == "__main__":
            return False
        if module not in self.libraries:
            top = module.partition(".")[0]
            found = sys.modules.get(module) or sys.modules.get(top)
            where = getattr(found, "__file__", None)
            if top == "ifunc" or top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
                self.libraries[module] = True
            elif where is None:
                self.libraries[module] = False
            else:
                self.libraries[module] = os.path.realpath(where).startswith(self.roots)
        return self.libraries[module]

    def fail(self, path: tuple, reason: str):
        return UnidentifiableError(" -> ".join(path), reason)

    def sub_digest(self, value, path: tuple) -> str:
        """A separate hash of ``value`` (to sort set elements and dict keys by)."""
        child = type(self)()
        child.roots, child.libraries, child.tracked = self.roots, self.libraries, self.tracked
        child.visit(value, path)
        return child.sha.hexdigest()

    # ------------------------------------------------------------ the walk

    def visit(self, value, path: tuple) -> None:
        if len(path) > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels")
        kind = type(value)
        if kind in _PLAIN:
            self.put(kind.__name__, repr(value))
        elif isinstance(value, torch.Tensor):
            try:
                t = value.detach()
                self.put("tensor", fingerprint([t.to_dense() if t.layout != torch.strided else t]))
            except Exception as err:  # a meta or fake tensor has no content to hash
                raise self.fail(path, f"a {value.device.type} tensor whose content cannot be read ({err})") from None
        elif isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            self.put(kind.__name__, str(value))
        elif isinstance(value, torch.Generator):
            self.put("generator", str(value.device), fingerprint([value.get_state()]))
        elif isinstance(value, types.ModuleType):
            self.put("module", value.__name__)
            if not self.library(value.__name__):  # the user's own module: what its code reads can change
                self.module_attributes(value, path)
        elif isinstance(value, types.CodeType):
            self.code(value, path)
        elif isinstance(value, (tuple, frozenset)) or self.once(value):
            self.fresh(value, kind, path)

    def fresh(self, value, kind: type, path: tuple) -> None:
        """A value met for the first time (containers, callables, objects)."""
        if isinstance(value, (tuple, list)):
            self.put(_qualname(kind), len(value))
            for i, item in enumerate(value):
                self.visit(item, path + (f"[{i}]",))
        elif isinstance(value, (set, frozenset)):
            self.put(_qualname(kind), *sorted(self.sub_digest(x, path + ("set element",)) for x in value))
        elif isinstance(value, dict):
            self.mapping(value, kind, path)
        elif isinstance(value, types.FunctionType):
            self.function(value, path)
        elif isinstance(value, types.MethodType):
            self.put("method")
            self.visit(value.__func__, path + ("function",))
            self.visit(value.__self__, path + ("bound to",))
        elif isinstance(value, functools.partial):
            self.put("partial")
            self.visit(value.func, path + ("function",))
            self.visit(value.args, path + ("arguments",))
            self.visit(value.keywords, path + ("keywords",))
        elif isinstance(value, _BUILTIN):
            self.put("builtin", getattr(value, "__module__", None), getattr(value, "__qualname__", value.__name__))
            bound = getattr(value, "__self__", None)
            if bound is not None and not isinstance(bound, (types.ModuleType, type)):
                self.visit(bound, path + ("bound to",))
        elif isinstance(value, (staticmethod, classmethod)):
            self.put(kind.__name__)
            self.visit(value.__func__, path + ("function",))
        elif isinstance(value, property):
            self.put("property")
            self.visit((value.fget, value.fset, value.fdel), path)
        elif isinstance(value, type):
            self.cls(value, path)
        elif isinstance(value, torch.nn.Module):
            self.module(value, path)
        elif isinstance(value, logging.Logger):
            self.put("logger", value.name)
        elif kind.__module__ == "numpy" and hasattr(value, "tobytes") and hasattr(value, "dtype"):
            self.put("ndarray", str(value.dtype), tuple(value.shape), hashlib.sha256(value.tobytes()).hexdigest())
        elif isinstance(getattr(value, "__dict__", None), dict):
            self.cls(kind, path + ("class",))
            self.attributes(vars(value), path)
        else:
            self.by_repr(value, kind, path)

    def by_repr(self, value, kind: type, path: tuple) -> None:
        try:
            text = repr(value)
        except Exception as err:  # a broken __repr__ identifies nothing
            raise self.fail(path, f"{_qualname(kind)} has no usable repr ({type(err).__name__})") from None
        if _ADDRESS.search(text):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise self.fail(path, f"{shown} has no stable identity (its repr holds a memory address)")
        self.put(_qualname(kind), text)

    def mapping(self, value: dict, kind: type, path: tuple) -> None:
        """Items in insertion order (a loss may iterate them; the order does not depend on the hash seed)."""
        self.put(_qualname(kind), len(value))
        keyed = [(k if type(k) is str else self.sub_digest(k, path + ("key",)), k) for k in value]
        for digest, key in keyed:
            self.put(digest)
            self.visit(value[key], path + (f"[{key!r}]",))

    def attributes(self, attrs: dict, path: tuple, skip=()) -> None:
        names = sorted(k for k in attrs if k not in skip and k not in _VOLATILE)
        self.put("attributes", len(names))
        for k in names:
            self.put(k)
            self.visit(attrs[k], path + (f"attribute {k!r}",))

    def code(self, code: types.CodeType, path: tuple) -> None:
        self.put("code", code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
        self.put(code.co_code, *code.co_names, *code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
        for const in code.co_consts:
            self.visit(const, path)

    def function(self, fn: types.FunctionType, path: tuple) -> None:
        self.put("function", fn.__module__, fn.__qualname__)
        self.code(fn.__code__, path)
        self.visit(fn.__defaults__, path + ("defaults",))
        self.visit(fn.__kwdefaults__, path + ("keyword defaults",))
        if vars(fn):  # attributes set on the function (g.scale = 2.0)
            self.attributes(vars(fn), path, skip=("__wrapped__",) if "__wrapped__" not in vars(fn) else ())
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not yet filled
                self.put("empty cell", name)
                continue
            self.put("cell", name)
            self.visit(contents, path + (f"closure {name!r}",))
        if self.library(fn.__module__):
            return  # a library's globals are its own modules, functions and constants: known by name
        scope = fn.__globals__
        for name in sorted(n for n in _global_names(fn.__code__) if n in scope):
            self.put("global", name)
            self.visit(scope[name], path + (f"global {name!r}",))

    def cls(self, klass: type, path: tuple) -> None:
        if not self.once(klass):
            return
        self.put("class", klass.__module__, klass.__qualname__)
        for base in klass.__mro__:
            if self.library(base.__module__):
                continue
            body = {k: v for k, v in vars(base).items() if not _dunder(k) or callable(v)}
            body.pop("_abc_impl", None)  # ABC's registry cache: an address, and no behaviour
            self.put("body", base.__qualname__)
            self.attributes(body, path + (f"class {base.__qualname__}",), skip=("__dict__", "__weakref__"))

    def module_attributes(self, mod: types.ModuleType, path: tuple) -> None:
        """A user module's own functions and classes, and its plain values (numbers, strings, tensors, containers);
        other objects it holds (loggers, connections, imported things) are left out, not refused."""
        if not self.once(mod):
            return
        for k, v in sorted(vars(mod).items()):
            own = isinstance(v, (types.FunctionType, type)) and getattr(v, "__module__", None) == mod.__name__
            if _dunder(k) or not (own or type(v) in _PLAIN or isinstance(v, (torch.Tensor, tuple, list, dict))):
                continue
            try:
                digest = self.sub_digest(v, path + (f"attribute {k!r}",))
            except UnidentifiableError:
                continue
            self.put(k, digest)

    def module(self, model: torch.nn.Module, path: tuple) -> None:
        """An ``nn.Module``: hashed by its structure in the subclass :func:`content_hash` runs."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot hash the module at {' -> '.join(path)}: a walk that meets modules must "
            "define module() (ifunc._identity's walk does)"
        )


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")
