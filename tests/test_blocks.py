"""Block-diagonal mode: one block equals full; layer blocks equal solves with the dense diagonal blocks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.ihvp._blocks import parameter_names, resolve_blocks
from ifunc.testing import mlp_problem, rel_error

from .strategies import mlp_problems

LAM = 0.2


def _builders(d):
    return {
        "explicit": lambda loss, p, data, blocks: ifunc.ihvp_explicit(loss, p, data, damping=LAM, blocks=blocks),
        "cg": lambda loss, p, data, blocks: ifunc.ihvp_cg(
            loss, p, data, damping=LAM, blocks=blocks, tol=1e-12, atol=1e-14, maxiter=500
        ),
        "lissa": lambda loss, p, data, blocks: ifunc.ihvp_lissa(loss, p, data, damping=LAM, blocks=blocks, depth=400),
        "arnoldi": lambda loss, p, data, blocks: ifunc.ihvp_arnoldi(loss, p, data, rank=d, damping=LAM, blocks=blocks),
        "nystrom": lambda loss, p, data, blocks: ifunc.ihvp_nystrom(loss, p, data, rank=d, damping=LAM, blocks=blocks),
    }


TOL = {"explicit": 1e-10, "cg": 1e-8, "lissa": 1e-4, "arnoldi": 1e-7, "nystrom": 1e-7}
METHODS = sorted(TOL)


def _block_diagonal(M, blocks):
    D = torch.zeros_like(M)
    for block in blocks:
        i = block.index
        D[i[:, None], i] = M[i[:, None], i]
    return D


@pytest.mark.parametrize("method", METHODS)
def test_one_block_equals_full(method):
    _, params, loss, data = mlp_problem(seed=11, sizes=(3, 3, 2), n=7)
    d = ifunc.flatten(params)[0].numel()
    build = _builders(d)[method]
    V = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    full = build(loss, params, data, "full")(V)
    one = build(loss, params, data, {name: "everything" for name in params})(V)
    assert rel_error(one, full) < TOL[method]


@pytest.mark.parametrize("method", METHODS)
@given(problem=mlp_problems(max_hidden=3, max_n=6), seed=st.integers(0, 1000))
def test_layer_blocks_equal_solves_with_the_dense_diagonal_blocks(method, problem, seed):
    _, params, loss, data = problem
    flat, unflatten = ifunc.flatten(params)
    d = flat.numel()
    blocks = resolve_blocks("layer", unflatten)
    assert len(blocks) == 2  # two Linear layers
    D = _block_diagonal(ifunc.ggn(loss, params, data), blocks) + LAM * torch.eye(d)
    V = torch.randn(2, d, generator=torch.Generator().manual_seed(seed))
    if method == "lissa":  # converge by construction: scale s = λ_max(D), depth ≈ (s/λ) ln(1e5)
        top = float(torch.linalg.eigvalsh(D).max())
        ihvp = ifunc.ihvp_lissa(
            loss, params, data, damping=LAM, blocks="layer", scale=top, depth=int(top / LAM * 11.6) + 1
        )
    else:
        ihvp = _builders(d)[method](loss, params, data, "layer")
    assert rel_error(ihvp(V), torch.linalg.solve(D, V.T).T) < TOL[method]


def test_custom_mapping_and_low_rank_per_block():
    _, params, loss, data = mlp_problem(seed=12, sizes=(3, 4, 2), n=8)
    flat, unflatten = ifunc.flatten(params)
    d = flat.numel()
    mapping = {"0.weight": "w", "2.weight": "w", "0.bias": "b", "2.bias": "b"}
    blocks = resolve_blocks(mapping, unflatten)
    assert [b.name for b in blocks] == ["b", "w"]  # in order of first appearance in the (sorted) flat vector
    assert sorted(torch.cat([b.index for b in blocks]).tolist()) == list(range(d))
    G = ifunc.ggn(loss, params, data)
    D = _block_diagonal(G, blocks) + LAM * torch.eye(d)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    ex = ifunc.ihvp_explicit(loss, params, data, damping=LAM, blocks=mapping)
    torch.testing.assert_close(ex(v), torch.linalg.solve(D, v))
    assert sorted({block for _, block in ex.info["blocks"].values()}) == ["b", "w"]
    assert all(method == "explicit" for method, _ in ex.info["blocks"].values())
    # rank 2 per block: 2 eigenpairs kept in each of the 2 blocks
    ar = ifunc.ihvp_arnoldi(loss, params, data, rank=2, damping=LAM, blocks=mapping)
    assert ar.info["eigenvalues"].numel() == 4
    assert ar.with_damping(1.0).damping == 1.0


def test_names_and_errors():
    _, params, loss, data = mlp_problem(seed=13)
    unflatten = ifunc.flatten(params)[1]
    assert parameter_names(unflatten) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    nested = ifunc.flatten({"enc": {"w": torch.zeros(2)}, "head": torch.zeros(1)})[1]
    assert parameter_names(nested) == ["enc.w", "head"]
    assert [b.name for b in resolve_blocks("layer", nested)] == ["enc", ""]
    with pytest.raises(ValueError, match=r"missing \['2.bias', '2.weight'\]"):
        ifunc.ihvp_explicit(loss, params, data, damping=0.1, blocks={"0.bias": 0, "0.weight": 0})
    with pytest.raises(ValueError, match=r"unknown \['fc9.weight'\]"):
        resolve_blocks({**{n: 0 for n in params}, "fc9.weight": 1}, unflatten)
    with pytest.raises(ValueError, match='"full", "layer"'):
        ifunc.ihvp_cg(loss, params, data, damping=0.1, blocks="module")
    with pytest.raises(TypeError, match="mapping"):
        ifunc.ihvp_nystrom(loss, params, data, rank=2, damping=0.1, blocks=3)
