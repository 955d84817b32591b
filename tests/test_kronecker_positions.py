"""Outputs with several positions per example (tokens): the Kronecker family's ``"ggn"`` is the GGN, without the
cross terms between positions, and the default curvature is the sampled Fisher when a likelihood is known."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ifunc
from ifunc.testing import rel_error

DTYPES = {"float64": (torch.float64, 1e-10), "float32": (torch.float32, 1e-4)}


class TokenModel(nn.Module):
    """``[b, T, d] -> [b, T, C]``: a Linear, a causal running mean over positions, a LayerNorm, a Linear head."""

    def __init__(self, d=3, h=4, C=3):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(d, h), nn.LayerNorm(h), nn.Linear(h, C)

    def forward(self, x):
        z = torch.tanh(self.inp(x))
        z = z.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.head(self.norm(z))


def _problem(dtype, *, T=4, n=6, likelihood="categorical", seed=0):
    torch.manual_seed(seed)
    model = TokenModel().to(dtype).eval()
    params = ifunc.params_of(model)
    x, y = torch.randn(n, T, 3, dtype=dtype), torch.randint(0, 3, (n, T))
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]),
        lambda o, b: F.cross_entropy(o.reshape(-1, o.shape[-1]), b[1].reshape(-1), reduction="sum"),
        likelihood=likelihood,
    )
    return model, params, loss, (x, y)


def _diagonal_of(closure, params, damping):
    """The curvature diagonal behind a diagonal closure: ``1 / ihvp(1) − λ``."""
    flat, unflatten = ifunc.flatten(params)
    out, _ = ifunc.flatten(closure(unflatten(torch.ones_like(flat))))
    return 1.0 / out - damping


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("T", [1, 4])
def test_ggn_diagonal_is_exact_at_every_position(dtype, T):
    dt, tol = DTYPES[dtype]
    model, params, loss, data = _problem(dt, T=T)
    exact = torch.diagonal(ifunc.ggn(loss, params, data))  # (1/n) Σ_i Σ_p J_pᵀ Λ_p J_p, no cross terms
    closure = ifunc.ihvp_diagonal(loss, params, data, model=model, curvature="ggn", damping=0.5)
    assert rel_error(_diagonal_of(closure, params, 0.5), exact) < tol


def test_cross_terms_would_be_visible():
    """The check above can fail: the statistics of one direction spanning every position are far off."""
    model, params, loss, (x, y) = _problem(torch.float64, T=4)
    exact = torch.diagonal(ifunc.ggn(loss, params, (x, y)))
    one = torch.stack([torch.diagonal(ifunc.ggn(loss, params, (x[:, t : t + 1], y[:, t : t + 1]))) for t in range(4)])
    assert rel_error(exact, one.sum(0)) > 0.05  # positions interact through the running mean


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_ekfac_ggn_with_one_layer_and_one_position_is_exact(dtype):
    dt, tol = DTYPES[dtype]
    model, params, loss, (x, y) = _problem(dt, T=1, n=1)
    head = {k: v for k, v in params.items() if k.startswith("head.")}
    G = ifunc.ggn(loss, params, (x, y))
    flat, _ = ifunc.flatten(params)
    names = ifunc.functional.parameter_names(params)
    sizes = [params[k].numel() for k in names]
    starts = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    idx = torch.cat([torch.arange(starts[k], starts[k] + params[k].numel()) for k in head])
    closure = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, modules=["head"], damping=0.3, curvature="ggn")
    v = torch.randn(flat.numel(), dtype=dt)
    v[[i for i in range(flat.numel()) if i not in set(idx.tolist())]] = 0
    got, _ = ifunc.flatten(closure(ifunc.flatten(params)[1](v)))
    Gh = G[idx][:, idx]
    want = torch.linalg.solve(Gh + 0.3 * torch.eye(len(idx), dtype=dt), v[idx])
    assert rel_error(got[idx], want) < tol


@pytest.mark.parametrize(
    "T, likelihood, default", [(1, "categorical", "ggn"), (4, "categorical", "fisher"), (4, None, "ggn")]
)
def test_default_curvature_follows_positions(T, likelihood, default):
    model, params, loss, data = _problem(torch.float64, T=T, likelihood=likelihood)
    factors = ifunc.fit_kronecker_factors(loss, params, data, model=model)
    assert factors.curvature == default


def test_default_for_a_language_model_is_the_sampled_fisher():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11)).double().eval()
    params = ifunc.params_of(model)
    loss = ifunc.language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]))
    ids = torch.randint(0, 11, (6, 5))
    factors = ifunc.fit_kronecker_factors(loss, params, {"input_ids": ids}, model=model)
    assert factors.curvature == "fisher"
    shuffled = DataLoader(
        TensorDataset(ids),
        batch_size=2,
        shuffle=True,
        collate_fn=lambda r: {"input_ids": torch.stack([t[0] for t in r])},
    )
    with pytest.raises(ValueError, match="shuffles"):  # sampled labels follow the chunks: the order must hold
        ifunc.fit_kronecker_factors(loss, params, shuffled, model=model)


def test_sampled_fisher_estimates_the_ggn_diagonal():
    model, params, loss, data = _problem(torch.float64, T=4, n=6)
    exact = torch.diagonal(ifunc.ggn(loss, params, data))
    closure = ifunc.ihvp_diagonal(
        loss,
        params,
        data,
        model=model,
        curvature="fisher",
        n_samples=400,
        damping=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    assert rel_error(_diagonal_of(closure, params, 0.5), exact) < 0.1  # sampling noise only, no cross terms


def test_exact_ggn_warns_about_its_cost(monkeypatch):
    from ifunc.ihvp.kronecker import cotangents

    monkeypatch.setattr(cotangents, "GGN_PASSES_WARN", 5)
    model, params, loss, data = _problem(torch.float64, T=4)
    with pytest.warns(UserWarning, match='backward passes per chunk .*curvature="fisher"'):
        ifunc.ihvp_diagonal(loss, params, data, model=model, curvature="ggn", damping=0.5)


def _pooled(dtype, *, likelihood=None):
    """A sequence classifier that pools the logits over positions inside the loss: positions are coupled."""
    model, params, _, (x, y) = _problem(dtype, T=3, n=5)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]),
        lambda o, b: F.cross_entropy(o.mean(1), b[1][:, 0], reduction="sum"),
        likelihood=likelihood,
    )
    return model, params, loss, (x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_ggn_of_a_loss_coupling_positions_is_exact(dtype):
    dt, tol = DTYPES[dtype]
    model, params, loss, data = _pooled(dt)
    exact = torch.diagonal(ifunc.ggn(loss, params, data))  # the whole output Hessian of each example
    closure = ifunc.ihvp_diagonal(loss, params, data, model=model, curvature="ggn", damping=0.5)
    assert rel_error(_diagonal_of(closure, params, 0.5), exact) < tol


def test_default_for_a_loss_coupling_positions_is_the_exact_ggn():
    """A likelihood per position cannot describe a pooled loss: the default stays exact."""
    model, params, loss, data = _pooled(torch.float64, likelihood="categorical")
    assert ifunc.fit_kronecker_factors(loss, params, data, model=model).curvature == "ggn"


def test_a_coupled_loss_with_too_many_outputs_is_refused(monkeypatch):
    from ifunc.ihvp.kronecker import cotangents

    monkeypatch.setattr(cotangents, "GGN_PASSES_WARN", 5)
    model, params, loss, data = _pooled(torch.float64)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="couples the 3 positions.*empirical_fisher"):
        ifunc.ihvp_diagonal(loss, params, data, model=model, curvature="ggn", damping=0.5)


def test_many_classes_at_one_position_default_to_the_sampled_fisher():
    from ifunc.ihvp.kronecker.cotangents import DEFAULT_GGN_OUTPUTS

    torch.manual_seed(0)
    for C, default in [(DEFAULT_GGN_OUTPUTS, "ggn"), (DEFAULT_GGN_OUTPUTS + 1, "fisher")]:
        model = nn.Linear(3, C).double().eval()
        params = ifunc.params_of(model)
        x, y = torch.randn(4, 3), torch.randint(0, C, (4,))
        loss = ifunc.output_loss(
            lambda p, b, m=model: ifunc.call(m, p, b[0]),
            lambda o, b: F.cross_entropy(o, b[1], reduction="sum"),
            likelihood="categorical",
        )
        assert ifunc.fit_kronecker_factors(loss, params, (x, y), model=model).curvature == default
