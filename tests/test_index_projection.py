"""Gradient-index projection: unbiased inner products, layer/matrix/flat agreement, determinism, blocks, dtypes."""

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

import ifunc
import ifunc.index.projection as projection
from ifunc.ihvp.kronecker import KroneckerIHVP
from ifunc.ihvp.kronecker.layers import LayerSpec
from ifunc.ihvp.kronecker.score import capture_chunk
from ifunc.index import (
    Projection,
    layer_matrices,
    make_projection,
    project_captured,
    project_dense,
    project_flat,
    project_layer,
    project_matrix,
)
from ifunc.index.projection import hold_draws
from ifunc.testing import SmallCNN, TokenModel, mlp_problem

SEEDS = 200

# a Linear 3 -> 5 with bias (in_eff 4), a Conv1D 4 -> 2 without, two dense parameters (d_rest 7 + 10): d = 45
SPECS = (LayerSpec("fc", "linear", "fc.weight", "fc.bias", 5, 3), LayerSpec("c", "conv1d", "c.weight", None, 2, 4))


def _params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    shapes = {"fc.weight": (5, 3), "fc.bias": (5,), "c.weight": (4, 2), "u": (7,), "v": (2, 5)}
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inner(A, B):
    return (A * B).sum(dim=1)


@pytest.mark.parametrize("part", ["layer", "dense"])
def test_inner_products_are_preserved_in_expectation(part):
    X = _rand(2, 5, 4, seed=1) if part == "layer" else _rand(2, 17, seed=1)
    X[1] = X[0] + 0.5 * X[1]  # correlated pair: ⟨X, Y⟩ far from 0
    truth = float((X[0] * X[1]).sum())
    estimates = []
    for seed in range(SEEDS):
        P = make_projection(_params(), SPECS, seed=seed, layer_size=(2, 3), dense_size=4, block=8)
        if part == "layer":
            Z = project_matrix(P, "fc", X)
        else:
            Z = project_dense(P, [X[:, :7], X[:, 7:]])
        estimates.append(float(_inner(Z[:1], Z[1:])))
    est = torch.tensor(estimates)
    # The seeds draw independent matrices, so the estimates are i.i.d. with mean ⟨X, Y⟩ if the projection is
    # unbiased; by the CLT their mean is within 4 standard errors (sample std / √200) of it except with probability
    # ~6e-5. A wrong scale (entries N(0, 1) instead of N(0, 1/k): mean k·⟨X, Y⟩) misses by tens of standard errors.
    stderr = float(est.std()) / math.sqrt(SEEDS)
    assert abs(float(est.mean()) - truth) < 4 * stderr
    assert stderr < 0.2 * abs(truth)  # the bound is tight enough to mean something


@pytest.mark.parametrize("sizes", [(2, 3), (5, 4)], ids=["projected", "at-cap"])
@pytest.mark.parametrize("layer", ["fc", "c"])
def test_project_layer_equals_project_matrix_of_the_formed_gradient(layer, sizes):
    P = make_projection(_params(), SPECS, seed=3, layer_size=sizes)
    L = P.layer(layer)
    a, g = _rand(4, 6, L.in_eff, seed=2), _rand(4, 6, L.out_features, seed=3)
    G = torch.einsum("bto,bti->boi", g, a)
    got = project_layer(P, layer, a, g)
    assert got.shape == (4, L.k_o * L.k_a)
    torch.testing.assert_close(got, project_matrix(P, layer, G), rtol=0, atol=1e-12 * float(G.abs().max()))
    if (L.k_o, L.k_a) == (L.out_features, L.in_eff):  # the identity at the cap: the exact gradient
        torch.testing.assert_close(got, G.reshape(4, -1), rtol=0, atol=1e-12 * float(G.abs().max()))


