"""The one damping rule of every iHVP method, and the one check that the damped inverse can be trusted.

**The rule.** ``damping=None`` means ``λ = DAMPING_FACTOR × the mean eigenvalue`` (0.1, the heuristic of Grosse
et al. 2023) of the curvature block being inverted. Two modes, one factor, one wording of the error:

- whole closure (:func:`resolve_damping`: explicit, CG, LiSSA, Arnoldi, Nyström, DataInf): the block is the
  whole ``[d, d]`` curvature ``C``, whose mean eigenvalue is ``tr(C) / d``, so ``λ = 0.1 · tr(C) / d``. With
  ``blocks=`` the curvature inverted is the block diagonal ``D = Σ_b P_b C P_b``, whose trace is that of ``C``:
  one λ for the whole closure, the same in every block mode, recorded in ``ihvp.damping`` as a number;
- per block (:func:`block_damping`: the Kronecker family, EK-FAC, K-FAC, diagonal): each layer block and each
  diagonal block is inverted on its own, so each gets ``λ_b = 0.1 × mean(Λ_b)`` from its own eigenvalues
  ``Λ_b`` (exact), and ``ihvp.damping`` is the mapping block name -> ``λ_b`` (``ihvp_identity`` has no
  curvature to scale: its ``damping=None`` is ``λ = 1``).

How the whole-closure methods get ``tr(C)``:

- explicit: the trace of its dense matrix (exact);
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

**The check.** :func:`check_conditioning` is the one test of a damped inverse from its eigenvalues (explicit,
Arnoldi, Nyström and every Kronecker block): it raises when the inverse does not exist or is rounding noise, and
warns when the dtype cannot solve it accurately.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch

from ..likelihood import default_generator

__all__ = [
    "DAMPING_FACTOR",
    "DAMPING_RULE",
    "PROBES",
    "RuleDamping",
    "block_damping",
    "check_conditioning",
    "check_damping",
    "hutchinson_trace",
    "resolve_damping",
    "trace_beyond",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]

#: λ = DAMPING_FACTOR × the mean eigenvalue of the block inverted (the heuristic of Grosse et al. 2023).
DAMPING_FACTOR = 0.1
#: ``ihvp.info["damping_rule"]`` of a closure built with ``damping=None``.
DAMPING_RULE = "0.1 x mean eigenvalue"
#: Rademacher probes of the Hutchinson trace estimate (one batched curvature product of this many vectors).
PROBES = 20


def check_damping(damping, *, allow_zero: bool = True) -> float:
    """A given ``damping`` as a float: finite and ``>= 0`` (``> 0`` unless ``allow_zero``).

    Raises:
      TypeError: not a number.
      ValueError: negative, NaN or infinite; zero where ``allow_zero`` is False.
    """
    if isinstance(damping, (str, bytes, bool)):  # float() would read "1e-3" and True: a typo, not a choice
        raise TypeError(f"damping must be a number, got {type(damping).__name__} {damping!r}")
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a number, got {type(damping).__name__}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if value == 0 and not allow_zero:
        raise ValueError("damping must be > 0 for this method (its complement / recursion divides by it)")
    return value


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


def _rule_fails(who: str, of: str, mean: str, cause: str, fix: str = "") -> ValueError:
    """The one error of the rule: the mean eigenvalue it would scale is not positive."""
    return ValueError(
        f"{who}: damping=None uses λ = {DAMPING_FACTOR} × the mean eigenvalue of {of}, but {mean} is not positive: "
        f"{cause}. Pass damping= explicitly (a positive number){fix}"
    )


def resolve_damping(damping, trace: Callable[[], tuple[float, str]], d: int, *, who: str, allow_zero: bool = True):
    """``(λ, rule)`` of a whole-closure method: a given ``damping`` checked (``rule = None``), or the rule's
    ``λ = DAMPING_FACTOR · tr(C) / d`` from ``(tr(C), estimator) = trace()``.

    Raises:
      ValueError: the mean eigenvalue ``tr / d`` is not positive (an indefinite Hessian, no curvature) or not
        finite; a given damping that is negative (or zero where ``allow_zero`` is False).
    """
    if damping is not None:
        return check_damping(damping, allow_zero=allow_zero), None
    value, estimator = trace()
    mean = value / d
    if not math.isfinite(mean) or not mean > 0:
        raise _rule_fails(
            who,
            "the curvature (tr / d)",
            f"tr / d = {mean:.3e} ({estimator})",
            "the curvature is indefinite (a Hessian away from a minimum) or zero",
            ', or use a PSD curvature ("ggn", "fisher", "empirical_fisher")',
        )
    rule = RuleDamping(DAMPING_FACTOR * mean, value, estimator)
    return rule.damping, rule


def block_damping(values: torch.Tensor, damping, what: str, *, who: str) -> float:
    """λ of one block inverted on its own: a given ``damping`` checked, or ``DAMPING_FACTOR × mean(values)``.

    ``values``: the block's eigenvalues (any shape, exact: a Kronecker layer's ``Λ``, a diagonal block's
    entries). ``what`` names the block in the error (``"layer 'fc1'"``), ``who`` the method.

    Raises:
      ValueError: ``damping=None`` and the block's mean eigenvalue is not positive (no curvature reaches it);
        a given damping that is negative, NaN or infinite.
    """
    if damping is not None:
        return check_damping(damping)
    mean = float(values.mean()) if values.numel() else 0.0
    lam = DAMPING_FACTOR * mean
    if not lam > 0:
        raise _rule_fails(who, what, f"its mean eigenvalue {mean:.3e}", "the block has no curvature")
    return lam


def check_conditioning(
    eigenvalues: torch.Tensor,
    damping: float,
    dtype: torch.dtype,
    *,
    who: str,
    what: str = "the curvature",
    stacklevel: int = 4,
    elementwise: bool = False,
) -> None:
    """The one check of a damped inverse ``(C + λI)^{-1}`` from the eigenvalues ``w`` of ``C`` (``what``).

    With ``low = min(w) + λ``, ``high = max(w) + λ``, the damped condition number ``c = high / low`` and the
    limit ``L = 1 / (100 ε)`` of ``dtype`` (ε its machine epsilon; the curvature was computed in ``dtype``, and
    beyond ``L`` at most about two digits of the solve are above its rounding; for a half-precision dtype, whose
    products a float32 solve inverts, ``L = 1 / ε``: 128 for bfloat16, 1024 for float16, where the worst-case
    relative error ``c ε`` of the solve reaches 1):

    - ``low <= 0`` (or NaN): ``ValueError``, ``C + λI`` is not positive definite and its inverse does not
      exist (an indefinite Hessian, or a singular curvature at ``λ = 0``);
    - ``λ = 0`` and ``c >= L``: ``ValueError``, ``C`` is numerically singular and its inverse is rounding noise
      (values of order ``1 / ε``);
    - ``λ > 0`` and ``c >= L``: a ``UserWarning`` (the solve is inaccurate in ``dtype``, not meaningless);
    - otherwise, and for an empty block: nothing.

    ``elementwise=True``: ``C`` is diagonal in the coordinates the solve works in (a diagonal block: ``v_j / (w_j +
    λ)``), so every entry of the inverse is exact to one rounding at any condition number: only the first case
    applies (e.g. Adam's ``(√v̂ + ε)²`` at ``λ = 0``).

    Raises:
      ValueError: the first two cases, with the damping that fixes them.
    """
    if not eigenvalues.numel():
        return
    lowest, highest = float(eigenvalues.min()), float(eigenvalues.max())
    low, high = lowest + damping, highest + damping
    # half precision (a model's curvature products in bfloat16 / float16): two digits are never above its rounding,
    # so warn where even the worst case of one is lost, c ε >= 1
    limit = 1.0 / (torch.finfo(dtype).eps * (1 if dtype.itemsize == 2 else 100))
    rule = f"damping=None picks {DAMPING_FACTOR} × the mean eigenvalue"
    if not low > 0:
        limit_zero = 100 * torch.finfo(dtype).eps * max(abs(highest), abs(lowest))
        fix = (
            f"use damping > 0 ({rule}): the negative eigenvalues are rounding noise of a singular curvature"
            if lowest < 0 and -lowest <= limit_zero
            else f'raise damping above {-lowest:.3e}, or use a PSD curvature ("ggn", "fisher", "empirical_fisher")'
            if lowest < 0
            else f"use damping > 0 ({rule})"
        )
        raise ValueError(
            f"{who}: {what} plus λI is not positive definite at damping {damping:g} (eigenvalues of {what} from "
            f"{lowest:.3e} to {highest:.3e}): its inverse does not exist; {fix}"
        )
    if elementwise or high / low < limit:
        return
    if damping == 0:
        raise ValueError(
            f"{who}: {what} is numerically singular at damping 0 (eigenvalues from {low:.3e} to {high:.3e} in "
            f"{dtype}): its inverse is rounding noise; use damping > 0 ({rule})"
        )
    warnings.warn(
        f"{who}: {what} has damped condition number {high / low:.3e}, beyond what {dtype} solves accurately; use "
        "float64 or raise damping",
        stacklevel=stacklevel,
    )
