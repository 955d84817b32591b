import math

import pytest
import torch
import torch.nn.functional as F

import ifunc
from ifunc.ihvp.lissa import DEFAULT_TOL, MAX_DEFAULT_DEPTH
from ifunc.testing import mlp_problem, rel_error

DTYPES = [torch.float32, torch.float64]


def _problem(dtype=torch.float64, **kw):
    """``mlp_problem`` in ``dtype`` with its dense GGN (float64) and three right-hand sides in ``dtype``."""
    _, params, loss, (x, y) = mlp_problem(**{"seed": 3, "n": 8, **kw}, dtype=dtype)
    G = ifunc.ggn(loss, {k: p.double() for k, p in params.items()}, (x.double(), y))
    V = torch.randn(3, G.shape[0], generator=torch.Generator().manual_seed(0), dtype=dtype)
    return params, loss, (x, y), G, V


def _residual(X, G, lam, V):
    """The largest relative residual ``‖(G + λI)x − v‖ / ‖v‖`` against the dense matrix, in float64."""
    X, V = X.double(), V.double()
    return float(((X @ G + lam * X - V).norm(dim=1) / V.norm(dim=1)).max())


def _spearman(a, b):
    ra, rb = (t.argsort(1).argsort(1).double() for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


# ----------------------------------------------------------------- the recursion itself


def test_full_batch_lissa_is_the_truncated_neumann_sum():
    params, loss, data, G, _ = _problem()
    lam, s, depth = 0.1, 4.0, 7
    A = G + lam * torch.eye(G.shape[0])
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0))
    M = torch.eye(G.shape[0]) - A / s
    expected, term = torch.zeros_like(v), v.clone()
    for _ in range(depth + 1):
        expected += term
        term = M @ term
    expected /= s
    out = ifunc.ihvp_lissa(loss, params, data, damping=lam, scale=s, depth=depth, tol=None)(v)
    torch.testing.assert_close(out, expected)
    # the residual of the truncated sum is the next term, (I − A/s)^(depth+1) v: above tol, so a checked call raises
    assert float((v - A @ out).norm() / v.norm()) == pytest.approx(float(term.norm() / v.norm()), rel=1e-10)
    with pytest.raises(ifunc.ConvergenceError, match=r"did not converge.*pass depth >= \d+"):
        ifunc.ihvp_lissa(loss, params, data, damping=lam, scale=s, depth=depth)(v)


def test_arguments_are_keyword_only():
    params, loss, data, _, _ = _problem()
    with pytest.raises(TypeError):
        ifunc.ihvp_lissa(loss, params, data, 0.1, 10.0)  # damping and scale cannot be swapped by position


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_default_depth_reaches_tol_against_the_dense_solve(dtype, lam):
    params, loss, data, G, V = _problem(dtype)
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=lam)
    s, rho = ihvp.info["scale"], ihvp.info["contraction"]
    top = float(torch.linalg.eigvalsh(G).max())
    assert ihvp.info["lambda_max"] == pytest.approx(top, rel=1e-3)
    assert s == pytest.approx(1.5 * (ihvp.info["lambda_max"] + lam))
    assert rho == pytest.approx(1 - lam / s)  # the flattest direction sets the pace
    depth = ihvp.info["depth"]
    assert rho ** (depth + 1) <= DEFAULT_TOL < rho**depth  # the fewest steps that reach tol
    X = ihvp(V)
    assert X.dtype == dtype
    assert _residual(X, G, lam, V) <= DEFAULT_TOL
    exact = torch.linalg.solve(G + lam * torch.eye(G.shape[0]), V.double().T).T
    assert rel_error(X.double(), exact) <= DEFAULT_TOL  # the error shrinks as fast as the residual


# ----------------------------------------------------------------- small damping: accurate or refused


