"""Leave-one-out retraining on a real data set: influence must predict it."""

import pytest
import torch

import ifunc
from ifunc.testing import fit_logistic, leave_one_out_losses, logistic_loss

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn ships the real data set")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["explicit", "cg"])
def test_breast_cancer_leave_one_out(method):
    x_all, y_all = sklearn_datasets.load_breast_cancer(return_X_y=True)
    x_all = torch.tensor(x_all)
    x_all = (x_all - x_all.mean(0)) / x_all.std(0)
    y_all = torch.tensor(y_all, dtype=torch.float64)
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    x, y = x_all[perm[:400]], y_all[perm[:400]]
    xq, yq = x_all[perm[400:430]], y_all[perm[400:430]]
    l2 = 1e-2
    params = fit_logistic(x, y, l2=l2)
    loss = logistic_loss(l2)

    def test_loss(p, batch):
        z = batch[0] @ p["w"] + p["b"]
        return (torch.nn.functional.softplus(z) - batch[1] * z).sum()

    if method == "explicit":
        ihvp = ifunc.ihvp_explicit(loss, params, (x, y))
    else:
        ihvp = ifunc.ihvp_cg(loss, params, [(x[:200], y[:200]), (x[200:], y[200:])], tol=1e-8)
    scores = ifunc.attribute(loss, params, ihvp, (x, y), (xq, yq), measurement=test_loss)
    # the points whose removal matters most, plus a random sample: >= 50 retrainings
    removed = scores.abs().sum(0).topk(30).indices.tolist()
    removed += [
        i for i in torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist() if i not in removed
    ][:30]
    loo = leave_one_out_losses(x, y, xq, yq, l2=l2, indices=removed)  # [60, n_query]
    actual = loo - _query_losses(params, xq, yq)
    predicted = (scores[:, removed] / len(y)).T  # [60, n_query]
    pearson_total = torch.corrcoef(torch.stack([actual.sum(1), predicted.sum(1)]))[0, 1]
    pearson_pairs = torch.corrcoef(torch.stack([actual.flatten(), predicted.flatten()]))[0, 1]
    assert pearson_total > 0.95, pearson_total
    assert pearson_pairs > 0.95, pearson_pairs


def _query_losses(p, x, y):
    z = x @ p["w"] + p["b"]
    return torch.nn.functional.softplus(z) - y * z
