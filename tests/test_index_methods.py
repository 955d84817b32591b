"""Every method of the table answers from a gradient index as it answers from the training data.

For each row of ``tests/methods.py`` the closure is built on a small problem and its scores against a gradient
index of the training data, ``s̃[q, i] = ⟨P Q̃_q, P g_i⟩`` (``Q̃_q`` the closure's preconditioned query, ``g_i``
example ``i``'s gradient, ``P`` the index's projection, rows stored in float32), are compared with its scores against
the data, ``s[q, i] = ⟨Q̃_q, g_i⟩``:

- the identity projection (sizes at their caps): ``s̃`` is ``s`` up to the float32 rounding of the stored rows;
- a random projection: ``|s̃ − s|`` stays within a multiple of the standard deviation the projection's variance
  allows, and the mean of ``s̃`` over seeds approaches ``s`` (the projection is unbiased).

Indexes depend on the problem only (not on the closure), so the rows sharing a problem share them (one module cache).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import ifunc
from ifunc.index import GradientIndex, Projection, project_flat

from .methods import METHODS, Method
from .problems import Problem, ggn, make_problem

#: the problem every row runs on (its ``fixed`` applied): a 3-4-3 tanh MLP, d = 31, ten training examples
SPEC: dict[str, Any] = {"seed": 3, "sizes": (3, 4, 3), "n": 10, "activation": nn.Tanh, "task": "classification"}
N_QUERY = 3
U32 = 2.0**-24  #: float32 unit roundoff: a stored row entry is x(1 + δ) with |δ| ≤ U32
#: float32 runs, both paths: |s̃ − s| ≤ TOL32 ‖Q̃_q‖‖g_i‖. Both compute g_i in float32 by different routes (captured
#: a, g against vmap(grad); the Kronecker scorers rotate into their eigenbasis) and sum d = 31 products, each a few
#: U32 relative to ‖Q̃‖‖g‖: measured at most 2.4 U32 over the table (1.45e-7), so 32 U32 leaves a margin of 13
TOL32 = 32 * U32
#: a random projection: ``layer_size`` 2 on the last layer (out 3, in_eff 5), the first layer (16 values) dense to 6
PROJECTED: dict[str, Any] = {"layer_size": 2, "dense_size": 6}
#: the per-entry bound is C standard deviations. Chebyshev alone gives P(|s̃ − s| > Cσ) ≤ 1/C² = 1/36 for any law;
#: s̃ − s is a quadratic form of Gaussians and signs (sub-exponential), whose tails are far lighter. At the fixed
#: seeds the largest |s̃ − s| / σ over all rows and entries is 1.3 (seed 0, on the deep linear problem;
#: at most 0.53 on the others) and 2.1 for the mean over SEEDS in units of σ/√SEEDS: C = 6 is a margin of 2.8 or more
C = 6.0
SEEDS = 12


def _problem(method: Method, dtype: torch.dtype) -> Problem:
    """The row's problem (float64, or its float32 copy with the model cast: the loss calls the model)."""
    p = method.problem(SPEC)
    if dtype == torch.float64:
        return p
    x, y = p.data
    params = {k: v.to(dtype) for k, v in p.params.items()}
    return Problem(p.model.to(dtype), params, p.loss, (x.to(dtype), y.to(dtype) if y.is_floating_point() else y))


def _query(method: Method, dtype: torch.dtype):
    """N_QUERY examples of the row's task drawn from another seed (not training examples)."""
    x, y = make_problem(**{**SPEC, **method.fixed, "seed": SPEC["seed"] + 100, "n": N_QUERY}).data
    return x.to(dtype), y.to(dtype) if y.is_floating_point() else y


def _closure(method: Method, problem: Problem) -> ifunc.IHVP:
    """The row's closure at λ = λ_max(GGN) / 2 (the float64 GGN: the same λ in both dtypes)."""
    p64 = method.problem(SPEC)
    return method.build(problem, 0.5 * float(torch.linalg.eigvalsh(ggn(p64)).max()))