def test_small_damping_with_defaults_is_accurate_to_tol():
    """λ = 1e-3 on a problem whose curvature is small too (the loss × 0.01): few steps, within tol of the solve."""
    _, params, base, data = mlp_problem(seed=3, n=8)
    loss = ifunc.output_loss(base.outputs, lambda out, b: 0.01 * base.loss_on_outputs(out, b))
    G = ifunc.ggn(loss, params, data)
    V = torch.randn(3, G.shape[0], generator=torch.Generator().manual_seed(0))
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=1e-3)
    assert ihvp.info["depth"] < 3000
    assert _residual(ihvp(V), G, 1e-3, V) <= DEFAULT_TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_damping_1e3_with_every_other_default_is_refused_when_it_needs_too_many_steps(dtype):
    """An MLP regressor (λ_max ≈ 3): about 1.6e4 full-data steps would be needed, more than depth=None allows."""
    params, loss, data, _, V = _problem(dtype, task="regression")
    with pytest.raises(ifunc.ConvergenceError, match=r"tol=0.01 at damping 0.001 needs about 1\d{4} steps.*ihvp_cg"):
        ifunc.ihvp_lissa(loss, params, data, damping=1e-3)


@pytest.mark.slow
def test_damping_1e3_with_every_other_default_is_accurate_to_tol_when_the_steps_are_allowed():
    """In float64 (λ_max ≈ 1.1) it needs about 7.7e3 full-data steps, under the limit: it runs and is within tol."""
    params, loss, data, G, V = _problem()
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=1e-3)
    assert 7000 < ihvp.info["depth"] <= MAX_DEFAULT_DEPTH
    X = ihvp(V)
    assert _residual(X, G, 1e-3, V) <= DEFAULT_TOL
    assert rel_error(X, torch.linalg.solve(G + 1e-3 * torch.eye(G.shape[0]), V.T).T) <= DEFAULT_TOL


def test_small_damping_that_needs_too_many_steps_is_refused_at_build():
    params, loss, data, G, _ = _problem()
    lam = 1e-4  # s/λ ≈ 1.7e4: about 7.6e4 steps to reach tol
    with pytest.raises(ifunc.ConvergenceError, match=r"needs about \d+ steps.*ihvp_cg.*pass depth=\d+") as info:
        ifunc.ihvp_lissa(loss, params, data, damping=lam)
    s = 1.5 * (float(torch.linalg.eigvalsh(G).max()) + lam)
    needed = int(str(info.value).split("needs about ")[1].split()[0])
    assert needed > MAX_DEFAULT_DEPTH
    assert needed == pytest.approx(math.log(DEFAULT_TOL) / math.log(1 - lam / s), rel=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_explicit_depth_too_small_raises_with_the_residual_and_the_depth_needed(dtype):
    params, loss, data, G, V = _problem(dtype)
    lam = 1e-3
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=lam, depth=50)
    with pytest.raises(ifunc.ConvergenceError, match=r"3 of 3 .* up to \d\.\d+e-01 > tol=0.01 after 50 steps") as info:
        ihvp(V)
    needed = math.ceil(math.log(DEFAULT_TOL) / math.log(1 - lam / ihvp.info["scale"])) - 1
    assert f"pass depth >= {needed}" in str(info.value) and "ihvp_cg" in str(info.value)


# ----------------------------------------------------------------- divergence at every depth


@pytest.mark.parametrize("depth", [1, 2, 30, None])
@pytest.mark.parametrize("factor", [0.3, 0.999])
def test_too_small_scale_is_refused_at_every_depth(depth, factor):
    """``scale <= (λ_max + λ)/2`` grows along the top eigenvector: refused at build time, even 0.1 % below."""
    params, loss, data, G, _ = _problem()
    lam = 0.01
    s = factor * (float(torch.linalg.eigvalsh(G).max()) + lam) / 2
    with pytest.raises(ifunc.LissaDivergenceError, match=rf"diverged: scale={s:g} is too small.*pass scale >"):
        ifunc.ihvp_lissa(loss, params, data, damping=lam, scale=s, depth=depth)


