import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem, random_spd


def test_lanczos_full_rank_recovers_the_spectrum_even_with_repeated_eigenvalues():
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))
    w = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.1])
    A = (Q * w) @ Q.T
    theta, U = ifunc.lanczos(lambda V: V @ A, 10, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theta, w.sort().values, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(U.T @ U, torch.eye(10), atol=1e-8, rtol=0)


def test_top_eigenpairs_of_a_random_spd_matrix():
    A = random_spd(40, cond=1e3, seed=2)
    theta, U = ifunc.lanczos(lambda V: V @ A, 40, 20, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(theta[-3:], exact[-3:], rtol=1e-6, atol=1e-8)


def test_eigenpairs_are_computed_once_and_the_complement_is_kept():
    _, params, loss, data = mlp_problem(seed=5, sizes=(3, 5, 3), n=10)
    calls = []
    counted = ifunc.output_loss(lambda p, b: (calls.append(1), loss.outputs(p, b))[1], loss.loss_on_outputs)
    lam = 0.1
    ihvp = ifunc.ihvp_arnoldi(counted, params, data, rank=3, damping=lam, oversample=30)
    built = len(calls)
    d = ihvp.dim
    V = torch.randn(5, d)
    ihvp(V)
    ihvp(V[0])
    assert len(calls) == built  # no Krylov work per call (dattri recomputes it every time)
    # a vector orthogonal to the kept eigenvectors sees only the damping: 1/λ, not 0
    w = ihvp.info["eigenvalues"]
    assert w.shape == (3,)
    G = ifunc.ggn(loss, params, data)
    evals, evecs = torch.linalg.eigh(G)
    top = evecs[:, -3:]
    torch.testing.assert_close(w.sort().values, evals[-3:], rtol=1e-5, atol=1e-8)
    v = torch.randn(d)
    v_perp = v - top @ (top.T @ v)
    torch.testing.assert_close(ihvp(v_perp), v_perp / lam, rtol=1e-4, atol=1e-6)
    v_in = top[:, -1]
    torch.testing.assert_close(ihvp(v_in), v_in / (evals[-1] + lam), rtol=1e-5, atol=1e-8)


def test_rank_must_be_valid_and_damping_positive_below_full_rank():
    _, params, loss, data = mlp_problem(seed=5)
    d = ifunc.flatten(params)[0].numel()
    with pytest.raises(ValueError, match="rank must be in"):
        ifunc.ihvp_arnoldi(loss, params, data, rank=d + 1, damping=0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        ifunc.ihvp_arnoldi(loss, params, data, rank=2, damping=0.0)


@pytest.mark.parametrize(
    "build, error, pattern",
    [
        (lambda p: ifunc.ihvp_arnoldi(*p, rank=True, damping=0.1), TypeError, "ihvp_arnoldi: rank .* the bool True"),
        (lambda p: ifunc.ihvp_arnoldi(*p, rank=2.0, damping=0.1), TypeError, "ihvp_arnoldi: rank must be an int"),
        (lambda p: ifunc.ihvp_arnoldi(*p, rank=0, damping=0.1), ValueError, "ihvp_arnoldi: rank must be an int >= 1"),
        (
            lambda p: ifunc.ihvp_arnoldi(*p, rank=2, oversample=-1, damping=0.1),
            ValueError,
            "oversample must be an int >= 0, got -1",
        ),
        (lambda p: ifunc.ihvp_arnoldi(*p, rank=2, oversample=1.5, damping=0.1), TypeError, "oversample must be an int"),
        # the other count hyperparameters of the family, with the same check
        (lambda p: ifunc.ihvp_datainf(*p, chunk_size=True, damping=0.1), TypeError, "chunk_size .* the bool True"),
        (lambda p: ifunc.ihvp_datainf(*p, chunk_size=0, damping=0.1), ValueError, "chunk_size must be an int >= 1"),
        (lambda p: ifunc.ihvp_lissa(*p, depth=False, damping=0.1), TypeError, "depth .* the bool False"),
        (lambda p: ifunc.ihvp_lissa(*p, repeat=1.0, damping=0.1), TypeError, "repeat must be an int"),
    ],
)
def test_counts_are_ints_and_a_bool_is_not_one(build, error, pattern):
    _, params, loss, data = mlp_problem(seed=5)
    with pytest.raises(error, match=pattern):
        build((loss, params, data))


def test_oversample_zero_is_allowed_and_full_rank_stays_exact():
    _, params, loss, data = mlp_problem(seed=5)
    d = ifunc.flatten(params)[0].numel()
    a = ifunc.ihvp_arnoldi(loss, params, data, rank=d, oversample=0, damping=0.1)
    b = ifunc.ihvp_explicit(loss, params, data, damping=0.1)
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(v), b(v), rtol=1e-7, atol=1e-9)
