"""The one default damping rule of every iHVP method: ``λ = 0.1 × the mean eigenvalue`` of the curvature.

``damping=None`` means ``λ = 0.1 · tr(C) / d`` for the ``[d, d]`` curvature ``C`` a method inverts (the mean
of all ``d`` eigenvalues is ``tr(C) / d``). With ``blocks=`` the curvature inverted is the block diagonal
``D = Σ_b P_b C P_b``, whose trace is that of ``C``: the rule gives one λ for the whole closure, the same in
every block mode, recorded in ``ihvp.damping`` as a number. How each method gets ``tr(C)``:

- explicit: the sum of its eigenvalues (exact);
- DataInf: ``(1/n) Σ_i ‖g_i‖²`` from the per-example gradients it already holds (exact);
- Arnoldi, Nyström: the trace of the curvature on the Krylov space / sketch they built (exact) plus a
  Hutchinson estimate of the rest, with probes projected out of that space (exact at ``rank = d``);
- CG, LiSSA: a Hutchinson estimate ``tr(C) ≈ (1/m) Σ_j z_jᵀ C z_j``.

Hutchinson uses ``m =`` :data:`PROBES` Rademacher probes ``z_j``, one batched curvature product, drawn from a
generator seeded from the method's ``generator`` (or seed 0) without advancing it; the global RNG is never
touched. It is unbiased with relative standard error ``sqrt(2 Σ_{i≠j} C_ij² / m) / tr(C)``, at most
``sqrt(2 / (m r))`` for a PSD ``C`` of effective rank ``r = tr(C)² / ‖C‖_F²``: 32 % in the worst case
(rank one), 10 % at ``r = 10``, 3 % at ``r = 100``. When the dimension left to estimate is at most ``m``
the probes are an orthonormal basis of it instead, and the trace is exact for the same cost.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ..likelihood import default_generator
from ._base import check_damping

__all__ = [
    "DAMPING_FACTOR",
    "DAMPING_RULE",
    "PROBES",
    "RuleDamping",
    "hutchinson_trace",
    "resolve_damping",
    "trace_beyond",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]

#: λ = DAMPING_FACTOR × mean eigenvalue (the heuristic of Grosse et al. 2023, used by the Kronecker family).
DAMPING_FACTOR = 0.1
#: ``ihvp.info["damping_rule"]`` of a closure built with ``damping=None``.
DAMPING_RULE = "0.1 x mean eigenvalue"
#: Rademacher probes of the Hutchinson trace estimate (one batched curvature product of this many vectors).
PROBES = 20


class RuleDamping(NamedTuple):
    """λ chosen by the rule, with the trace it came from and how that trace was obtained."""

    damping: float
    trace: float
    estimator: str

    def info(self) -> dict:
        """The ``ihvp.info`` entries of a closure built with ``damping=None``."""
        return {"damping_rule": DAMPING_RULE, "damping_trace": self.trace, "damping_estimator": self.estimator}


def probe_generator(generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator for the probes, seeded from a copy of ``generator`` (left as it was; default seed 0)."""
    source = generator if generator is not None else default_generator()
    copy = torch.Generator(device=source.device)
    copy.set_state(source.get_state())
    seed = int(torch.randint(2**62, (1,), generator=copy, device=source.device))
    return torch.Generator().manual_seed(seed)


def hutchinson_trace(
    matvec: MatVec,
    d: int,
    *,
    like: torch.Tensor,
    generator: torch.Generator | None = None,
    basis: torch.Tensor | None = None,
    probes: int = PROBES,
) -> tuple[float, str]:
    """``(tr(P C P), estimator)`` with ``P = I − B Bᵀ`` (``B = basis [d, r]``, orthonormal; default ``P = I``).

    ``m = probes`` Rademacher vectors projected by ``P``, one batched product of ``m`` vectors: unbiased for
    any symmetric ``C``. When ``P`` has rank ``<= m`` an orthonormal basis of its range is used instead
    (exact). ``matvec`` takes ``[k, d]`` in ``like``'s dtype and device.
    """
    r = 0 if basis is None else basis.shape[1]
    if d - r <= 0:
        return 0.0, "exact"
    if d - r <= probes:
        if basis is None:
            Z = torch.eye(d, dtype=torch.float64, device=like.device)
        else:
            full, _ = torch.linalg.qr(basis.to(torch.float64), mode="complete")
            Z = full[:, r:].T  # [d - r, d], orthonormal rows spanning range(P)
        divisor, estimator = 1, "exact"
    else:
        gen = probe_generator(generator)
        Z = (2 * torch.randint(0, 2, (probes, d), generator=gen) - 1).to(torch.float64).to(like.device)
        if basis is not None:
            B = basis.to(torch.float64)
            Z = Z - (Z @ B) @ B.T
        divisor, estimator = probes, f"hutchinson ({probes} probes)"
    CZ = matvec(Z.to(like.dtype)).to(torch.float64)
    return float((Z * CZ).sum()) / divisor, estimator


def trace_beyond(known: float, rest: list[tuple[float, str]], space: str) -> tuple[float, str]:
    """``(known + Σ rest, label)``: an exact trace on a subspace (``space``: a Krylov space, a sketch) plus the
    estimates :func:`hutchinson_trace` made on its complements; the label is ``"exact"`` when every part was."""
    estimators = sorted({e for _, e in rest} - {"exact"})
    label = "exact" if not estimators else f"{space} + {estimators[0]}"
    return known + sum(t for t, _ in rest), label


def resolve_damping(damping, trace: Callable[[], tuple[float, str]], d: int, *, who: str, allow_zero: bool = True):
    """``(λ, rule)``: a given ``damping`` checked (``rule = None``), or the rule's λ from ``trace()``.

    Raises:
      ValueError: the mean eigenvalue ``tr / d`` is not positive (an indefinite Hessian, no curvature) or not
        finite; a given damping that is negative (or zero where ``allow_zero`` is False).
    """
    if damping is not None:
        return check_damping(damping, allow_zero=allow_zero), None
    value, estimator = trace()
    mean = value / d
    if not math.isfinite(mean) or not mean > 0:
        raise ValueError(
            f"{who}: damping=None uses λ = {DAMPING_FACTOR} × the mean eigenvalue of the curvature (tr / d), but "
            f"tr / d = {mean:.3e} ({estimator}) is not positive: the curvature is indefinite (a Hessian away from "
            'a minimum) or zero. Pass damping= explicitly (a positive number), or use a PSD curvature ("ggn", '
            '"fisher", "empirical_fisher")'
        )
    rule = RuleDamping(DAMPING_FACTOR * mean, value, estimator)
    return rule.damping, rule