def _last_linear(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


class _Indexes:
    """Indexes built once per (problem, kind, seed, dtype) into one directory."""

    def __init__(self, folder):
        self.folder, self.built = folder, {}

    def get(self, method: Method, problem: Problem, kind: str, *, seed: int = 0) -> GradientIndex:
        dtype = problem.params["0.weight"].dtype
        key = (repr(sorted({**SPEC, **method.fixed}.items())), kind, seed, str(dtype))
        if key not in self.built:
            options = {
                "layers": {"model": problem.model, "layer_size": 10**6},  # every layer captured, at its cap
                "dense": {"dense_size": 10**6},  # no model: every parameter dense, at its cap
                "projected": {"model": problem.model, "modules": [_last_linear(problem.model)], **PROJECTED},
            }[kind]
            out = self.folder / f"{len(self.built)}.h5"
            self.built[key] = ifunc.build_index(
                problem.loss, problem.params, problem.data, out, seed=seed, progress=False, **options
            )
        return self.built[key]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> _Indexes:
    return _Indexes(tmp_path_factory.mktemp("indexes"))


def _terms(closure, problem: Problem, query) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q̃ [q, d], G [n, d])`` in float64: the preconditioned queries and the training gradients."""
    G = ifunc.per_sample_grads(problem.loss, problem.params, problem.data)
    Q = closure(ifunc.per_sample_grads(problem.loss, problem.params, query))
    return Q.double(), G.double()


def _is_identity(P: Projection, d: int) -> bool:
    at_caps = all((L.k_o, L.k_a) == (L.out_features, L.in_eff) for L in P.layers)
    return at_caps and P.k_dense == sum(k for _, k in P.dense) and P.dim == d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["layers", "dense"])
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_an_uncompressed_index_scores_like_the_training_data(method, kind, dtype, indexes):
    """Identity projection: ``s̃ = Σ_j Q̃_j fl32(g_j)``, so ``|s̃ − s| ≤ U32 Σ_j |Q̃_j||g_j| ≤ U32 ‖Q̃_q‖‖g_i‖``.

    In float64 the only difference is the rounding of the stored rows (the float64 products add ~1e-16), so the
    bound is 2 U32 ‖Q̃_q‖‖g_i‖ (measured at most 0.28 U32; a relative 1e-10 is impossible with float32
    rows). In float32 both paths round throughout: TOL32 ‖Q̃_q‖‖g_i‖.
    """
    problem, query = _problem(method, dtype), _query(method, dtype)
    closure = _closure(method, problem)
    index = indexes.get(method, problem, kind)
    Q, G = _terms(closure, problem, query)
    assert _is_identity(index.projection, G.shape[1]) and index.n == G.shape[0]
    direct = ifunc.attribute(problem.loss, problem.params, closure, problem.data, query, progress=False)
    from_index = ifunc.attribute(problem.loss, problem.params, closure, index, query, progress=False)
    assert from_index.dtype == direct.dtype == dtype and from_index.shape == direct.shape == (N_QUERY, index.n)
    scale = Q.norm(dim=1)[:, None] * G.norm(dim=1)[None, :]  # ‖Q̃_q‖‖g_i‖ [q, n]
    tol = 2 * U32 if dtype == torch.float64 else TOL32
    err = (from_index.double() - direct.double()).abs()
    assert bool((err <= tol * scale).all()), f"{method}: max |s̃ − s| / ‖Q̃‖‖g‖ = {float((err / scale).max()):.3g}"
    assert float(direct.abs().max()) > 100 * tol * float(scale.max())  # the scores are far above the tolerance


def _block_variance(P: Projection, problem: Problem, Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``[q, n]`` upper bound on ``Var s̃[q, i]`` over the projection's seed.

    Dense part, ``k`` rows: a Gaussian ``R`` with entries ``N(0, 1/k)`` has ``Var⟨Rx, Ry⟩ = (‖x‖²‖y‖² +
    ⟨x, y⟩²)/k ≤ (2/k)‖x‖²‖y‖²``; a sign hash (CountSketch) has that minus ``2Σ_i x_i²y_i²/k``, less: ``ε = 2/k``.
    Factored ``x ↦ P_o X P_aᵀ`` (``P_o [k_o, out]``, ``P_a [k_a, in]`` independent Gaussians): conditioning on
    ``P_o``, the rows ``p_j`` of ``P_a`` give ``‖P_o X P_aᵀ‖² = Σ_j ‖Y p_j‖²`` with ``Y = P_o X``, whose second
    moment is ``‖Y‖⁴ + 2‖YᵀY‖²/k_a ≤ (1 + 2/k_a)‖Y‖⁴``; then ``E‖P_o X‖⁴ ≤ (1 + 2/k_o)‖X‖⁴``. So
    ``E‖Px‖⁴ ≤ f ‖x‖⁴`` with ``f = f_o f_a``, ``f_o = 1 + 2/k_o`` (1 when ``P_o = I`` at the cap), ``f_a`` alike,
    i.e. ``Var‖Px‖² ≤ ε‖x‖⁴`` with ``ε = f − 1`` (``2/k`` for one Gaussian, as above). Polarisation: with unit
    ``x, y``, ``⟨Px, Py⟩ − ⟨x, y⟩ = (Z₊ − Z₋)/4`` where ``Z± = ‖P(x ± y)‖² − ‖x ± y‖²``, so ``Var ≤ (√Var Z₊ +
    √Var Z₋)²/16 ≤ ε(‖x + y‖² + ‖x − y‖²)²/16 = ε``. Blocks (each layer, the dense part) are drawn from their own
    seeds, hence independent: ``Var s̃ ≤ Σ_b ε_b ‖Q̃_b‖²‖g_b‖²``, ``ε_b = 0`` for a block at its cap.
    """

    def factor(k: int, cap: int) -> float:
        return 1.0 if k == cap else 1.0 + 2.0 / k

    blocks = [({L.weight, L.bias}, factor(L.k_o, L.out_features) * factor(L.k_a, L.in_eff) - 1) for L in P.layers]
    if P.dense:
        blocks.append(({n for n, _ in P.dense}, factor(P.k_dense, sum(k for _, k in P.dense)) - 1))
    variance = Q.new_zeros(Q.shape[0], G.shape[0])
    for names, eps in blocks:
        mask = ifunc.flatten({k: torch.full_like(v, float(k in names)) for k, v in problem.params.items()})[0]
        variance += eps * (Q * mask).norm(dim=1)[:, None] ** 2 * (G * mask).norm(dim=1)[None, :] ** 2
    assert all(eps > 0 for _, eps in blocks)  # every block projected: the test means something
    return variance


