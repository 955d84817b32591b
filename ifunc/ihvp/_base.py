"""The iHVP closure type shared by every method, its one constructor :meth:`IHVP.make`, and :meth:`IHVP.describe`.

``summary`` and ``plain`` turn what a closure holds into JSON-able values (a score store's metadata).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..functional import Unflatten
from ._damping import RuleDamping, check_damping
from ._scorer import GenericScorer, ScoreOptions, solve_dtype

__all__ = ["IHVP", "ConvergenceError", "check_rank", "plain", "summary", "describe_closure"]


class ConvergenceError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance."""


def check_rank(rank) -> int:
    """``rank`` as an int; ``TypeError`` for a float, a bool or anything else."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int (the number of eigenpairs or sketch columns), got {rank!r}")
    return rank


def summary(t: torch.Tensor) -> list:
    """``[numel, Σ|x|, Σx²]`` of a tensor, in float64: robust to last-bit differences, unlike a hash."""
    t = t.detach().to("cpu", torch.float64)
    return [t.numel(), float(t.abs().sum()), float(t.square().sum())]


def _summary_of(info, key: str) -> list | None:
    """What ``info.summary_of(key)`` gives (the summary of an entry not yet computed), None for a plain dict."""
    of = getattr(info, "summary_of", None)
    known = of(key) if callable(of) else None
    return known if isinstance(known, list) else None


def plain(v):
    """``v`` as JSON-able values: numbers, strings, None, lists and string-keyed dicts of them; any other object
    by its type only, ``"<TypeName>"`` (its repr may hold a memory address)."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


