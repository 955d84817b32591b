"""The iHVP method table: every builder of the public API, how to call it, and what it is exact against.

One list, :data:`METHODS`, drives ``tests/test_contract.py``: every closure keeps the contract of
docs/conventions.md (stacks, pytrees, symmetry, positivity, linearity, determinism, damping, purity, dtype,
scale of the loss), and the ``"exact"`` ones also agree with a dense solve of the curvature they claim to
invert. A new builder gets a row here and is tested like the others.

Exactness classes:

- ``"exact"``: ``f(v) = solve(C + λI, v)`` within ``tol`` (relative error over a stack of vectors), with
  ``C = reference(problem)`` a dense float64 matrix built from ``ifunc.ggn`` / ``ifunc.per_sample_grads``.
  Some entries are exact only on a special problem (``fixed``): K-FAC and EK-FAC equal the block-diagonal
  GGN for deep linear networks with squared error and for one data point; DataInf equals the block-diagonal
  empirical Fisher for one data point.
- ``"approximate"``: only the structural properties; ``reference`` is ``None``.

Block-diagonal rows pass ``blocks=`` in ``options``: ``"full"``, ``"layer"`` (parameters grouped by module) or a
function ``name -> group`` (turned into the mapping ``ifunc`` takes); their reference is the block diagonal
``Σ_b P_b C P_b`` of the same groups (:func:`blocks_of`).

Default damping (``damping=None``, checked by ``tests/test_damping_rule.py``): every row but the Kronecker
family resolves one number ``λ = 0.1 · tr(C) / d`` for the curvature ``C = rule_curvature(problem)`` it
inverts (the GGN, or a Fisher), exactly where ``rule_exact`` (eigenvalues, gradient norms, a Krylov space or
sketch covering everything), else by a Hutchinson estimate; the Kronecker rows keep their per-block rule
(``rule_curvature=None``).

The problems and the references live in ``tests/problems.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import ifunc

from .problems import (
    Blocks,
    Problem,
    blocks_of,
    categorical,
    diagonal_of,
    dim,
    empirical_fisher,
    ggn,
    kind,
    make_problem,
    sampled_fisher,
    zero,
)

# ---------------------------------------------------------------- builders with settings that converge


def _named(problem: Problem, blocks: Blocks) -> Any:
    """``blocks=`` as ``ifunc`` takes it: a function of the name becomes the mapping name -> group.

    (``Any``: the builders leave ``blocks`` unannotated, so a type checker reads ``str`` off its default.)
    """
    return {name: blocks(name) for name in problem.params} if callable(blocks) else blocks


def _explicit(p: Problem, lam: float | None, *, blocks: Blocks = "full", **kw) -> ifunc.IHVP:
    return ifunc.ihvp_explicit(p.loss, p.params, p.data, damping=lam, blocks=_named(p, blocks), **kw)


def _cg(p: Problem, lam: float | None, *, blocks: Blocks = "full") -> ifunc.IHVP:
    # tol 1e-9, not tighter: a softmax near saturation (one example, tiny GGN) carries a relative rounding of
    # ~1e-11 in its curvature products, and the true residual stalls near 1e-10 (CG then raises)
    kw = {"tol": 1e-9, "atol": 1e-14, "maxiter": 500}
    return ifunc.ihvp_cg(p.loss, p.params, p.data, damping=lam, blocks=_named(p, blocks), **kw)


def _arnoldi(p: Problem, lam: float | None, *, blocks: Blocks = "full", rank: int | None = None) -> ifunc.IHVP:
    rank = dim(p) if rank is None else rank
    return ifunc.ihvp_arnoldi(p.loss, p.params, p.data, rank=rank, damping=lam, blocks=_named(p, blocks))


def _nystrom(p: Problem, lam: float | None, *, blocks: Blocks = "full", rank: int | None = None) -> ifunc.IHVP:
    rank = dim(p) if rank is None else rank
    return ifunc.ihvp_nystrom(p.loss, p.params, p.data, rank=rank, damping=lam, blocks=_named(p, blocks))


def _lissa(p: Problem, lam: float | None, *, blocks: Blocks = "full") -> ifunc.IHVP:
    """LiSSA over all the data with ``s = λ_max(C) + λ`` and ``depth = (s/λ) ln(1e3)``.

    Every step then contracts each eigen-direction by ``r = 1 − (h + λ)/s`` in ``[0, 1 − λ/s]``, so the
    truncated Neumann sum is within a relative ``r^depth <= 1e-3`` of the solve. A call costs ``depth``
    curvature products: keep ``λ`` a sizeable fraction of ``λ_max``. ``damping=None`` resolves the rule's λ
    with a one-step build (deterministic) to size ``s`` and ``depth``; the returned closure resolves the same
    λ itself, so it records the rule.
    """
    named = _named(p, blocks)
    if lam is None:
        size = ifunc.ihvp_lissa(p.loss, p.params, p.data, depth=1, blocks=named).damping
    else:
        size = lam
    s = float(torch.linalg.eigvalsh(blocks_of(ggn, named)(p)).max()) + size
    depth = int(s / size * 6.91) + 1
    return ifunc.ihvp_lissa(p.loss, p.params, p.data, damping=lam, scale=s, depth=depth, blocks=named)


def _datainf(p: Problem, lam: float | None, **kw) -> ifunc.IHVP:
    return ifunc.ihvp_datainf(p.loss, p.params, p.data, damping=lam, **kw)


def _datainf_fisher(p: Problem, lam: float | None) -> ifunc.IHVP:
    return _datainf(categorical(p), lam, curvature="fisher")


def _kronecker(method) -> Callable[..., ifunc.IHVP]:
    def build(p: Problem, lam: float | None) -> ifunc.IHVP:
        return method(p.loss, p.params, p.data, model=p.model, damping=lam, curvature="ggn")

    return build


def _identity(p: Problem, lam: float | None) -> ifunc.IHVP:
    return ifunc.ihvp_identity(p.params, model=p.model, damping=lam)


# the "adam" row's optimizer state: as after _ADAM_STEP steps with β₂ = 0.99 and ε = 1e-3 (so the bias correction
# and ε both matter), drawn from seed 0 module parameter by module parameter; loaded, never trained (module untouched)
_ADAM_STEP, _ADAM_BETA2, _ADAM_EPS = 5, 0.99, 1e-3


def _adam_squares(p: Problem) -> dict[str, torch.Tensor]:
    """``exp_avg_sq`` of every module parameter by name (float64; independent of the loss, so ``degree=0``)."""
    gen = torch.Generator().manual_seed(0)
    return {
        name: 0.05 * (0.2 + torch.rand(q.shape, generator=gen, dtype=torch.float64)) ** 2
        for name, q in p.model.named_parameters()
    }


def _adam(p: Problem, lam: float | None) -> ifunc.IHVP:
    """``ihvp_adam`` over an Adam that holds the module's parameters; ``p.params`` are copies moved away from them,
    so ``model=`` matches them by name (and gives the closure its layers)."""
    opt = torch.optim.Adam(p.model.parameters(), betas=(0.9, _ADAM_BETA2), eps=_ADAM_EPS)
    squares = _adam_squares(p)
    state = {
        i: {"step": torch.tensor(float(_ADAM_STEP)), "exp_avg": torch.zeros_like(v), "exp_avg_sq": v}
        for i, v in enumerate(squares[name] for name, _ in p.model.named_parameters())
    }
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return ifunc.ihvp_adam(p.params, opt, damping=lam, model=p.model)


def _adam_diagonal(p: Problem) -> torch.Tensor:
    """``diag(D)`` with ``D = (√(v / (1 − β₂^t)) + ε)²`` (``ihvp_adam``'s default power 1), by hand, in
    ``ifunc.flatten`` order."""
    D = {n: ((v / (1 - _ADAM_BETA2**_ADAM_STEP)).sqrt() + _ADAM_EPS) ** 2 for n, v in _adam_squares(p).items()}
    return torch.diag(ifunc.flatten(D)[0])


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
      name: test id.
      builder: ``(problem, damping, **options) -> IHVP``; ``damping=None`` is the method's default rule.
      exactness: ``"exact"`` (agrees with ``solve(reference(problem) + λI, ·)`` within ``tol``) or
        ``"approximate"`` (structural properties only).
      reference: ``problem -> C [d, d]``, the undamped curvature the closure inverts exactly (``None`` when
        approximate).
      tol: relative error allowed against the dense solve (exact methods only).
      rtol: relative error allowed in the structural identities (stack = singles, linearity, symmetry,
        damping order); iterative solvers are linear maps only up to their tolerance.
      options: keyword arguments of ``builder`` this row passes (``blocks=``, ``rank=``).
      fixed: ``make_problem`` arguments this row fixes (the special problems where a method is exact).
      free_redamping: ``with_damping`` reuses the factorisation; otherwise the damping test rebuilds.
      rule_curvature: ``problem -> C``, the curvature whose mean eigenvalue ``damping=None`` takes (one λ for
        the closure); ``None`` for the Kronecker family (a λ per block).
      rule_exact: ``damping=None`` computes ``tr(C)`` exactly (else a Hutchinson estimate).
      degree: scaling the loss by ``c`` scales the curvature by ``c^degree`` (1 for the GGN, 2 for gradient
        outer products at the data's labels, 0 when there is no curvature or the labels are sampled).
    """

    name: str
    builder: Callable[..., ifunc.IHVP]
    exactness: str
    reference: Callable[[Problem], torch.Tensor] | None = None
    tol: float | None = None
    rtol: float = 1e-9
    options: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    free_redamping: bool = True
    rule_curvature: Callable[[Problem], torch.Tensor] | None = ggn
    rule_exact: bool = True
    degree: int = 1

    def build(self, problem: Problem, damping: float | None, **options) -> ifunc.IHVP:
        """The row's closure on ``problem``; ``options`` override the row's own."""
        return self.builder(problem, damping, **{**self.options, **options})

    def problem(self, spec: dict) -> Problem:
        """The problem of a drawn ``spec`` (seed, sizes, n, activation, task) with this row's ``fixed`` applied."""
        return make_problem(**{**spec, **self.fixed})

    def __str__(self) -> str:
        return self.name


# Nyström only on a non-singular GGN (squared error, n·d_out >= 24 >= d): on a singular one (every
# cross-entropy problem, where shifting all logits is a null direction) the Cholesky of Ωᵀ H Ω used to fail
# when round-off exceeded the shift ν; test_nystrom_sketch_of_a_singular_ggn in test_contract.py pins the fix
_FULL_RANK = {"task": "regression", "n": 12}
_DEEP_LINEAR_MSE = {"activation": None, "task": "regression"}
_ONE_EXAMPLE = {"n": 1, "task": "classification"}
# labels sampled from the model: the scale of the loss does not enter the curvature
_SAMPLED: dict[str, Any] = {"fixed": {"task": "classification"}, "rule_curvature": sampled_fisher, "degree": 0}
# squared error makes the last layer's GGN block (Σ h hᵀ) ⊗ I: its eigenvalues come in tied groups of d_out, which
# a rank-2 cut splits arbitrarily (float32 and float64 keep different eigenvectors); cross-entropy unties them
_UNTIED: dict[str, Any] = {"fixed": {"task": "classification"}, "rule_exact": False}
_ITERATIVE: dict[str, Any] = {"free_redamping": False, "rule_exact": False}
_FULL, _LAYER, _KIND = {"blocks": "full"}, {"blocks": "layer"}, {"blocks": kind}
_LAYER_GGN, _KIND_GGN, _LAYER_EF = blocks_of(ggn, "layer"), blocks_of(ggn, kind), blocks_of(empirical_fisher, "layer")
_EF = {**_FULL, "curvature": "empirical_fisher"}
_OUTER: dict[str, Any] = {
    "rule_curvature": empirical_fisher,
    "degree": 2,
}  # gradient outer products at the data's labels
_PER_BLOCK: dict[str, Any] = {"rule_curvature": None}  # the Kronecker family's damping rule: a λ per block
_EKFAC, _KFAC, _DIAGONAL = (_kronecker(m) for m in (ifunc.ihvp_ekfac, ifunc.ihvp_kfac, ifunc.ihvp_diagonal))

METHODS: list[Method] = [
    # the full curvature
    Method("explicit", _explicit, "exact", ggn, tol=1e-10, options=_FULL),
    Method("cg", _cg, "exact", ggn, tol=1e-8, rtol=1e-8, options=_FULL, **_ITERATIVE),
    Method("lissa", _lissa, "exact", ggn, tol=2e-3, options=_FULL, **_ITERATIVE),
    Method("arnoldi", _arnoldi, "exact", ggn, tol=1e-7, options=_FULL),
    Method("nystrom", _nystrom, "exact", ggn, tol=1e-7, options=_FULL, fixed=_FULL_RANK),
    # block-diagonal modes: exact against the same blocks of the GGN
    Method("explicit-layer", _explicit, "exact", _LAYER_GGN, tol=1e-10, options=_LAYER),
    Method("cg-layer", _cg, "exact", _LAYER_GGN, tol=1e-8, rtol=1e-8, options=_LAYER, **_ITERATIVE),
    Method("lissa-layer", _lissa, "exact", _LAYER_GGN, tol=2e-3, options=_LAYER, **_ITERATIVE),
    Method("arnoldi-layer", _arnoldi, "exact", _LAYER_GGN, tol=1e-7, options=_LAYER),
    Method("nystrom-layer", _nystrom, "exact", _LAYER_GGN, tol=1e-7, options=_LAYER, fixed=_FULL_RANK),
    Method("explicit-weights-biases", _explicit, "exact", _KIND_GGN, tol=1e-10, options=_KIND),
    # low-rank: the top eigenpairs (of the whole curvature, or of each block) plus λ on the complement
    Method("arnoldi-rank-3", _arnoldi, "approximate", options={**_FULL, "rank": 3}, rule_exact=False),
    Method("nystrom-rank-3", _nystrom, "approximate", options={**_FULL, "rank": 3}, fixed=_FULL_RANK, rule_exact=False),
    Method("arnoldi-layer-rank-2", _arnoldi, "approximate", options={**_LAYER, "rank": 2}, **_UNTIED),
    Method("nystrom-layer-rank-2", _nystrom, "approximate", options={**_LAYER, "rank": 2}, rule_exact=False),
    # gradient curvatures: the empirical Fisher; DataInf's mean of inverses, exact for one data point
    Method("explicit-empirical-fisher", _explicit, "exact", empirical_fisher, tol=1e-10, options=_EF, **_OUTER),
    Method("datainf", _datainf, "approximate", **_OUTER),
    Method("datainf-one-example", _datainf, "exact", _LAYER_EF, tol=1e-9, fixed=_ONE_EXAMPLE, **_OUTER),
    Method("datainf-fisher", _datainf_fisher, "approximate", **_SAMPLED),
    # Kronecker family: approximate in general, exact for deep linear MSE and for one data point
    Method("ekfac", _EKFAC, "approximate", **_PER_BLOCK),
    Method("kfac", _KFAC, "approximate", **_PER_BLOCK),
    Method("ekfac-deep-linear-mse", _EKFAC, "exact", _LAYER_GGN, tol=1e-9, fixed=_DEEP_LINEAR_MSE, **_PER_BLOCK),
    Method("kfac-one-example", _KFAC, "exact", _LAYER_GGN, tol=1e-9, fixed=_ONE_EXAMPLE, **_PER_BLOCK),
    Method("diagonal", _DIAGONAL, "exact", diagonal_of(ggn), tol=1e-10, **_PER_BLOCK),
    Method("identity", _identity, "exact", zero, tol=1e-12, degree=0, **_PER_BLOCK),
    # the optimizer's own state: (√v̂ + ε)², exact against the diagonal computed by hand (no data: degree 0)
    Method("adam", _adam, "exact", _adam_diagonal, tol=1e-10, degree=0, **_PER_BLOCK),
]

EXACT = [m for m in METHODS if m.exactness == "exact"]
#: rows whose builder takes ``blocks=`` and that solve the full curvature: one block must equal them
FULL_BLOCKS = [m for m in METHODS if m.options.get("blocks") == "full"]
