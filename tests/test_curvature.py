import pytest
import torch
from hypothesis import given

import ifunc
from ifunc.testing import mlp_problem

from .strategies import mlp_problems


@given(mlp_problems())
def test_hvp_and_ggn_vp_match_dense_matrices(problem):
    _, params, loss, data = problem
    H = ifunc.hessian(loss, params, data)
    G = ifunc.ggn(loss, params, data)
    d = H.shape[0]
    V = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ifunc.hvp(loss, params, data, V), V @ H, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ifunc.ggn_vp(loss, params, data, V), V @ G, rtol=1e-8, atol=1e-10)
    # GGN is PSD and symmetric
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    torch.testing.assert_close(G, G.T)


def test_curvature_of_several_batches_is_the_mean_not_a_sum():
    _, params, loss, (x, y) = mlp_problem(seed=3, n=10)
    whole = ifunc.hessian(loss, params, (x, y))
    split = [(x[:3], y[:3]), (x[3:], y[3:])]
    torch.testing.assert_close(ifunc.hessian(loss, params, split), whole)
    v = torch.randn(whole.shape[0])
    torch.testing.assert_close(ifunc.hvp(loss, params, split, v), whole @ v)
    # and the explicit inverse over the split data is the inverse of the mean, not a sum of inverses
    G = ifunc.ggn(loss, params, (x, y))
    ih = ifunc.ihvp_explicit(loss, params, split, damping=0.1, curvature="ggn")
    torch.testing.assert_close(ih(v), torch.linalg.solve(G + 0.1 * torch.eye(len(v)), v))


def test_hvp_accepts_pytrees_and_stacks():
    _, params, loss, data = mlp_problem(seed=1)
    flat, unflatten = ifunc.flatten(params)
    V = torch.randn(2, flat.numel())
    out_tree = ifunc.hvp(loss, params, data, unflatten(V))
    expected = unflatten(ifunc.hvp(loss, params, data, V))
    assert list(out_tree) == list(params)
    for name in params:
        torch.testing.assert_close(out_tree[name], expected[name])
    singles = torch.stack([ifunc.hvp(loss, params, data, v) for v in V])
    torch.testing.assert_close(singles, ifunc.hvp(loss, params, data, V))


def test_ggn_needs_split_loss_and_loss_must_be_scalar():
    _, params, loss, data = mlp_problem(seed=1)
    plain = lambda p, b: loss(p, b)  # noqa: E731
    with pytest.raises(TypeError, match="output_loss"):
        ifunc.ggn(plain, params, data)
    with pytest.raises(ValueError, match="scalar"):
        ifunc.curvature_operator(lambda p, b: loss.outputs(p, b), params, data, curvature="hessian")
    with pytest.raises(ValueError, match="curvature='fisherish'"):
        ifunc.curvature_operator(loss, params, data, curvature="fisherish")


def test_a_partition_owns_every_chunk_once_and_iter_chunks_marks_them():
    from ifunc._chunks import iter_chunks
    from ifunc._data import DataSource

    whole = ifunc.curvature.Partition()
    assert (whole.index, whole.count) == (0, 1) and whole.reduce(torch.ones(2)).tolist() == [1.0, 1.0]
    parts = [ifunc.curvature.Partition(r, 3) for r in range(3)]
    for i in range(10):  # chunk i: owned by worker i mod 3 alone, its (i // 3)-th chunk
        assert [p.owns(i) for p in parts] == [r == i % 3 for r in range(3)]
        assert all(p.owner(i) == i % 3 and p.local(i) == i // 3 for p in parts)
    assert [parts[0].width(n, 8) for n in (None, 0, 5, 30)] == [8, 8, 2, 8]  # no worker idles on small data
    x = torch.arange(7.0)[:, None]
    chunks = list(iter_chunks(DataSource(x), 2, partition=parts[1]))  # every chunk reaches every worker
    assert [(c.index, c.offset, len(c.batch), c.mine) for c in chunks] == [
        (0, 0, 2, False),
        (1, 2, 2, True),
        (2, 4, 2, False),
        (3, 6, 1, False),
    ]
    assert all(c.mine for c in iter_chunks(DataSource(x), 2))
