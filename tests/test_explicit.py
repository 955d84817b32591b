import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem, random_spd


def test_from_matrix_is_exact_and_damping_is_free():
    A = random_spd(6, cond=1e3, seed=1)
    params = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    ihvp = ifunc.ihvp_from_matrix(A, params, damping=0.0)
    V = torch.randn(3, 6)
    torch.testing.assert_close(ihvp(V), torch.linalg.solve(A, V.T).T)
    torch.testing.assert_close(ihvp.with_damping(2.0)(V), torch.linalg.solve(A + 2 * torch.eye(6), V.T).T)


def test_indefinite_hessian_is_refused_with_a_fix():
    _, params, loss, data = mlp_problem(seed=3, n=10)
    H = ifunc.hessian(loss, params, data)
    lowest = float(torch.linalg.eigvalsh(H).min())
    assert lowest < 0
    with pytest.raises(ValueError, match="not positive definite.*raise damping above"):
        ifunc.ihvp_explicit(loss, params, data, curvature="hessian", damping=0.0)
    ok = ifunc.ihvp_explicit(loss, params, data, curvature="hessian", damping=-lowest + 0.1)
    v = torch.randn(ok.dim)
    torch.testing.assert_close(ok(v), torch.linalg.solve(H + (-lowest + 0.1) * torch.eye(ok.dim), v))


def test_matrix_shape_and_finiteness_are_checked():
    params = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"must be \[3, 3\]"):
        ifunc.ihvp_from_matrix(torch.eye(4), params)
    with pytest.raises(ValueError, match="NaN"):
        ifunc.ihvp_from_matrix(torch.full((3, 3), float("nan")), params)
