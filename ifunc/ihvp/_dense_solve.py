"""Dense damped solves, factorised as the calls need them: Cholesky at one damping, eigenvalues only when asked.

A dense method (explicit, :func:`ifunc.ihvp_from_matrix`) holds symmetric blocks ``M_b [d_b, d_b]`` in float64
and solves ``(M_b + λI)^{-1} V_b``. What each request costs:

- a damping λ: a Cholesky factorisation ``M_b + λI = L Lᵀ`` (``d_b³/3`` flops, 10-20x cheaper than ``eigh``);
  calls then cost two triangular solves, ``O(k d_b²)``;
- the third damping asked of the same matrices (the built one and two :meth:`IHVP.with_damping`): one
  eigendecomposition ``M_b = Q diag(w) Qᵀ``, after which every damping is free;
- ``ihvp.info["eigenvalues"]``: ``eigvalsh`` (eigenvalues only), computed when first read;
- ``damping=None``: the trace ``Σ_b tr(M_b)``, exact without eigenvalues.

**Conditioning**, decided as :func:`~ifunc.ihvp._damping.check_conditioning` decides it, from bounds on the extreme
eigenvalues of ``A = M + λI`` in increasing cost, the first that proves the solve trustworthy ends the check:
``λ_max(A) <= tr(A)`` (PSD ``M``) and then ``<= ‖A‖_F``; ``λ_min(A) >= λ`` when ``M`` is PSD by construction,
else an inverse-iteration estimate (:data:`INVERSE_ITERATIONS` steps on :data:`INVERSE_PROBES` seeded vectors,
which never underestimates ``λ_min`` and overestimates it by less than ``|c|^{-1/4}``, ``c`` the probes' largest
component along the lowest eigenvector), divided by :data:`MARGIN`. When no bound proves it (and when the Cholesky
factorisation fails) the exact eigenvalues decide, with the same errors and warnings as an ``eigh`` solve.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch

from ..functional import Unflatten
from ._base import IHVP
from ._blocks import Block, join
from ._damping import RuleDamping, check_conditioning, check_damping
from ._eigen import eigen_solve

__all__ = ["DenseSolver", "LazyInfo", "dense_ihvp", "EIGH_AFTER", "MARGIN"]

MatVec = Callable[[torch.Tensor], torch.Tensor]

#: Cholesky factorisations of the same matrices before the next damping eigendecomposes them instead
EIGH_AFTER = 2
#: safety factor on the inverse-iteration estimate of the smallest eigenvalue before it is trusted
MARGIN = 10.0
#: steps and seeded probe vectors of the inverse iteration on the Cholesky factor
INVERSE_ITERATIONS = 4
INVERSE_PROBES = 4


class LazyInfo(Mapping):
    """``ihvp.info``: fixed entries plus entries computed when first read (``key -> () -> value``), then kept.

    ``summaries`` (``key -> () -> [numel, Σ|x|, Σx²]``) give a score store's metadata the summary of a lazy entry
    without computing it (:meth:`summary_of`; :meth:`IHVP.describe` asks it first).
    """

    def __init__(
        self,
        fixed: Mapping[str, Any],
        lazy: Mapping[str, Callable[[], Any]],
        summaries: Mapping[str, Callable[[], list | None]] | None = None,
    ):
        self._values = dict(fixed)
        self._lazy = {k: f for k, f in lazy.items() if k not in self._values}
        self._summaries = dict(summaries or {})

    def summary_of(self, key: str) -> list | None:
        """``[numel, Σ|x|, Σx²]`` of entry ``key`` without computing it, or None (then read the entry)."""
        make = self._summaries.get(key)
        return None if make is None else make()

    def __getitem__(self, key: str) -> Any:
        if key not in self._values and key in self._lazy:
            self._values[key] = self._lazy.pop(key)()
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._values, *self._lazy])

    def __len__(self) -> int:
        return len(self._values) + len(self._lazy)

    def __repr__(self) -> str:
        shown = {k: self._values[k] for k in self._values}
        return f"LazyInfo({shown}, not yet computed: {sorted(self._lazy)})"


def _trusted(low: float, high: float, damping: float, dtype: torch.dtype, who: str) -> bool:
    """Whether :func:`check_conditioning` passes silently for ``λ_min(A) >= low`` and ``λ_max(A) <= high``."""
    bounds = torch.tensor([low - damping, high - damping], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            check_conditioning(bounds, damping, dtype, who=who)
        except (ValueError, UserWarning):
            return False
    return True


def _lowest_estimate(L: torch.Tensor) -> float:
    """An estimate of ``λ_min(L Lᵀ)`` from above (inverse iteration from seeded vectors; the global RNG untouched)."""
    d = L.shape[0]
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(d, INVERSE_PROBES, generator=gen, dtype=torch.float64).to(L.device)
    X = X / X.norm(dim=0)
    norms = torch.ones(INVERSE_PROBES, dtype=torch.float64)
    for _ in range(INVERSE_ITERATIONS):
        Y = torch.cholesky_solve(X, L)
        norms = Y.norm(dim=0)
        X = Y / norms
    return 1.0 / float(norms.max())


class DenseSolver:
    """Symmetric float64 blocks ``M_b`` and the factorisations made of them so far (shared by re-damped closures).

    Args:
      matrices: the blocks ``[d_b, d_b]``, symmetric, float64.
      psd: the blocks are positive semi-definite by construction (Gram matrices ``Kᵀ K``, a GGN with a convex loss):
        then ``λ_min(M + λI) >= λ`` bounds the conditioning without any solve.
      dtype: the parameters' dtype, whose precision the conditioning check judges.
      who: the method in messages.
    """

    def __init__(self, matrices: list[torch.Tensor], *, psd: bool, dtype: torch.dtype, who: str):
        self.matrices = matrices
        self.psd = psd
        self.dtype = dtype
        self.who = who
        self.choleskys = 0  #: Cholesky factorisations made so far (all blocks at one damping count once)
        self._eigh: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._eigenvalues: torch.Tensor | None = None

    def trace(self) -> float:
        """``Σ_b tr(M_b)``: exact, no eigenvalues."""
        return sum(float(M.diagonal().sum()) for M in self.matrices)

    def eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of every block, ascending within a block, concatenated (float64; ``eigvalsh`` once)."""
        if self._eigenvalues is None:
            if self._eigh is not None:
                parts = [w for w, _ in self._eigh]
            else:
                parts = [torch.linalg.eigvalsh(M) for M in self.matrices]
            self._eigenvalues = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._eigenvalues

    def eigen_summary(self) -> list | None:
        """``[d, Σ|w|, Σw²]`` of the eigenvalues, from the matrices, for a PSD curvature: ``Σ|w| = Σw = tr M`` and
        ``Σw² = ‖M‖_F²`` (exact identities; no eigendecomposition). None otherwise (an indefinite Hessian's ``Σ|w|``
        needs its eigenvalues)."""
        if not self.psd:
            return None
        d = sum(int(M.shape[0]) for M in self.matrices)
        return [d, self.trace(), sum(float(M.square().sum()) for M in self.matrices)]

    def _eigendecompose(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._eigh is None:
            self._eigh = [torch.linalg.eigh(M) for M in self.matrices]
            parts = [w for w, _ in self._eigh]
            self._eigenvalues = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._eigh

    def _eigen_solves(self, damping: float) -> list[MatVec]:
        pairs = self._eigendecompose()
        check_conditioning(self.eigenvalues(), damping, self.dtype, who=self.who, stacklevel=6)
        return [(lambda V, w=w, Q=Q: eigen_solve(Q, w, damping, V)) for w, Q in pairs]

    def solves(self, damping: float) -> list[MatVec]:
        """Per-block ``V_b [k, d_b] -> (M_b + λI)^{-1} V_b`` (in ``V``'s dtype), after the conditioning check.

        Raises:
          ValueError: ``M + λI`` is not positive definite, or ``M`` is numerically singular at ``λ = 0``
            (:func:`check_conditioning`).

        Warns:
          UserWarning: the damped condition number is beyond what ``dtype`` solves accurately.
        """
        if self._eigh is not None or self.choleskys >= EIGH_AFTER:
            return self._eigen_solves(damping)
        factors, high = [], 0.0
        for M in self.matrices:
            A = M.clone()
            A.diagonal().add_(damping)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:  # not positive definite in float64: the eigenvalues say why (and raise)
                check_conditioning(self.eigenvalues(), damping, self.dtype, who=self.who, stacklevel=5)
                return self._eigen_solves(damping)  # positive definite after all, by a rounding: solve through them
            factors.append(L)
            high = max(high, float(A.diagonal().sum()))  # λ_max(A) <= tr(A) for a PSD M
        self.choleskys += 1
        if not self._conditioning_proved(factors, damping, high):
            check_conditioning(self.eigenvalues(), damping, self.dtype, who=self.who, stacklevel=5)
        return [(lambda V, L=L: torch.cholesky_solve(V.to(L.dtype).T, L).T.to(V.dtype)) for L in factors]

    def _frobenius(self, damping: float) -> float:
        """``max_b ‖M_b + λI‖_F`` from ``‖M‖_F² + 2λ tr(M) + d λ²`` (one pass over each block)."""
        return max(
            (float(M.square().sum()) + 2 * damping * float(M.diagonal().sum()) + M.shape[0] * damping**2) ** 0.5
            for M in self.matrices
        )

    def _conditioning_proved(self, factors: list[torch.Tensor], damping: float, high: float) -> bool:
        if not factors:
            return True
        if self.psd and damping > 0 and _trusted(damping, high, damping, self.dtype, self.who):
            return True
        high = self._frobenius(damping) if not self.psd else min(high, self._frobenius(damping))
        if self.psd and damping > 0 and _trusted(damping, high, damping, self.dtype, self.who):
            return True
        low = min(_lowest_estimate(L) for L in factors) / MARGIN
        return _trusted(low, high, damping, self.dtype, self.who)


def dense_ihvp(
    solver: DenseSolver,
    blocks: list[Block],
    damping: float,
    *,
    name: str,
    unflatten: Unflatten,
    like: torch.Tensor,
    info: dict,
    rule: RuleDamping | None = None,
) -> IHVP:
    """The :class:`IHVP` of a :class:`DenseSolver` over ``blocks``; ``with_damping`` reuses what it factorised.

    ``info["eigenvalues"]`` is computed when first read; :meth:`IHVP.describe` summarises a PSD curvature's from the
    matrices (:meth:`DenseSolver.eigen_summary`), an indefinite one's by computing them.
    """

    fixed = {"name": name, "unflatten": unflatten, "like": like, "info": info}  # the same for every damping

    def build(lam: float, rule: RuleDamping | None = None) -> IHVP:
        lam = check_damping(lam)
        closure = IHVP.make(join(solver.solves(lam), blocks), damping=lam, rebuild=build, rule=rule, **fixed)
        lazy = LazyInfo(closure.info, {"eigenvalues": solver.eigenvalues}, {"eigenvalues": solver.eigen_summary})
        closure.info = lazy  # pyright: ignore[reportAttributeAccessIssue]
        return closure

    return build(damping, rule)