def test_growth_is_detected_when_the_curvature_is_indefinite():
    """The Hessian away from a minimum: ``1 − a/s > 1`` on a negative eigenvalue."""
    params, loss, data, _, V = _problem()
    far = {k: 3 * v for k, v in params.items()}
    H = ifunc.hessian(loss, far, data)
    w = torch.linalg.eigvalsh(H)
    assert float(w.min()) < -0.05
    ihvp = ifunc.ihvp_lissa(loss, far, data, damping=0.01, depth=40, curvature="hessian", tol=None)
    with pytest.raises(ifunc.LissaDivergenceError, match="last update is .* times the first.*not positive definite"):
        ihvp(V)
    with pytest.raises(ifunc.ConvergenceError, match="did not converge"):  # depth 1: the residual check
        ifunc.ihvp_lissa(loss, far, data, damping=0.01, depth=1, curvature="hessian")(V)


def test_mini_batch_steps_that_curve_more_than_the_scale_allows_are_detected():
    params, loss, data, G, V = _problem(n=40, seed=4)
    lam = 0.01
    s = 0.6 * (float(torch.linalg.eigvalsh(G).max()) + lam)  # fine for all the data, not for single examples
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=lam, scale=s, depth=200, batch_size=1, tol=None)
    with pytest.raises(ifunc.LissaDivergenceError, match=r"diverged.*scale=.*a larger scale= or batch_size="):
        ihvp(V)


def test_nan_iterates_raise_a_divergence_error():
    params, loss, data, G, V = _problem(torch.float32, n=40, seed=4)
    s = 0.6 * (float(torch.linalg.eigvalsh(G).max()) + 0.01)
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=0.01, scale=s, depth=100_000, batch_size=1)
    with pytest.raises(ifunc.LissaDivergenceError, match="NaN/inf"):
        ihvp(V)


# ----------------------------------------------------------------- with_damping re-derives what depends on λ


def test_with_damping_rederives_the_default_scale_and_depth():
    params, loss, data, G, V = _problem()
    first = ifunc.ihvp_lissa(loss, params, data, damping=0.5)
    again = first.with_damping(0.05)
    fresh = ifunc.ihvp_lissa(loss, params, data, damping=0.05)
    for key in ("scale", "depth", "contraction", "lambda_max"):
        assert again.info[key] == fresh.info[key], key
    assert again.info["depth"] > first.info["depth"]
    X = again(V)
    torch.testing.assert_close(X, fresh(V), rtol=0, atol=0)
    assert _residual(X, G, 0.05, V) <= DEFAULT_TOL
    with pytest.raises(ifunc.ConvergenceError, match=r"needs about \d+ steps"):  # refused as a fresh build would be
        first.with_damping(1e-5)


def test_with_damping_keeps_a_given_scale_and_depth_and_names_them():
    params, loss, data, G, V = _problem()
    top = float(torch.linalg.eigvalsh(G).max())
    s = 0.6 * (top + 0.1)
    given = ifunc.ihvp_lissa(loss, params, data, damping=0.1, scale=s, depth=150)
    assert _residual(given(V), G, 0.1, V) <= DEFAULT_TOL
    with pytest.raises(ifunc.LissaDivergenceError, match=rf"scale={s:g} is too small for damping {top:g}"):
        given.with_damping(top)  # (λ_max + λ)/2 = λ_max > s
    with pytest.raises(ifunc.ConvergenceError, match=r"after 150 steps.*pass depth >= \d+") as info:
        given.with_damping(0.01)(V)
    assert "the default scale" not in str(info.value)


def test_messages_never_blame_a_scale_the_user_did_not_set():
    params, loss, data, _, V = _problem()
    with pytest.raises(ifunc.ConvergenceError) as info:
        ifunc.ihvp_lissa(loss, params, data, damping=0.01, depth=3)(V)
    assert "the default scale 1.5 (λ_max + λ)" in str(info.value) and "scale=" not in str(info.value)


# ----------------------------------------------------------------- mini-batches


