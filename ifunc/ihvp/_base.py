"""The iHVP closure type shared by every method."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..functional import Unflatten

__all__ = ["IHVP", "ConvergenceError", "check_damping", "check_rank"]


class ConvergenceError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance."""


def check_damping(damping, *, allow_zero: bool = True) -> float:
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a number, got {type(damping).__name__}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if value == 0 and not allow_zero:
        raise ValueError("damping must be > 0 for this method (its complement / recursion divides by it)")
    return value


def check_rank(rank) -> int:
    """``rank`` as an int; ``TypeError`` for a float, a bool or anything else."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int (the number of eigenpairs or sketch columns), got {rank!r}")
    return rank


class IHVP:
    """A closure ``v -> (H + λI)^{-1} v``.

    Accepts a flat vector ``[d]``, a stack ``[k, d]`` (solved together), or a pytree shaped like the
    parameters (optionally with a leading ``k`` on every leaf), and returns the same form. Inputs need no
    grad; the closure works under ``torch.no_grad()``. Inputs are cast to the parameters' dtype for the
    solve and the result is cast back to the input's dtype.

    Attributes:
      name: the method (``"explicit"``, ``"cg"``, ...).
      damping: λ.
      dim: d, the number of parameters.
      info: method-specific values fixed at build time (eigenvalues, rank, scale, ...); ``info["blocks"]``
        maps each parameter name to ``(method, block name)``.
      dtype, device: the parameters' dtype and device.
    """

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
    ):
        self._solve = solve
        self.name = name
        self.damping = damping
        self.unflatten = unflatten
        self.dim = unflatten.dim
        self._like = like  # dtype/device reference (a 0-d tensor)
        self.dtype: torch.dtype = like.dtype  #: the parameters' dtype, in which the closure solves
        self.device: torch.device = like.device  #: the parameters' device
        self._rebuild = rebuild
        self.info = dict(info or {})

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

    def __repr__(self) -> str:
        return f"IHVP({self.name}, d={self.dim}, damping={self.damping:g})"
