import copy

import pytest
import torch

import ifunc
from ifunc.testing import mlp_problem


def _members(m=3):
    model, params, loss, (x, y) = mlp_problem(seed=0, n=10)
    gen = torch.Generator().manual_seed(1)
    members = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()} for _ in range(m)
    ]
    return model, loss, members, (x[:7], y[:7]), (x[7:], y[7:])


def test_mean_of_members_factory_and_list_agree():
    model, loss, members, train, query = _members()
    factory = lambda p: ifunc.ihvp_explicit(loss, p, train, damping=0.1)  # noqa: E731
    single = [ifunc.attribute(loss, p, factory(p), train, query) for p in members]
    expected = torch.stack(single).mean(0)
    torch.testing.assert_close(ifunc.attribute_ensemble(loss, members, factory, train, query), expected)
    closures = [factory(p) for p in members]
    torch.testing.assert_close(ifunc.attribute_ensemble(loss, members, closures, train, query), expected)


def test_one_member_is_attribute():
    model, loss, members, train, query = _members(1)
    ihvp = ifunc.ihvp_cg(loss, members[0], train, damping=0.1, tol=1e-10)
    torch.testing.assert_close(
        ifunc.attribute_ensemble(loss, members, [ihvp], train, query),
        ifunc.attribute(loss, members[0], ihvp, train, query),
    )


def test_tracin_weights_and_unreduced_stack():
    model, loss, members, train, query = _members()
    lrs = [0.5, 0.2, 0.1]
    stacked = ifunc.attribute_ensemble(
        loss, members, lambda p: ifunc.ihvp_identity(p), train, query, weights=lrs, reduce=False
    )
    assert stacked.shape == (3, 3, 7)
    tracin = sum(
        lr * ifunc.per_sample_grads(loss, p, query) @ ifunc.per_sample_grads(loss, p, train).T
        for lr, p in zip(lrs, members)
    )
    torch.testing.assert_close(stacked.sum(0), tracin)
    total = ifunc.attribute_ensemble(
        loss, members, lambda p: ifunc.ihvp_identity(p), train, query, weights=torch.tensor(lrs)
    )
    torch.testing.assert_close(total, tracin)


def test_kronecker_members_and_flat_stack():
    model, loss, members, train, query = _members(2)
    ens = ifunc.attribute_ensemble(
        loss, members, lambda p: ifunc.ihvp_ekfac(loss, p, train, model=model, damping=0.1), train, query
    )
    generic = [
        ifunc.attribute(loss, p, ifunc.ihvp_ekfac(loss, p, train, damping=0.1, model=model).solve, train, query)
        for p in members
    ]
    torch.testing.assert_close(ens, torch.stack(generic).mean(0))
    flat = torch.stack([ifunc.flatten(p)[0] for p in members])
    _, unflatten = ifunc.flatten(members[0])
    flat_loss = ifunc.flatten_func(loss, unflatten)
    out = ifunc.attribute_ensemble(
        flat_loss, flat, lambda v: ifunc.ihvp_explicit(flat_loss, v, train, damping=1.0), train, query
    )
    ref = ifunc.attribute_ensemble(
        loss, members, lambda p: ifunc.ihvp_explicit(loss, p, train, damping=1.0, curvature="hessian"), train, query
    )
    torch.testing.assert_close(out, ref)


def test_errors():
    model, loss, members, train, query = _members(2)
    factory = lambda p: ifunc.ihvp_identity(p)  # noqa: E731
    with pytest.raises(ValueError, match="at least one member"):
        ifunc.attribute_ensemble(loss, [], factory, train, query)
    with pytest.raises(ValueError, match="weights has 3 entries"):
        ifunc.attribute_ensemble(loss, members, factory, train, query, weights=[1, 2, 3])
    with pytest.raises(ValueError, match="ihvp has 1 entries"):
        ifunc.attribute_ensemble(loss, members, [factory(members[0])], train, query)
    with pytest.raises(ValueError, match="loss has 3 entries"):
        ifunc.attribute_ensemble([loss] * 3, members, factory, train, query)
    with pytest.raises(TypeError, match="sequence of parameter sets"):
        ifunc.attribute_ensemble(loss, members[0], factory, train, query)
    with pytest.raises(TypeError, match="score stores"):
        ifunc.attribute_ensemble(loss, members, factory, train, query, out="x.h5")
    with pytest.raises(TypeError, match="factory"):
        ifunc.attribute_ensemble(loss, members, 3, train, query)


def test_stacked_params_from_stack_module_state():
    model, loss, members, train, query = _members(2)
    modules = []
    for p in members:
        m = copy.deepcopy(model)
        m.load_state_dict(p, strict=False)
        modules.append(m)
    stacked, _ = torch.func.stack_module_state(modules)
    factory = lambda p: ifunc.ihvp_explicit(loss, p, train, damping=0.1)  # noqa: E731
    torch.testing.assert_close(
        ifunc.attribute_ensemble(loss, stacked, factory, train, query, stacked=True),
        ifunc.attribute_ensemble(loss, members, factory, train, query),
    )
    with pytest.raises(ValueError, match="same leading member"):
        ifunc.attribute_ensemble(
            loss, {"a": torch.zeros(2, 3), "b": torch.zeros(3)}, factory, train, query, stacked=True
        )