class IHVP:
    """A closure ``v -> (H + λI)^{-1} v``.

    Accepts a flat vector ``[d]``, a stack ``[k, d]`` (solved together), or a pytree shaped like the
    parameters (optionally with a leading ``k`` on every leaf), and returns the same form. Inputs need no
    grad; the closure works under ``torch.no_grad()``. Inputs are cast to the closure's :attr:`dtype` for the
    solve and the result is cast back to the input's dtype.

    Half precision: with ``torch.bfloat16`` or ``torch.float16`` parameters the closure solves in float32
    (:attr:`dtype` is float32: what it holds, its inner products and sums); the curvature products it takes
    through the model run in the model's own dtype and are accumulated in float32.

    Attributes:
      name: the method (``"explicit"``, ``"cg"``, ...).
      damping: λ.
      dim: d, the number of parameters.
      info: method-specific values fixed at build time (eigenvalues, rank, scale, ...); ``info["blocks"]``
        maps each parameter name to ``(method, block name)``.
      dtype: the dtype of the solve and of what the closure holds: the parameters' dtype, float32 for
        half-precision parameters (:func:`~ifunc.ihvp.solve_dtype`).
      device: the parameters' device.
      identity: ``None``, or a name set by the user (``ihvp.identity = "..."``) that changes whenever the data
        the curvature was built on does; a score store records it and refuses to resume under another one.

    Builders make closures with :meth:`make`; a subclass lists its extra attributes in ``FIELDS``.
    """

    #: extra attributes of a subclass: keyword arguments of the constructor (and of :meth:`make`), each exactly once
    FIELDS: tuple[str, ...] = ()
    identity: Any = None

    def __init__(
        self,
        solve: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        damping: float,
        unflatten: Unflatten,
        like: torch.Tensor,
        rebuild: Callable[[float], IHVP] | None = None,
        info: dict[str, Any] | None = None,
        **fields: Any,
    ):
        if set(fields) != set(self.FIELDS):
            raise TypeError(f"{type(self).__name__} needs the fields {sorted(self.FIELDS)}, got {sorted(fields)}")
        for key, value in fields.items():
            setattr(self, key, value)
        self._solve = solve
        self.name = name
        self.damping = damping
        self.unflatten = unflatten
        self.dim = unflatten.dim
        self._like = like  # dtype/device reference (a 0-d tensor)
        self.dtype: torch.dtype = like.dtype  #: the dtype of the solve: the parameters', at least float32
        self.device: torch.device = like.device  #: the parameters' device
        self._rebuild = rebuild
        self.info = dict(info or {})

    @classmethod
    def make(
        cls,
        solve: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        damping: Any,
        unflatten: Unflatten,
        like: torch.Tensor,
        info: dict[str, Any],
        rebuild: Callable[[float], IHVP] | None = None,
        rule: RuleDamping | None = None,
        **fields: Any,
    ):
        """The one constructor of every closure: ``v -> solve(v)`` for ``V [k, d] -> [k, d]``.

        Args:
          solve: the flat solve ``[k, d] -> [k, d]`` in the closure's dtype (the parameters', at least float32).
          name: the method. damping: λ (a mapping block -> λ for per-block damping).
          unflatten: the parameters' layout; like: any tensor in the parameters' dtype and device (only
            those are kept; a half dtype becomes float32, :func:`~ifunc.ihvp.solve_dtype`). info: the method's
            values fixed at build time. rebuild: ``λ -> closure`` for
            :meth:`with_damping` (None: fixed damping).
          rule: how ``damping=None`` chose λ; its entries are appended to ``info``.
          fields: the subclass's ``FIELDS``, each exactly once.

        Raises:
          TypeError: ``fields`` other than ``cls.FIELDS``.
        """
        info = {**info, **(rule.info() if rule is not None else {})}
        return cls(
            solve,
            name=name,
            damping=damping,
            unflatten=unflatten,
            like=like.new_zeros((), dtype=solve_dtype(like.dtype)),
            rebuild=rebuild,
            info=info,
            **fields,
        )

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        """Flat stack ``[k, d] -> [k, d]``, no input conversion (internal fast path)."""
        return self._solve(V)

    def __call__(self, v):
        if isinstance(v, torch.Tensor):
            if v.dim() not in (1, 2) or v.shape[-1] != self.dim:
                raise ValueError(
                    f"{self.name} iHVP: expected a vector [{self.dim}] or a stack [k, {self.dim}], got "
                    f"{tuple(v.shape)}; the length must equal the number of parameters"
                )
            if v.device != self._like.device:
                raise ValueError(f"{self.name} iHVP: v is on {v.device} but params are on {self._like.device}")
            V = v.reshape(-1, self.dim).to(self._like.dtype)
            with torch.no_grad():
                out = self._solve(V.detach())
            return out.reshape(v.shape).to(v.dtype)
        flat, batched = self.unflatten.flatten_like(v)
        return self.unflatten(self(flat))

    def with_damping(self, damping: float) -> IHVP:
        """The same closure with λ replaced; free for factorised methods (explicit, Arnoldi)."""
        if self._rebuild is None:
            raise NotImplementedError(f"{self.name} iHVP cannot change its damping")
        return self._rebuild(check_damping(damping))

    def _curvature_summary(self) -> dict[str, list]:
        """``{label: [numel, Σ|x|, Σx²]}`` of every curvature tensor the closure holds: ``"info {key}"`` for each
        tensor in ``info`` (eigenvalues). An ``info`` entry computed only when read (a dense closure's eigenvalues)
        is summarised without computing it when ``info.summary_of(key)`` can (see :class:`LazyInfo`)."""
        out = {}
        for k in self.info:
            known = _summary_of(self.info, k)
            if known is not None:
                out[f"info {k}"] = known
            elif isinstance(self.info[k], torch.Tensor):
                out[f"info {k}"] = summary(self.info[k])
        return out

    def describe(self) -> dict[str, Any]:
        """What defines this closure, JSON-able, for a score store's metadata.

        Returns:
          ``{"method", "damping", "method_info", "curvature", "identity", "data_recorded"}``: the name; λ (a
          mapping block -> λ for per-block damping); the JSON-able values of ``info`` (:func:`plain`) except the
          damping and tensors; ``{label: [numel, Σ|x|, Σx²]}`` of every curvature tensor held (:func:`summary`;
          ``"info {key}"`` for a tensor in ``info``); ``str(identity)`` or None; and whether the data the
          curvature was built on is recorded, False when there is no curvature summary, no ``info["data"]``
          fingerprint, no ``identity`` and the curvature is not ``"identity"``.
        """
        curvature = self._curvature_summary()
        damping = self.damping
        return {
            "method": self.name,
            "damping": {k: float(v) for k, v in damping.items()} if isinstance(damping, dict) else damping,
            "method_info": {
                k: plain(self.info[k])
                for k in self.info
                if k != "damping" and _summary_of(self.info, k) is None and not isinstance(self.info[k], torch.Tensor)
            },
            "curvature": curvature,
            "identity": None if self.identity is None else str(self.identity),
            "data_recorded": bool(curvature)
            or "data" in self.info
            or self.info.get("curvature") == "identity"
            or self.identity is not None,
        }

    def scorer(self, loss, params, options: ScoreOptions) -> Any:
        """How :func:`ifunc.attribute` scores with this closure (an :class:`ifunc.ihvp.Scorer`).

        The default is the generic scorer: per-example gradients and one block solve of the queries with
        :meth:`solve`. A closure with a cheaper way to score (the Kronecker family) returns its own.
        """
        return GenericScorer(self.solve, self.dim, loss, params, options)

    def __repr__(self) -> str:
        return f"IHVP({self.name}, d={self.dim}, damping={self.damping:g})"


def describe_closure(ihvp) -> dict[str, Any]:
    """:meth:`IHVP.describe` of an ifunc closure; for any other callable the same keys from what it shows.

    A custom callable is described by its ``name`` (else its qualified name), its ``info`` dict (JSON-able values,
    summaries of its tensors), its ``damping`` and ``identity`` attributes; ``"data_recorded"`` is None: nothing
    tells two such callables apart unless their ``identity`` does.
    """
    if isinstance(ihvp, IHVP):
        return ihvp.describe()
    info = getattr(ihvp, "info", None)
    info = info if isinstance(info, dict) else {}
    damping = info.get("damping") if isinstance(info.get("damping"), dict) else getattr(ihvp, "damping", None)
    identity = getattr(ihvp, "identity", None)
    return {
        "method": getattr(ihvp, "name", None) or getattr(ihvp, "__qualname__", type(ihvp).__name__),
        "damping": {k: float(v) for k, v in damping.items()} if isinstance(damping, dict) else plain(damping),
        "method_info": {k: plain(v) for k, v in info.items() if k != "damping" and not isinstance(v, torch.Tensor)},
        "curvature": {f"info {k}": summary(v) for k, v in info.items() if isinstance(v, torch.Tensor)},
        "identity": None if identity is None else str(identity),
        "data_recorded": None,
    }
