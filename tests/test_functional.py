import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ifunc


def test_params_of_names_detached_and_shared():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = ifunc.params_of(model)
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(not p.requires_grad for p in params.values())
    assert params["0.weight"].data_ptr() == model[0].weight.data_ptr()


def test_params_of_trainable_only_and_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    assert "0.bias" not in ifunc.params_of(model)
    assert "0.bias" in ifunc.params_of(model, trainable_only=False)
    assert list(ifunc.params_of(model, modules=["1"])) == ["1.weight", "1.bias"]
    picked = ifunc.params_of(model, modules=lambda name, m: name == "0")
    assert list(picked) == ["0.weight"]
    with pytest.raises(ValueError, match="no sub-module named"):
        ifunc.params_of(model, modules=["head"])


def test_call_uses_given_params_and_leaves_module_alone():
    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: torch.zeros_like(v) for k, v in ifunc.params_of(model).items()}
    out = ifunc.call(model, params, torch.randn(5, 3))
    assert torch.equal(out, torch.zeros(5, 2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="dict name -> tensor"):
        ifunc.call(model, torch.zeros(8), torch.randn(1, 3))


shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def pytrees(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return torch.randn(draw(shapes), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    kind = draw(st.sampled_from(["dict", "tuple", "list"]))
    children = draw(st.lists(pytrees(depth=depth - 1), min_size=1, max_size=3))
    if kind == "dict":
        return {f"k{i}": c for i, c in enumerate(children)}
    return tuple(children) if kind == "tuple" else list(children)


@given(pytrees())
def test_flatten_round_trip(tree):
    flat, unflatten = ifunc.flatten(tree)
    back = unflatten(flat)
    import optree

    assert optree.tree_structure(back, namespace="ifunc") == optree.tree_structure(tree, namespace="ifunc")
    for a, b in zip(optree.tree_leaves(back, namespace="ifunc"), optree.tree_leaves(tree, namespace="ifunc")):
        assert a.shape == b.shape and torch.equal(a, b)
    stack = torch.stack([flat, 2 * flat])
    batched = unflatten(stack)
    for a, b in zip(optree.tree_leaves(batched, namespace="ifunc"), optree.tree_leaves(tree, namespace="ifunc")):
        assert a.shape == (2, *b.shape) and torch.equal(a[1], 2 * b)


def test_flatten_func_and_errors():
    params = {"w": torch.randn(2, 3), "b": torch.randn(2)}
    flat, unflatten = ifunc.flatten(params)
    f = lambda p, x: (p["w"] @ x + p["b"]).sum()  # noqa: E731
    x = torch.randn(3)
    assert torch.allclose(ifunc.flatten_func(f, unflatten)(flat, x), f(params, x))
    with pytest.raises(ValueError, match=r"expected a vector \[8\]"):
        unflatten(torch.zeros(7))
    with pytest.raises(ValueError, match="mix dtypes"):
        ifunc.flatten({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float32)})
    with pytest.raises(TypeError, match="must be a tensor"):
        ifunc.flatten({"a": 1.0})
