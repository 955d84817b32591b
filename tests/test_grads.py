import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc.grads import chunk_size_for
from ifunc.testing import mlp_problem


def _loop_grads(loss, params, x, y):
    flat, unflatten = ifunc.flatten(params)
    rows = []
    for i in range(len(x)):
        p = flat.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(unflatten(p), (x[i : i + 1], y[i : i + 1])), p)
        rows.append(g)
    return torch.stack(rows)


def test_per_sample_grads_equal_a_python_loop_for_any_chunking():
    _, params, loss, (x, y) = mlp_problem(seed=0, n=9)
    expected = _loop_grads(loss, params, x, y)
    for chunk in (1, 4, 100):
        torch.testing.assert_close(ifunc.per_sample_grads(loss, params, (x, y), chunk_size=chunk), expected)
    one_example = 3 * 1024  # bytes: one or two examples of this model per chunk
    assert chunk_size_for(loss, params, (x, y), max_memory=one_example) < 9
    torch.testing.assert_close(ifunc.per_sample_grads(loss, params, (x, y), max_memory=one_example), expected)
    with pytest.raises(MemoryError, match="one example needs"):
        ifunc.per_sample_grads(loss, params, (x, y), max_memory=1)
    tree = ifunc.per_sample_grads(loss, params, (x, y), flat=False)
    assert {k: v.shape[0] for k, v in tree.items()} == {k: 9 for k in params}


def test_dataset_dataloader_and_list_inputs_agree():
    _, params, loss, (x, y) = mlp_problem(seed=1, n=10)
    expected = ifunc.per_sample_grads(loss, params, (x, y))
    ds = TensorDataset(x, y)
    for data in (ds, DataLoader(ds, batch_size=3), [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.testing.assert_close(ifunc.per_sample_grads(loss, params, data), expected)


def test_measurement_other_than_the_loss():
    model, params, loss, (x, y) = mlp_problem(seed=2, n=5)

    def margin(p, batch):
        out = ifunc.call(model, p, batch[0])
        right = out.gather(1, batch[1][:, None]).squeeze(1)
        mask = torch.arange(out.shape[1]) == batch[1][:, None]
        wrong = out.masked_fill(mask, -1e9).max(1).values
        return (right - wrong).sum()

    G = ifunc.per_sample_grads(margin, params, (x, y))
    assert _loop_grads(margin, params, x, y).allclose(G)


def test_non_finite_gradients_name_the_example():
    _, params, loss, (x, y) = mlp_problem(seed=0, n=6)
    x = x.clone()
    x[4, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradient for example 4"):
        ifunc.per_sample_grads(loss, params, (x, y), chunk_size=2)


def test_non_scalar_measurement_is_refused():
    model, params, loss, data = mlp_problem(seed=0)
    with pytest.raises(ValueError, match="must return a scalar"):
        ifunc.per_sample_grads(lambda p, b: ifunc.call(model, p, b[0]), params, data)


def test_dropout_under_vmap_gets_a_clear_message():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).train()
    params = ifunc.params_of(model)
    loss = lambda p, b: ifunc.call(model, p, b[0]).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"'1' \(Dropout\) is in train mode.*model.eval\(\)"):
        ifunc.per_sample_grads(loss, params, (torch.randn(4, 3),))


def test_data_dependent_python_in_the_loss_gets_a_clear_message():
    model, params, loss, data = mlp_problem(seed=0)
    bad = lambda p, b: loss(p, b) * (1.0 if float(b[0].sum()) > 0 else 2.0)  # noqa: E731
    with pytest.raises(RuntimeError, match="data-dependent Python"):
        ifunc.per_sample_grads(bad, params, data)


def test_a_list_of_collated_dataloader_batches_is_accepted():
    _, params, loss, (x, y) = mlp_problem(seed=1, n=10)
    batches = list(DataLoader(TensorDataset(x, y), batch_size=4))  # [[x, y], [x, y], ...]
    torch.testing.assert_close(
        ifunc.per_sample_grads(loss, params, batches), ifunc.per_sample_grads(loss, params, (x, y))
    )


def test_batchnorm_in_train_mode_gets_a_clear_message():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).train()
    params = ifunc.params_of(model)
    loss = lambda p, b: ifunc.call(model, p, b[0]).pow(2).sum()  # noqa: E731
    data = (torch.randn(6, 3),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(BatchNorm1d\) is in train mode.*model.eval\(\)"):
        ifunc.per_sample_grads(loss, params, data)
    with pytest.raises(ValueError, match=r"\(BatchNorm1d\) is in train mode.*model.eval\(\)"):
        ifunc.ihvp_cg(loss, params, data, damping=0.1)
    with pytest.raises(ValueError, match=r"\(BatchNorm1d\) is in train mode"):
        ifunc.ihvp_ekfac(loss, params, data, model=model, curvature="empirical_fisher")
    after = model.state_dict()  # nothing of the model changed: running statistics, counters, weights
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    model.eval()
    assert ifunc.per_sample_grads(loss, params, data).shape[0] == 6
