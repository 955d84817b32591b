"""The method table in float32, the dtype users train in: every closure keeps its dtype, agrees with its own
float64 twin to float32 precision, and the exact rows agree with the float64 dense solve.

(``conftest.py`` makes float64 the default for the rest of the suite; a test that only ever runs float64
hides the dtype users use.)
"""

import pytest
import torch
from torch import nn

import ifunc
from ifunc.testing import rel_error

from .methods import METHODS, Method, Problem, dim, ggn

#: relative error allowed between a float32 closure and the float64 reference (a well-conditioned problem:
#: λ = λ_max / 2, so the damped curvature has condition number at most 3)
TOL32 = 2e-4

SPECS = [
    {"seed": 0, "sizes": (3, 4, 2), "n": 8, "activation": nn.Tanh, "task": "classification"},
    {"seed": 1, "sizes": (2, 3, 3), "n": 12, "activation": nn.Tanh, "task": "regression"},
]


def _float32(problem: Problem) -> Problem:
    """The same problem with the model, parameters and inputs in float32 (its own model: the loss calls it)."""
    model = problem.model.float()
    params = {k: v.float() for k, v in problem.params.items()}
    x, y = problem.data
    return Problem(model, params, problem.loss, (x.float(), y.float() if y.is_floating_point() else y))


def _pair(method: Method, spec: dict) -> tuple[Problem, Problem]:
    """Two independent copies of the row's problem: float64 and float32."""
    return method.problem(spec), _float32(method.problem(spec))


@pytest.mark.parametrize("spec", SPECS, ids=["classification", "regression"])
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_float32_closure_agrees_with_float64(method, spec):
    p64, p32 = _pair(method, spec)
    lam = 0.5 * float(torch.linalg.eigvalsh(ggn(p64)).max())
    V = torch.randn(3, dim(p64), generator=torch.Generator().manual_seed(spec["seed"]))
    f64, f32 = method.build(p64, lam), method.build(p32, lam)
    X64, X32 = f64(V), f32(V.float())
    assert X32.dtype == torch.float32 and X32.shape == V.shape
    assert torch.isfinite(X32).all()
    # LiSSA and CG stop on tolerances met by float64 arithmetic; the float32 run reaches its own precision
    tol = max(TOL32, method.tol or 0.0)
    assert rel_error(X32.double(), X64) < tol, method.name
    if method.exactness == "exact":
        assert method.reference is not None
        A = method.reference(p64) + lam * torch.eye(dim(p64))
        assert rel_error(X32.double(), torch.linalg.solve(A, V.T).T) < tol


@pytest.mark.parametrize(
    "method", [m for m in METHODS if m.name in ("explicit", "cg", "ekfac", "diagonal", "identity")]
)
def test_float32_scores_agree_with_float64(method):
    spec = SPECS[0]
    p64, p32 = _pair(method, spec)
    lam = 0.5 * float(torch.linalg.eigvalsh(ggn(p64)).max())
    s64 = ifunc.attribute(p64.loss, p64.params, method.build(p64, lam), p64.data, p64.data, progress=False)
    s32 = ifunc.attribute(p32.loss, p32.params, method.build(p32, lam), p32.data, p32.data, progress=False)
    assert s32.dtype == torch.float32
    assert rel_error(s32.double(), s64) < TOL32
