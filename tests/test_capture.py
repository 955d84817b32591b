"""Layer capture: captured per-example weight gradients equal torch.func per-sample gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ifunc
from ifunc.ihvp.kronecker.capture import capture_layer_grads, layer_capture
from ifunc.ihvp.kronecker.layers import find_layers
from ifunc.testing import SmallCNN, TokenModel


def _problem(model, x, y):
    loss = lambda p, b: F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")  # noqa: E731
    return loss, ifunc.params_of(model), (x, y)


def _reference(loss, params, batch, spec):
    G = ifunc.per_sample_grads(loss, params, batch, flat=False)
    w = G[spec.weight]
    w = w.transpose(1, 2) if spec.kind == "conv1d" else w.reshape(w.shape[0], w.shape[1], -1)
    if spec.bias is not None:
        w = torch.cat([w, G[spec.bias][..., None]], dim=-1)
    return w


@pytest.mark.parametrize("build", ["tokens", "cnn"])
def test_captured_grads_equal_per_sample_grads(build):
    gen = torch.Generator().manual_seed(0)
    if build == "tokens":
        model = TokenModel().double()
        x = torch.randn(5, 3, 3, generator=gen)
    else:
        model = SmallCNN().double()
        x = torch.randn(5, 2, 6, 6, generator=gen)
    y = torch.randint(0, 2, (5,), generator=gen)
    loss, params, batch = _problem(model, x, y)
    grads = capture_layer_grads(loss, params, batch, model=model)
    layers, uncovered = find_layers(model, params)
    assert uncovered == []
    assert {s.name for s in layers} == set(grads)
    for spec in layers:
        torch.testing.assert_close(grads[spec.name], _reference(loss, params, batch, spec))


def test_kinds_and_bias_detection():
    model = TokenModel().double()
    layers, _ = find_layers(model, ifunc.params_of(model))
    kinds = {s.name: (s.kind, s.bias, s.out_features, s.in_features) for s in layers}
    assert kinds == {
        "c": ("conv1d", "c.bias", 4, 3),
        "shared": ("linear", "shared.bias", 4, 4),
        "head": ("linear", None, 2, 4),
    }


def test_untracked_bias_and_module_selection():
    model = SmallCNN().double()
    params = {k: v for k, v in ifunc.params_of(model).items() if k != "c1.bias"}
    layers, uncovered = find_layers(model, params, modules=["c1"])
    assert layers[0].bias is None and sorted(uncovered) == ["c2.weight", "fc.bias", "fc.weight"]
    layers, _ = find_layers(model, params, modules=lambda n, m: isinstance(m, nn.Linear))
    assert [s.name for s in layers] == ["fc"]


def test_unsupported_module_named_raises():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match="LayerNorm"):
        find_layers(model, ifunc.params_of(model), modules=["1"])
    with pytest.raises(ValueError, match="no sub-module"):
        find_layers(model, ifunc.params_of(model), modules=["7"])
    layers, uncovered = find_layers(model, ifunc.params_of(model))
    assert [s.name for s in layers] == ["0"] and uncovered == ["1.bias", "1.weight"]


def test_hooks_removed_after_success_and_error():
    model = TokenModel().double()
    loss, params, batch = _problem(model, torch.randn(3, 2, 3), torch.tensor([0, 1, 0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture_layer_grads(loss, params, batch, model=model)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())

    def bad(p, b):
        ifunc.call(model, p, b[0])
        raise RuntimeError("boom")

    layers, _ = find_layers(model, params)
    with pytest.raises(RuntimeError, match="boom"):
        with layer_capture(model, layers):
            bad(params, batch)
    with pytest.raises(RuntimeError, match="boom"):
        capture_layer_grads(bad, params, batch, model=model)
    assert all(not m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_wrong_model_is_reported():
    model, other = TokenModel().double(), TokenModel().double()
    loss, params, batch = _problem(model, torch.randn(3, 2, 3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="not called"):
        capture_layer_grads(loss, params, batch, model=other)