def test_minibatch_lissa_is_deterministic_for_a_generator_and_close_to_exact():
    _, params, loss, (x, y) = mlp_problem(seed=4, n=40)
    lam = 0.5
    exact = ifunc.ihvp_explicit(loss, params, (x, y), damping=lam)
    v = torch.randn(exact.dim, generator=torch.Generator().manual_seed(0))

    def build(seed):
        gen = torch.Generator().manual_seed(seed)
        return ifunc.ihvp_lissa(
            loss, params, (x, y), damping=lam, depth=100, repeat=2, batch_size=20, generator=gen, tol=None
        )

    first = build(123)(v)
    torch.testing.assert_close(build(123)(v), first)  # the closure replays its generator state
    assert rel_error(first, exact(v)) < 0.1
    other = build(7)(v)
    assert rel_error(other, exact(v)) < 0.1
    assert rel_error(other, first) > 1e-4  # other mini-batches, another estimate


def test_minibatch_noise_above_tol_is_reported_with_the_fix():
    params, loss, data, _, V = _problem(n=40, seed=4)
    ihvp = ifunc.ihvp_lissa(loss, params, data, damping=0.05, batch_size=8)
    with pytest.raises(ifunc.ConvergenceError, match=r"mini-batches of 8 examples.*batch_size=None.*tol=None"):
        ihvp(V)


def test_default_steps_use_all_the_data_and_batch_size_n_is_the_same():
    params, loss, data, G, V = _problem(n=80, seed=4)
    default = ifunc.ihvp_lissa(loss, params, data, damping=0.5)
    assert default.info["batch_size"] is None
    every = ifunc.ihvp_lissa(loss, params, data, damping=0.5, batch_size=80)
    assert every.info["batch_size"] is None
    torch.testing.assert_close(default(V), every(V), rtol=0, atol=0)
    assert _residual(default(V), G, 0.5, V) <= DEFAULT_TOL


# ----------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"depth": True}, TypeError, "depth must be an int >= 1, got the bool True"),
        ({"depth": 2.0}, TypeError, "depth must be an int"),
        ({"depth": 0}, ValueError, "depth must be an int >= 1, got 0"),
        ({"repeat": -1}, ValueError, "repeat must be an int >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"batch_size": 4.5}, TypeError, "batch_size must be an int"),
        ({"damping": 0.0}, ValueError, "damping must be > 0"),
        ({"scale": -1.0}, ValueError, "scale must be a finite number > 0"),
        ({"tol": 0.0}, ValueError, r"tol must be in \(0, 1\)"),
        ({"tol": None}, ValueError, "tol=None .* needs an explicit depth="),
    ],
)
def test_bad_arguments_are_named(kwargs, error, pattern):
    params, loss, data, _, _ = _problem()
    with pytest.raises(error, match=pattern):
        ifunc.ihvp_lissa(loss, params, data, **({"damping": 0.1} | kwargs))


# ----------------------------------------------------------------- the rankings users see


def _classifier(seed=0, n=30, nq=6, sizes=(3, 5, 2)):
    """A small MLP classifier trained by Adam, with held-out queries."""
    model, params, loss, _ = mlp_problem(seed=seed, sizes=sizes, n=2)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + nq, sizes[0], generator=gen)
    noise = 0.5 * torch.randn(n + nq, sizes[-1], generator=gen)
    y = (x @ torch.randn(sizes[0], sizes[-1], generator=gen) + noise).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    return ifunc.params_of(model.eval()), loss, (x[:n], y[:n]), (x[n:], y[n:])


def test_defaults_on_a_trained_classifier_keep_the_rankings_of_the_dense_solve():
    params, loss, train, query = _classifier()
    lissa = ifunc.ihvp_lissa(loss, params, train)  # every default, damping included
    scores = ifunc.attribute(loss, params, lissa, train, query)
    exact = ifunc.attribute(loss, params, ifunc.ihvp_explicit(loss, params, train, damping=lissa.damping), train, query)
    assert float(_spearman(scores, exact).min()) >= 0.99
    assert rel_error(scores, exact) < 5 * DEFAULT_TOL