def _storage(index: GradientIndex, problem: Problem, Q: torch.Tensor) -> torch.Tensor:
    """``[q, n]``: 2 U32 ‖P Q̃_q‖‖P g_i‖, a bound (factor 2: slack) on what the float32 rows change in ``s̃``."""
    PQ = project_flat(index.projection, Q, problem.params)
    return 2 * U32 * PQ.norm(dim=1)[:, None] * index.matrix().double().norm(dim=1)[None, :]


def _projected(method: Method, indexes: _Indexes, seeds: range):
    """``(direct s [q, n], [s̃ per seed], σ bound [q, n], storage bound [q, n])`` of the row on a random projection."""
    problem, query = _problem(method, torch.float64), _query(method, torch.float64)
    closure = _closure(method, problem)
    Q, G = _terms(closure, problem, query)
    direct = ifunc.attribute(problem.loss, problem.params, closure, problem.data, query, progress=False)
    got, storage = [], torch.zeros_like(direct)
    for seed in seeds:
        index = indexes.get(method, problem, "projected", seed=seed)
        assert index.dim < G.shape[1] / 2  # compressed: 4 + 6 coordinates of 31
        got.append(ifunc.attribute(problem.loss, problem.params, closure, index, query, progress=False))
        storage = torch.maximum(storage, _storage(index, problem, Q))
    return direct, got, _block_variance(index.projection, problem, Q, G).sqrt(), storage


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_a_projected_index_is_within_the_projection_variance(method, indexes):
    """One seed: ``|s̃ − s| ≤ C σ + storage`` for every (query, example), σ the bound of :func:`_block_variance`.

    With one Gaussian of ``k`` rows this is ``|s̃ − s| ≤ C √(2/k) ‖Q̃_q‖‖g_i‖``; per block it is tighter.
    """
    direct, (got,), sigma, storage = _projected(method, indexes, range(1))
    err = (got - direct).abs()
    assert bool((err <= C * sigma + storage).all()), f"{method}: max |s̃ − s| / σ = {float((err / sigma).max()):.3g}"
    assert bool((err > storage).any())  # the projection does change the scores (not the identity by mistake)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_the_mean_over_seeds_approaches_the_uncompressed_scores(method, indexes):
    """Unbiased: the mean of SEEDS independent ``s̃`` has standard deviation ≤ σ/√SEEDS around ``E s̃ = s``, so
    ``|mean − s| ≤ C σ/√SEEDS + storage``: a bias larger than that (under a third of one seed's
    allowance) is caught."""
    direct, got, sigma, storage = _projected(method, indexes, range(SEEDS))
    mean = torch.stack(got).mean(dim=0)
    err, allowed = (mean - direct).abs(), C * sigma / math.sqrt(SEEDS) + storage
    assert bool((err <= allowed).all()), (
        f"{method}: max |mean − s| / (σ/√S) = {float((err / sigma).max()) * SEEDS**0.5:.3g}"
    )
    spread = torch.stack(got).std(dim=0)
    assert bool((spread <= C * sigma).all())  # the seeds differ, within the variance bound
    assert float(spread.max()) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["ekfac", "kfac"])
