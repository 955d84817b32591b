import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc.testing import mlp_problem


def _setup(seed=0, n=12):
    model, params, loss, (x, y) = mlp_problem(seed=seed, sizes=(3, 5, 3), n=n)
    ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1)
    return model, params, loss, (x, y), ihvp


def test_scores_equal_the_dense_formula_and_do_not_depend_on_chunking():
    _, params, loss, (x, y), ihvp = _setup()
    xq, yq = x[:4] + 0.5, y[:4]
    Gtr = ifunc.per_sample_grads(loss, params, (x, y))
    Gq = ifunc.per_sample_grads(loss, params, (xq, yq))
    A = ifunc.ggn(loss, params, (x, y)) + 0.1 * torch.eye(Gtr.shape[1])
    expected = Gq @ torch.linalg.solve(A, Gtr.T)
    for chunk in (1, 5, None):
        scores = ifunc.attribute(loss, params, ihvp, (x, y), (xq, yq), chunk_size=chunk)
        assert scores.shape == (4, 12)
        torch.testing.assert_close(scores, expected)


def test_permuting_the_train_set_permutes_columns_and_self_scores_are_symmetric():
    _, params, loss, (x, y), ihvp = _setup(seed=1)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    base = ifunc.attribute(loss, params, ihvp, (x, y), (x, y))
    torch.testing.assert_close(ifunc.attribute(loss, params, ihvp, (x[perm], y[perm]), (x, y)), base[:, perm])
    torch.testing.assert_close(base, base.T)
    torch.testing.assert_close(ifunc.self_influence(loss, params, ihvp, (x, y), chunk_size=5), base.diagonal())
    assert (base.diagonal() > 0).all()


def test_dataloader_and_tensors_give_the_same_scores_and_methods_agree():
    _, params, loss, (x, y), ihvp = _setup(seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    a = ifunc.attribute(loss, params, ihvp, (x, y), (x[:3], y[:3]))
    b = ifunc.attribute(loss, params, ihvp, loader, [(x[:1], y[:1]), (x[1:3], y[1:3])])
    torch.testing.assert_close(a, b)
    cg = ifunc.ihvp_cg(loss, params, loader, damping=0.1, tol=1e-10)
    torch.testing.assert_close(ifunc.attribute(loss, params, cg, loader, (x[:3], y[:3])), a, rtol=1e-6, atol=1e-8)


def test_purity_nothing_of_the_user_changes_and_the_module_is_not_read():
    model, params, loss, (x, y), _ = _setup(seed=3)
    model.train()
    for p in model.parameters():
        p.grad = None
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    x_before, params_before = x.clone(), {k: v.clone() for k, v in params.items()}
    moved = {k: v + 0.3 for k, v in params.items()}  # evaluate away from the module's own parameters
    ihvp = ifunc.ihvp_cg(loss, moved, (x, y), damping=0.1, tol=1e-10)
    scores = ifunc.attribute(loss, moved, ihvp, (x, y), (x[:2], y[:2]))
    G = ifunc.per_sample_grads(loss, moved, (x, y))
    A = ifunc.ggn(loss, moved, (x, y)) + 0.1 * torch.eye(G.shape[1])
    torch.testing.assert_close(scores, G[:2] @ torch.linalg.solve(A, G.T), rtol=1e-6, atol=1e-8)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before) and all(torch.equal(params[k], params_before[k]) for k in params)


def test_float32_params_give_float32_scores():
    _, params, loss, (x, y), _ = _setup(seed=4)
    p32 = {k: v.float() for k, v in params.items()}
    model32, _, loss32, _ = mlp_problem(seed=4, sizes=(3, 5, 3), n=12, dtype=torch.float32)
    ihvp = ifunc.ihvp_cg(loss32, p32, (x.float(), y), damping=0.1, tol=1e-4)
    scores = ifunc.attribute(loss32, p32, ihvp, (x.float(), y), (x[:2].float(), y[:2]))
    assert scores.dtype == torch.float32
    ref = ifunc.attribute(loss, params, ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1), (x, y), (x[:2], y[:2]))
    assert torch.corrcoef(torch.stack([scores.double().flatten(), ref.flatten()]))[0, 1] > 0.999


def test_low_precision_scores_keep_the_ranking():
    _, params, loss, (x, y), ihvp = _setup(seed=5, n=30)
    exact = ifunc.attribute(loss, params, ihvp, (x, y), (x[:4], y[:4]))
    low = ifunc.attribute(loss, params, ihvp, (x, y), (x[:4], y[:4]), dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    r = torch.corrcoef(torch.stack([low.double().flatten(), exact.flatten()]))[0, 1]
    assert r > 0.99


def test_per_module_self_influence_sums_to_the_total():
    model, params, loss, (x, y) = mlp_problem(seed=6, sizes=(3, 5, 3), n=10)
    ihvp = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    total = ifunc.self_influence(loss, params, ihvp, (x, y))
    parts = ifunc.self_influence(loss, params, ihvp, (x, y), per_module=True)
    assert parts.shape == (len(ihvp.info["modules"]), 10)
    torch.testing.assert_close(parts.sum(0), total)
    pairwise = ifunc.attribute(loss, params, ihvp, (x, y), (x, y), per_module=True)
    torch.testing.assert_close(parts, pairwise.diagonal(dim1=1, dim2=2))
    with pytest.raises(ValueError, match="Kronecker-family"):
        ifunc.self_influence(
            loss, params, ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1), (x, y), per_module=True
        )