def test_a_dataloader_gives_the_same_full_steps_and_cycles_its_batches_for_mini_batch_steps():
    from torch.utils.data import DataLoader, TensorDataset

    params, loss, (x, y), G, V = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    tuple_ = ifunc.ihvp_lissa(loss, params, (x, y), damping=0.3)
    torch.testing.assert_close(ifunc.ihvp_lissa(loss, params, loader, damping=0.3)(V), tuple_(V))
    # mini-batch steps walk through the loader's batches (3, 3, 2 examples) in order: a fixed recursion
    stepped = ifunc.ihvp_lissa(loss, params, loader, damping=0.3, batch_size=3, depth=60, tol=None)
    X = stepped(V)
    torch.testing.assert_close(stepped(V), X, rtol=0, atol=0)
    assert rel_error(X, torch.linalg.solve(G + 0.3 * torch.eye(G.shape[0]), V.T).T) < 0.5


# ----------------------------------------------------------------- mini-batch steps from a DataLoader


def _streamed_reference(params, loss, x, y, V, lam, s, depth, b, starts):
    """The LiSSA recursion by hand on consecutive batches of ``b`` examples, cycled, averaged over ``starts``."""
    n = x.shape[0]
    chunks = [ifunc.ggn(loss, params, (x[i : i + b], y[i : i + b])) for i in range(0, n, b)]
    total = torch.zeros_like(V)
    for start in starts:
        X = V.clone()
        for j in range(depth):
            H = chunks[(start + j) % len(chunks)]
            X = V + (1 - lam / s) * X - X @ H / s
        total += X / s
    return total / len(starts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dataloader_is_re_cut_to_batch_size_and_repeat_runs_start_at_different_batches(dtype):
    from torch.utils.data import DataLoader, TensorDataset

    params, loss, (x, y), _, V = _problem(dtype, n=10)
    lam, s, depth = 0.5, 3.0, 7
    kw = dict(damping=lam, scale=s, depth=depth, tol=None, batch_size=4)
    outs = [
        ifunc.ihvp_lissa(loss, params, DataLoader(TensorDataset(x, y), batch_size=own), **kw)(V) for own in (3, 5, 10)
    ]
    ref = _streamed_reference(params, loss, x, y, V, lam, s, depth, 4, starts=[0])  # batches of 4, 4, 2
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for out in outs:  # the loader's own batch size (3, 5 or 10) does not matter: batch_size=4 is honoured
        torch.testing.assert_close(out, ref, **tol)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    two = ifunc.ihvp_lissa(loss, params, loader, **(kw | {"repeat": 2}))
    assert two.info["repeat"] == 2 and two.info["batch_size"] == 4
    # 3 batches: run 0 starts at batch 0, run 1 at batch ⌊1·3/2⌋ = 1
    torch.testing.assert_close(two(V), _streamed_reference(params, loss, x, y, V, lam, s, depth, 4, [0, 1]), **tol)
    assert not torch.allclose(two(V), outs[0])


def test_streamed_mini_batches_refuse_a_shuffling_loader_and_runs_that_would_repeat():
    from torch.utils.data import DataLoader, TensorDataset

    params, loss, (x, y), _, _ = _problem(n=10)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    kw = dict(damping=0.5, depth=5, tol=None)
    with pytest.raises(ValueError, match=r"from a DataLoader that shuffles .*RandomSampler.*shuffle=False"):
        ifunc.ihvp_lissa(loss, params, shuffled, batch_size=4, **kw)
    ifunc.ihvp_lissa(loss, params, shuffled, damping=0.5)  # all the data every step: the order does not matter
    ordered = DataLoader(TensorDataset(x, y), batch_size=3)
    with pytest.raises(ValueError, match=r"repeat=4 .* only 3 distinct runs of batch_size=4.*repeat <= 3"):
        ifunc.ihvp_lissa(loss, params, ordered, batch_size=4, repeat=4, **kw)
    for data in (ordered, (x, y)):
        with pytest.raises(ValueError, match=r"repeat=2 with all of the data every step .* would be identical"):
            ifunc.ihvp_lissa(loss, params, data, damping=0.5, repeat=2)
        with pytest.raises(ValueError, match=r"repeat=2 with all of the data every step"):
            ifunc.ihvp_lissa(loss, params, data, batch_size=10, repeat=2, **kw)