def test_kronecker_queries_projected_through_their_factors_equal_the_flat_projection(name, dtype, tmp_path):
    """A Kronecker closure's queries reach a random all-layers index as ``(P_o Q_S) R (P_a Q_A)ᵀ``, never rotated
    back to parameter space: the scores equal ``(P Q̃) R_iᵀ`` with ``P Q̃`` projected from the flat ``Q̃`` (what any
    other closure does), to the rounding of the two association orders (``tol ‖P Q̃_q‖‖r_i‖``)."""
    method = next(m for m in METHODS if m.name == name)
    problem, query = _problem(method, dtype), _query(method, dtype)
    closure = _closure(method, problem)
    index = ifunc.build_index(
        problem.loss, problem.params, problem.data, tmp_path / "k.h5", model=problem.model, layer_size=2,
        dense_size=6, progress=False,
    )  # fmt: skip
    assert index.projection.layers and all(L.k_o < L.out_features for L in index.projection.layers)
    got = ifunc.attribute(problem.loss, problem.params, closure, index, query, progress=False)
    Q = closure(ifunc.per_sample_grads(problem.loss, problem.params, query))
    PQ = project_flat(index.projection, Q, problem.params)  # [q, dim] in the closure's dtype
    rows = index.matrix().to(PQ.dtype)
    want = PQ @ rows.T
    scale = PQ.norm(dim=1)[:, None] * rows.norm(dim=1)[None, :]
    tol = 1e-12 if dtype == torch.float64 else 64 * U32
    assert got.dtype == dtype and got.shape == want.shape
    assert bool(((got.double() - want.double()).abs() <= tol * scale.double()).all())
    assert float(want.abs().max()) > 100 * tol * float(scale.max())
