"""Content hashes of Python values (losses, measurements, models) that agree between processes.

A score store records what defines its scores; the parameters and data are tensors (:func:`ifunc._data.fingerprint`),
but the loss, the measurement and the model are *code and configuration*. :func:`content_hash` walks such a value and
hashes what determines its behaviour, never an address or an ``id``, so the same code in a fresh process gives the
same hash and a change anywhere it can reach gives another:

* ``None``, bools, numbers, strings, bytes: by type and ``repr``; tuples, lists, dicts, sets: element by element
  (sets and dict keys in sorted order of their own hashes, so string hashing's per-process seed does not matter);
* tensors by content (shape, dtype, bytes); numpy arrays likewise; ``torch.Generator`` by its state;
* a function by its code object (``co_code``, ``co_consts`` with nested code objects, ``co_names``), defaults,
  closure cells, and -- for code outside installed libraries -- the globals it names, recursively;
  bound methods by function and ``__self__``; ``functools.partial`` by function and arguments; builtins by name;
* Python modules by name; a class by qualified name, and for a class defined outside installed libraries also by
  every function and value of its body (along its bases), so an edited ``forward`` or ``__call__`` is seen;
* an ``nn.Module`` by its structure: for every submodule its name, class, ``forward``, ``extra_repr()``, training
  flag, hooks, public attributes, the names, shapes and dtypes of its parameters, the values of those not in
  ``params`` (a frozen base model under adapters; the others are fingerprinted as ``params``) and the content of
  its buffers;
* any other object with a ``__dict__`` by class and ``__dict__`` (``OutputLoss``, Hugging Face configs, ...);
  anything else by ``repr`` unless the ``repr`` holds a memory address.

A value that cannot be identified that way raises :class:`UnidentifiableError` naming where it sits, e.g.
``loss -> closure 'model' -> attribute 'foo'``. Shared objects are hashed once (a back-reference after that) and
cycles end there; the walk stops with the same error below :data:`~ifunc._hash_walk.MAX_DEPTH` levels.

The walk of values, code, closures, globals and classes is :mod:`ifunc._hash_walk`; this module adds the
``nn.Module`` structure to it and records a run's identity (:func:`run_identity`).
"""

from __future__ import annotations

from typing import Any

import torch

from ._data import fingerprint
from ._hash_walk import UnidentifiableError, _Walk

__all__ = ["content_hash", "run_identity"]

#: the hook registries of an nn.Module (their hooks change what its forward computes)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def content_hash(value: Any, *, name: str = "value", tracked: dict | None = None) -> str:
    """SHA-256 (first 32 hex digits) of what defines ``value``'s behaviour, the same in every process running this code.

    Args:
      value: a loss, a measurement, an ``nn.Module``, or any value they close over.
      name: how the value is named at the start of an error's path.
      tracked: the ``params`` of the call (name -> tensor): in a module that holds every one of them (same names
        and shapes: the module ``ifunc.call`` runs them through), a parameter of one of those names (or tied to one)
        is hashed by shape and dtype, as the call reads it from ``params`` (fingerprinted apart); every other
        parameter (a frozen base model under adapters, another module's weights) by content.

    Raises:
      UnidentifiableError: something reachable from ``value`` has no stable identity (e.g. an object whose
        ``repr`` is ``<Foo object at 0x7f...>``), or it is nested deeper than
        :data:`~ifunc._hash_walk.MAX_DEPTH`; the message names its path.

    Example:
      >>> content_hash(lambda p, b: 2 * p) == content_hash(lambda p, b: 2 * p)
      True
    """
    hasher = _Hasher()
    hasher.tracked = {k: tuple(v.shape) for k, v in (tracked or {}).items()}
    hasher.visit(value, (name,))
    return hasher.sha.hexdigest()[:32]


def run_identity(loss, measurement, model, identity: str | None, *, tracked: dict | None = None) -> dict:
    """What defines the scores besides tensors: content hashes of the loss, measurement and model (or ``identity``).

    The hashes (:func:`content_hash`) follow code, closures, referenced globals and module
    structure, so the same code in a fresh process records the same values and a changed measurement or
    ``forward`` records others. ``identity`` (a non-empty string) is recorded instead when given.

    Raises:
      UnidentifiableError: something they reach has no stable identity; the message names its path and says to
        pass ``identity=``.
      TypeError: ``identity`` is not a non-empty string.
    """
    if identity is not None:
        if not isinstance(identity, str) or not identity.strip():
            raise TypeError(
                f"identity= must be a non-empty string naming the loss, measurement and model (e.g. 'gpt2-ft v3, "
                f"completion nll'), got {identity!r}"
            )
        return {"identity": identity}
    found: dict[str, str | None] = {"default_dtype": str(torch.get_default_dtype())}  # a forward's factories follow it
    for name, value in (("loss", loss), ("measurement", measurement), ("model", model)):
        if name == "measurement" and value is None:  # the default measurement is the loss itself
            found[name] = found["loss"]
            continue
        try:
            found[name] = None if value is None else content_hash(value, name=name, tracked=tracked)
        except UnidentifiableError as err:
            message = (
                f"a score store records the loss, the measurement and the model by content, so that a rerun with "
                f"other code is refused; but {err.path} cannot be identified: {err.reason}. Pass "
                "identity='<a name that changes whenever the loss, measurement or model does>' to attribute(..., "
                "out=...) to record that name instead"
            )
            raise UnidentifiableError(err.path, err.reason, message) from None
    return found


class _Hasher(_Walk):
    """The walk of :mod:`ifunc._hash_walk`, with an ``nn.Module`` hashed by its structure."""

    def module(self, model: torch.nn.Module, path: tuple) -> None:
        """Every submodule's name, class, ``forward``, ``extra_repr()``, training flag, parameters (by shape and
        dtype; by content too when not read from ``params``), buffers, hooks and other attributes."""
        self.put("nn.Module")
        names: dict[int, list[str]] = {}  # parameter (by identity) -> every name it has (ties)
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        # the module the call runs with params holds every one of them: its copies of those are not read
        holds = bool(self.tracked) and all(shapes.get(n) == shape for n, shape in self.tracked.items())
        read = {k for k, ns in names.items() if holds and any(n in self.tracked for n in ns)}
        for name, sub in model.named_modules(remove_duplicate=False):
            where = path + (f"submodule {name!r}",) if name else path
            if sub is not model and not self.once(sub):
                continue
            kind = type(sub)
            self.put("submodule", name)
            self.cls(kind, where + ("class",))
            self.visit(getattr(kind, "forward", None), where + ("forward",))
            try:
                self.put(sub.extra_repr(), sub.training)
            except Exception as err:
                raise self.fail(where, f"extra_repr() failed ({type(err).__name__}: {err})") from None
            for pname, p in sub._parameters.items():
                self.put("parameter", pname, None if p is None else (tuple(p.shape), str(p.dtype)))
                if p is not None and id(p) not in read:
                    self.put(fingerprint([p]))  # not in params: ifunc.call reads its value from the module
            self.visit(dict(sub._buffers), where + ("buffers",))
            for hooks in _HOOKS:
                self.visit(list(getattr(sub, hooks, {}).values()), where + (hooks.strip("_"),))
            own = {k: v for k, v in vars(sub).items() if k not in _MODULE_INTERNALS}  # private ones too (self._t)
            self.attributes(own, where)


#: the attributes every nn.Module has (parameters, buffers, submodules, hooks: hashed above, or no behaviour)
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | {"training"}