def test_sizes_caps_and_row_order():
    P = make_projection(_params(), SPECS, seed=0, layer_size=3, dense_size=100)
    assert [(L.k_o, L.k_a) for L in P.layers] == [(3, 3), (2, 3)]
    assert P.dense == (("u", 7), ("v", 10)) and P.k_dense == 17 and P.dim == 9 + 6 + 17
    a = {"fc": (_rand(2, 3, 4, seed=4), _rand(2, 3, 5, seed=5)), "c": (_rand(2, 3, 4, seed=6), _rand(2, 3, 2, seed=7))}
    dense = {"u": _rand(2, 7, seed=8), "v": _rand(2, 2, 5, seed=9)}
    Z = project_captured(P, a, dense)
    assert torch.equal(Z[:, :9], project_layer(P, "fc", *a["fc"]))
    assert torch.equal(Z[:, 9:15], project_layer(P, "c", *a["c"]))
    assert torch.equal(Z[:, 15:], torch.cat([dense["u"], dense["v"].flatten(1)], dim=1))  # R = I at the cap
    only_dense = make_projection({"w": torch.zeros(3, 4)}, seed=0, dense_size=5)
    assert only_dense.layers == () and only_dense.dim == 5
    all_layers = make_projection({k: v for k, v in _params().items() if k not in "uv"}, SPECS, seed=0)
    assert all_layers.dense == () and all_layers.k_dense == 0


def test_same_seed_same_bits_another_seed_differs():
    V = _rand(3, 45, seed=10)

    def run(seed, first):
        torch.manual_seed(first)  # the global RNG plays no part
        return project_flat(
            make_projection(_params(), SPECS, seed=seed, layer_size=2, dense_size=4, block=6), V, _params()
        )

    assert torch.equal(run(7, 0), run(7, 123))
    other = run(8, 0)
    assert not torch.isclose(run(7, 0), other).any()
    P = make_projection(_params(), SPECS, seed=7, layer_size=2)
    before = layer_matrices(P, "c")  # one layer's matrices do not depend on which were drawn before
    layer_matrices(P, "fc")
    assert all(torch.equal(x, y) for x, y in zip(before, layer_matrices(P, "c")))


