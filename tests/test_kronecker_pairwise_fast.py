"""The Kronecker pairwise pass near its floor: the contraction kernel, and the NaN/inf guard moved to the scores.

Every training chunk's captured ``g`` used to be checked for NaN/inf; now one ``isfinite`` over the chunk's score
block (or self terms) stands in for it, and only a non-finite block inspects the captured ``a, g`` to name the
example. These tests pin both halves: a non-finite gradient always reaches its example's scores (every contraction
path, zero queries included), and every scoring path still names the example exactly, while a finite pass never
inspects the captured gradients one by one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ifunc
import ifunc.ihvp.kronecker.score as score_module
from ifunc.ihvp.kronecker._kernels import input_major, layer_scores, low_rank
from ifunc.testing import TokenModel, mlp_problem

# ---------------------------------------------------------------- the kernel


def _operands(seed: int, q: int, b: int, T: int, o: int, i: int):
    gen = torch.Generator().manual_seed(seed)
    Qt = torch.randn(q, o, i, generator=gen)
    return Qt, torch.randn(b, T, i, generator=gen), torch.randn(b, T, o, generator=gen)


@given(
    seed=st.integers(0, 2**16),
    q=st.integers(1, 4),
    b=st.integers(0, 6),
    T=st.integers(1, 5),
    o=st.integers(1, 6),
    i=st.integers(1, 6),
    budget=st.sampled_from([1, 7, 40, 1 << 20]),
    flipped=st.booleans(),
)
def test_layer_scores_is_the_dense_contraction(seed, q, b, T, o, i, budget, flipped):
    """``Σ_t g_tᵀ Q̃_q a_t`` whichever path, block size and layout of ``Q̃`` is taken; with factors, that of
    ``U Vᵀ``."""
    Qt, a, g = _operands(seed, q, b, T, o, i)
    ref = torch.einsum("qoi,bto,bti->qb", Qt, g, a)
    laid = input_major(Qt) if flipped else Qt
    torch.testing.assert_close(laid, Qt, rtol=0, atol=0)
    torch.testing.assert_close(layer_scores(laid, None, a, g, budget=budget), ref, rtol=1e-10, atol=1e-10)
    U, V = low_rank(Qt, 1)
    ref_lr = torch.einsum("qoi,bto,bti->qb", U @ V, g, a)
    torch.testing.assert_close(layer_scores(U @ V, (U, V), a, g, budget=budget), ref_lr, rtol=1e-10, atol=1e-10)


@given(
    seed=st.integers(0, 2**16),
    T=st.sampled_from([1, 3]),
    rank=st.sampled_from([None, 1]),
    where=st.sampled_from(["a", "g"]),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    zero_queries=st.booleans(),
    budget=st.sampled_from([1, 1 << 20]),
    flipped=st.booleans(),
)
def test_a_non_finite_gradient_reaches_every_score_of_its_example(
    seed, T, rank, where, value, zero_queries, budget, flipped
):
    """One NaN/inf entry of example j's ``a`` or ``g`` makes column j non-finite for every query, also for queries
    that are exactly zero (0·NaN = 0·inf = NaN), on every contraction path; the other columns stay finite."""
    q, b, o, i, j = 3, 5, 4, 6, 2
    Qt, a, g = _operands(seed, q, b, T, o, i)
    if zero_queries:
        Qt = torch.zeros_like(Qt)
    lr = None if rank is None else low_rank(Qt + (0.0 if zero_queries else 1e-3), rank)
    if lr is not None and zero_queries:
        lr = (torch.zeros_like(lr[0]), torch.zeros_like(lr[1]))
    x = a if where == "a" else g
    x[j, T - 1, seed % x.shape[-1]] = value
    s = layer_scores(input_major(Qt) if flipped else Qt, lr, a, g, budget=budget)
    assert not torch.isfinite(s[:, j]).any()
    assert torch.isfinite(torch.cat([s[:, :j], s[:, j + 1 :]], dim=1)).all()


# ---------------------------------------------------------------- the guard, end to end


def _token_problem():
    model = TokenModel().double().eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, 3, generator=gen), torch.randint(0, 2, (7,), generator=gen)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    return model, ifunc.params_of(model), loss, (x, y)


def _bad(x: torch.Tensor, k: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[k].view(-1)[0] = value
    return x


CALLS = {
    "pairwise": lambda loss, p, ih, train, query: ifunc.attribute(loss, p, ih, train, query, chunk_size=2),
    "per_module": lambda loss, p, ih, train, query: ifunc.attribute(
        loss, p, ih, train, query, chunk_size=2, per_module=True
    ),
    "per_token": lambda loss, p, ih, train, query: ifunc.attribute(
        loss, p, ih, train, query, chunk_size=2, per_token=True
    ),
    "cosine": lambda loss, p, ih, train, query: ifunc.attribute(
        loss, p, ih, train, query, chunk_size=2, normalize="cosine"
    ),
    "query_rank": lambda loss, p, ih, train, query: ifunc.attribute(
        loss, p, ih, train, query, chunk_size=2, query_rank=1
    ),
    "self_influence": lambda loss, p, ih, train, query: ifunc.self_influence(loss, p, ih, train, chunk_size=2),
}


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_every_scoring_path_names_the_example(call, k, value):
    """A NaN/inf input of train example k (in the third chunk of two for k = 5) is named by its index."""
    model, params, loss, (x, y) = _token_problem()
    ih = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    with pytest.raises(ValueError, match=f"non-finite gradient for example {k} of train"):
        CALLS[call](loss, params, ih, (_bad(x, k, value), y), (x[:2], y[:2]))


def test_a_query_example_is_still_named():
    model, params, loss, (x, y) = _token_problem()
    ih = ifunc.ihvp_kfac(loss, params, (x, y), model=model, damping=0.1)
    with pytest.raises(ValueError, match="non-finite gradient for example 1 of query"):
        ifunc.attribute(loss, params, ih, (x, y), (_bad(x[:3], 1, float("nan")), y[:3]))


def test_zero_queries_do_not_hide_a_non_finite_train_gradient():
    """A measurement with zero gradient makes every ``Q̃`` zero; the NaN of train example 3 still shows."""
    model, params, loss, (x, y) = mlp_problem(seed=4, sizes=(3, 4, 2), n=6)
    ih = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    flat = ifunc.output_loss(lambda p, b: 0.0 * ifunc.call(model, p, b[0]), loss.loss_on_outputs)
    with pytest.raises(ValueError, match="non-finite gradient for example 3 of train"):
        ifunc.attribute(loss, params, ih, (_bad(x, 3, float("nan")), y), (x[:2], y[:2]), measurement=flat)


def test_a_finite_pass_inspects_only_the_query_gradients(monkeypatch):
    """The captured train ``g`` are never checked one by one when the scores are finite: only the query captures
    run the per-example check; and the scores are those of the generic path."""
    model, params, loss, (x, y) = _token_problem()
    ih = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    calls: list[str] = []
    inner = score_module.check_finite

    def spy(G, name, offset=0):
        calls.append(name)
        inner(G, name, offset)

    monkeypatch.setattr(score_module, "check_finite", spy)
    fast = ifunc.attribute(loss, params, ih, (x, y), (x[:3], y[:3]), chunk_size=2)
    assert calls and set(calls) == {"query"}
    monkeypatch.undo()
    torch.testing.assert_close(fast, ifunc.attribute(loss, params, lambda V: ih(V), (x, y), (x[:3], y[:3])))


def test_an_overflowing_contraction_is_still_called_an_overflow():
    """Finite gradients whose float16 contraction overflows: not blamed on an example."""
    model, params, loss, (x, y) = mlp_problem(seed=4, sizes=(3, 4, 2), n=6)
    ih = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    big = ifunc.output_loss(lambda p, b: ifunc.call(model, p, b[0]), lambda o, b: 1e4 * loss.loss_on_outputs(o, b))
    with pytest.raises(ValueError, match="overflowed in torch.float16"):
        ifunc.attribute(big, params, ih, (x, y), (x, y), dtype=torch.float16)