def test_dense_sign_hash_follows_the_seed_rule_in_blocks_and_held_draws_change_nothing(monkeypatch):
    params, k, block = {"a": torch.zeros(7), "b": torch.zeros(2, 5)}, 4, 3
    P = make_projection(params, seed=5, dense_size=k, block=block)
    # the documented rule, written out: blocks of 3 coordinates, codes c uniform on [0, 2k) from the generator
    # seeded sha256(f"{seed}/dense/{p}/{j}"); coordinate i goes to row c mod k with sign + if c < k else -
    columns = []
    for name, numel in P.dense:
        for j, start in enumerate(range(0, numel, block)):
            digest = hashlib.sha256(f"5/dense/{name}/{j}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            for c in torch.randint(0, 2 * k, (min(block, numel - start),), generator=gen).tolist():
                column = torch.zeros(k, dtype=torch.float64)
                column[c % k] = 1.0 if c < k else -1.0
                columns.append(column)
    S = torch.stack(columns, dim=1)
    assert S.shape == (4, 17) and torch.equal((S * S).sum(dim=0), torch.ones(17))  # one ±1 per column
    drawn = []

    def spy(numel, *args):
        drawn.append(numel)
        return projection_codes(numel, *args)

    projection_codes = projection.sign_hash_codes
    monkeypatch.setattr(projection, "sign_hash_codes", spy)
    X = _rand(3, 17, seed=11).double()
    columns_of_X = [X[:, :7], X[:, 7:].reshape(3, 2, 5)]
    got = project_dense(P, columns_of_X)
    torch.testing.assert_close(got, X @ S.T, rtol=0, atol=1e-12)
    assert drawn == [3, 3, 1, 3, 3, 3, 1]  # block by block, never the whole parameter
    held = hold_draws(P, dtype=torch.float64)
    drawn.clear()
    assert torch.equal(project_dense(P, columns_of_X, held=held), got) and drawn == []  # nothing drawn again
    some = hold_draws(P, dtype=torch.float64, max_bytes=8 * 7)  # the budget holds the first parameter's blocks
    assert sorted(k for k in some if isinstance(k, tuple)) == [("a", 0), ("a", 1), ("a", 2)]
    drawn.clear()
    assert torch.equal(project_dense(P, columns_of_X, held=some), got) and drawn == [3, 3, 3, 1]


def test_held_layer_matrices_are_the_drawn_ones():
    P = make_projection(_params(), SPECS, seed=6, layer_size=(2, 3), dense_size=4)
    held = hold_draws(P, dtype=torch.float32)
    for L in P.layers:
        assert all(torch.equal(h, m) for h, m in zip(held[L.name], layer_matrices(P, L.name, dtype=torch.float32)))
    V = _rand(3, 45, seed=13)
    assert torch.equal(
        project_flat(P, V, _params(torch.float32), held=held), project_flat(P, V, _params(torch.float32))
    )


def test_float32_and_float64_agree_to_float32_rounding():
    P = make_projection(_params(), SPECS, seed=2, layer_size=(2, 3), dense_size=4, block=8)
    for p64 in layer_matrices(P, "fc"):
        assert p64.dtype == torch.float64
    for p32, p64 in zip(layer_matrices(P, "fc", dtype=torch.float32), layer_matrices(P, "fc")):
        assert torch.equal(p32, p64.float())
    V = _rand(3, 45, seed=12)
    z64 = project_flat(P, V, _params())
    z32 = project_flat(P, V.float(), _params(torch.float32))
    assert z32.dtype == torch.float32 and z64.dtype == torch.float64
    assert float((z32.double() - z64).norm() / z64.norm()) < 1e-6


def test_describe_round_trips_through_json():
    P = make_projection(_params(), SPECS, seed=9, layer_size=(2, 3), dense_size=4, exclude=["v"], block=64)
    d = json.loads(json.dumps(P.describe()))
    assert Projection.from_description(d) == P and d["dim"] == P.dim and d["excluded"] == ["v"]
    with pytest.raises(ValueError, match="not a projection"):
        Projection.from_description({"kind": "other"})
    with pytest.raises(ValueError, match="dim"):
        Projection.from_description({**d, "dim": P.dim + 1})
    with pytest.raises(ValueError, match="malformed"):
        Projection.from_description({k: v for k, v in d.items() if k != "dense"})


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_projection(_params(), SPECS, seed=-1), "seed"),
        (lambda: make_projection(_params(), SPECS, seed=0, layer_size=(0, 2)), "layer_size"),
        (lambda: make_projection(_params(), SPECS, seed=0, exclude=["fc.bias"]), "claimed"),
        (lambda: make_projection(_params(), SPECS, seed=0, exclude=["nope"]), "not in params"),
        (lambda: make_projection({"u": torch.zeros(3)}, seed=0, exclude=["u"]), "nothing to project"),
        (lambda: make_projection(_params(), (SPECS[0]._replace(in_features=2),), seed=0), "entries"),
        (lambda: project_layer(make_projection(_params(), SPECS, seed=0), "fc", _rand(2, 1, 3), _rand(2, 1, 5)), "a"),
        (lambda: project_flat(make_projection(_params(), SPECS, seed=0), _rand(2, 46), _params()), "columns"),
        (lambda: project_flat(make_projection(_params(), SPECS, seed=0), _rand(2, 7), {"u": torch.zeros(7)}), "hold"),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _model_problem(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "mlp":  # the first layer's bias excluded: its spec has no bias column, the bias is nowhere
        model, params, loss, batch = mlp_problem(sizes=(3, 4, 2), n=5)
        return model, params, loss, batch, {"exclude": ["0.bias"]}
    torch.manual_seed(0)
    if kind == "cnn":  # c2 left to a dense block
        model, x = SmallCNN().double(), torch.randn(5, 2, 6, 6, generator=gen)
        options = {"modules": ["c1", "fc"]}
    else:  # GPT-2 style Conv1D, a Linear called twice per forward, a Linear without bias
        model, x = TokenModel().double(), torch.randn(5, 3, 3, generator=gen)
        options = {}
    loss = lambda p, b: F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")  # noqa: E731
    return model, ifunc.params_of(model), loss, (x, torch.randint(0, 2, (5,), generator=gen)), options


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens"])
def test_project_flat_of_a_flat_gradient_equals_the_captured_projection(kind):
    model, params, loss, batch, options = _model_problem(kind)
    exclude = options.get("exclude", ())
    ihvp = ifunc.ihvp_identity(params, model=model, modules=options.get("modules"), exclude=exclude)
    assert isinstance(ihvp, KroneckerIHVP)
    specs = [blk.spec for blk in ihvp.blocks]
    P = make_projection(params, specs, seed=4, layer_size=(3, 2), dense_size=5, exclude=exclude)
    assert [n for n, _ in P.dense] == [d.name for d in ihvp.diags]
    layers, dense = capture_chunk(loss, params, ihvp, batch, name="train", offset=0)
    captured = project_captured(P, layers, dense)
    flat = project_flat(P, ifunc.per_sample_grads(loss, params, batch), params)
    assert captured.shape == flat.shape == (5, P.dim)
    torch.testing.assert_close(flat, captured, rtol=1e-10, atol=1e-10 * float(captured.abs().max()))
