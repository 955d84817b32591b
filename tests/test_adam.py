"""``ifunc.ihvp_adam``: the diagonal a real ``torch.optim.Adam`` / ``AdamW`` holds, as a damped inverse.

The closure is checked against the optimizer itself (its bias-corrected state by hand, the step Adam takes), a
dense solve of ``diag(D) + λI`` on drawn problems, ``ifunc.attribute``, and its named errors. The method-table row
(``tests/methods.py``, ``"adam"``) runs it through the closure contract and the index tests.
"""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ifunc
from ifunc.testing import mlp_problem, rel_error

from .strategies import seeds

LR = 1e-2


def _step(model: nn.Module, loss, data, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss(dict(model.named_parameters()), data).backward()
    opt.step()


def _trained(cls=torch.optim.Adam, *, seed: int = 0, steps: int = 3, sizes=(3, 4, 2), task="classification", **kw):
    """``(model, loss, data, optimizer)`` after ``steps`` real optimizer steps on an ``mlp_problem``."""
    model, _, loss, data = mlp_problem(seed=seed, sizes=sizes, n=8, task=task)
    opt = cls(model.parameters(), lr=LR, **kw)
    for _ in range(steps):
        _step(model, loss, data, opt)
    return model, loss, data, opt


def _by_hand(model: nn.Module, opt: torch.optim.Optimizer, power: float = 1.0) -> torch.Tensor:
    """``D [d] = (√(v / (1 − β₂^t)) + ε)^{2p}`` read off the optimizer, in ``ifunc.flatten`` order."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    D = {}
    for name, p in model.named_parameters():
        group, state = group_of[id(p)], opt.state[p]
        v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].double()
        v_hat = v / (1 - group["betas"][1] ** float(state["step"]))
        D[name] = (v_hat.sqrt() + group["eps"]) ** (2 * power)
    return ifunc.flatten(D)[0]


def _vectors(d: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- against the optimizer


@pytest.mark.parametrize(
    "cls, kw",
    [
        (torch.optim.Adam, {}),
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.Adam, {"amsgrad": True}),
        (torch.optim.AdamW, {"amsgrad": True, "betas": (0.5, 0.9), "eps": 1e-3}),
    ],
    ids=["adam", "adamw", "adam-amsgrad", "adamw-amsgrad"],
)
def test_the_diagonal_is_the_bias_corrected_state(cls, kw):
    model, _, _, opt = _trained(cls, steps=4, **kw)
    params = ifunc.params_of(model)
    D, lam = _by_hand(model, opt), 1e-3
    ihvp = ifunc.ihvp_adam(params, opt, damping=lam)
    V = _vectors(D.numel())
    assert rel_error(ihvp(V), V / (D + lam)) < 1e-14
    assert ihvp.name == "adam" and ihvp.info["steps"] == {n: 4 for n in params}
    assert ihvp.info["optimizer"] == cls.__name__


def test_amsgrad_uses_the_running_maximum():
    """A large first gradient, then small ones: ``max_exp_avg_sq`` stays above ``exp_avg_sq``; the closure uses it."""
    model, _, loss, data = mlp_problem(seed=4, sizes=(3, 4, 2), n=8)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.5), amsgrad=True)
    _step(model, lambda p, b: 10 * loss(p, b), data, opt)
    for _ in range(3):
        _step(model, loss, data, opt)
    assert all(bool((s["max_exp_avg_sq"] > s["exp_avg_sq"]).all()) for s in opt.state.values())
    V = _vectors(sum(p.numel() for p in model.parameters()))
    got = ifunc.ihvp_adam(ifunc.params_of(model), opt, damping=0.0)(V)
    assert rel_error(got, V / _by_hand(model, opt)) < 1e-14
    opt.param_groups[0]["amsgrad"] = False  # the same state read as plain Adam: the average, a smaller D
    assert bool((ifunc.ihvp_adam(ifunc.params_of(model), opt, damping=0.0)(V).abs() > got.abs()).all())


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_at_zero_damping_the_closure_gives_adams_step(cls):
    """With β₁ = 0 Adam's step is ``−lr · g / (√v̂ + ε)``, ``g`` the gradient it just took: ``−lr · ihvp(g)``."""
    model, loss, data, opt = _trained(cls, betas=(0.0, 0.99), weight_decay=0.0)
    params = ifunc.params_of(model)
    before = {k: v.clone() for k, v in params.items()}
    _step(model, loss, data, opt)
    g = ifunc.flatten({k: p.grad for k, p in model.named_parameters()})[0]
    delta = ifunc.flatten({k: params[k] - before[k] for k in params})[0]  # params share storage with the module
    ihvp = ifunc.ihvp_adam(params, opt, damping=0, power=0.5)  # power 1/2: D = √v̂ + ε, Adam's denominator
    assert rel_error(-LR * ihvp(g), delta) < 1e-12


def test_the_closure_is_a_snapshot_and_leaves_the_optimizer_alone():
    model, loss, data, opt = _trained()
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    ihvp = ifunc.ihvp_adam(ifunc.params_of(model), opt, damping=1e-3)
    V = _vectors(ihvp.dim)
    X = ihvp(V)
    assert all(torch.equal(v, state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
    _step(model, loss, data, opt)  # a later step changes the state, not the closure
    assert torch.equal(ihvp(V), X)
    assert not torch.equal(ifunc.ihvp_adam(ifunc.params_of(model), opt, damping=1e-3)(V), X)


def test_each_parameter_group_uses_its_own_betas_and_eps():
    model, _, loss, data = mlp_problem(seed=1, sizes=(3, 4, 2), n=8)
    first, second = model[0], model[2]
    opt = torch.optim.Adam(
        [
            {"params": first.parameters(), "betas": (0.9, 0.5), "eps": 1e-2},
            {"params": second.parameters(), "betas": (0.9, 0.999), "eps": 1e-8},
        ],
        lr=LR,
    )
    for _ in range(2):
        _step(model, loss, data, opt)
    V = _vectors(sum(p.numel() for p in model.parameters()))
    got = ifunc.ihvp_adam(ifunc.params_of(model), opt, damping=0.0)(V)
    assert rel_error(got, V / _by_hand(model, opt)) < 1e-14


# ---------------------------------------------------------------- against the dense solve


@given(
    seed=seeds,
    hidden=st.integers(1, 4),
    steps=st.integers(1, 4),
    beta2=st.sampled_from([0.5, 0.9, 0.999]),
    eps=st.sampled_from([1e-8, 1e-4, 1e-2]),
    power=st.sampled_from([0.25, 0.5, 1.0]),
    damping=st.sampled_from([0.0, 1e-6, 1e-3, 1.0]),
    amsgrad=st.booleans(),
    cls=st.sampled_from([torch.optim.Adam, torch.optim.AdamW]),
    with_model=st.booleans(),
)
def test_agrees_with_the_dense_solve(seed, hidden, steps, beta2, eps, power, damping, amsgrad, cls, with_model):
    """``f(V) = solve(diag(D) + λI, V)`` for ``[k, d]``, ``[d]`` and a params pytree, with or without ``model=``."""
    model, _, _, opt = _trained(cls, seed=seed, steps=steps, sizes=(2, hidden, 3), betas=(0.9, beta2), eps=eps,
                                amsgrad=amsgrad)  # fmt: skip
    params = ifunc.params_of(model)
    ihvp = ifunc.ihvp_adam(params, opt, damping=damping, power=power, model=model if with_model else None)
    D = _by_hand(model, opt, power)
    V = _vectors(D.numel(), k=4, seed=seed)
    want = torch.linalg.solve(torch.diag(D) + damping * torch.eye(D.numel()), V.T).T
    assert rel_error(ihvp(V), want) < 1e-12
    assert rel_error(ihvp(V[1]), want[1]) < 1e-12
    _, unflatten = ifunc.flatten(params)
    assert rel_error(unflatten.flatten_like(ihvp(unflatten(V)))[0], want) < 1e-12
    assert ihvp.damping == damping
    blocks = {n: b for n, (_, b) in ihvp.info["blocks"].items()}
    assert blocks == {n: n.rpartition(".")[0] for n in params}


def test_default_damping_is_a_tenth_of_each_blocks_mean():
    model, _, _, opt = _trained(eps=1e-3)
    params = ifunc.params_of(model)
    D = ifunc.flatten(params)[1](_by_hand(model, opt))  # name -> D of that parameter
    per_parameter = ifunc.ihvp_adam(params, opt)
    assert per_parameter.damping == pytest.approx({n: 0.1 * float(D[n].mean()) for n in params}, rel=1e-12)
    per_layer = ifunc.ihvp_adam(params, opt, model=model)  # a layer's weight and bias form one block
    layer = {m: torch.cat([D[f"{m}.weight"].reshape(-1), D[f"{m}.bias"]]) for m in ("0", "2")}
    assert per_layer.damping == pytest.approx({m: 0.1 * float(v.mean()) for m, v in layer.items()}, rel=1e-12)


def test_with_damping_is_free_and_describe_records_the_diagonal():
    model, loss, data, opt = _trained()
    params = ifunc.params_of(model)
    ihvp = ifunc.ihvp_adam(params, opt, damping=1e-3, model=model)
    V = _vectors(ihvp.dim)
    assert rel_error(ihvp.with_damping(0.5)(V), ifunc.ihvp_adam(params, opt, damping=0.5)(V)) < 1e-14
    described = ihvp.describe()
    assert described["method"] == "adam" and described["data_recorded"]
    assert described["method_info"]["power"] == 1.0 and described["method_info"]["curvature"] == "adam"
    assert set(described["curvature"]) == {"layer 0", "layer 2"}
    _step(model, loss, data, opt)  # another state: another summary, so a score store refuses to mix them
    assert ifunc.ihvp_adam(params, opt, damping=1e-3, model=model).describe()["curvature"] != described["curvature"]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["f32-state", "f64-state"])
def test_float32_params_take_the_state_in_their_dtype(state_dtype):
    """The closure solves in the parameters' dtype; a second moment in another floating dtype is cast to it."""
    model, _, _, opt = _trained(eps=1e-3)
    D = _by_hand(model, opt)
    model32 = model.float()  # the same Parameter objects, cast in place: the optimizer still holds them
    for state in opt.state.values():
        state["exp_avg_sq"] = state["exp_avg_sq"].to(state_dtype)
    ihvp = ifunc.ihvp_adam(ifunc.params_of(model32), opt, damping=1e-3)
    V = _vectors(D.numel())
    X = ihvp(V.float())
    assert ihvp.dtype == X.dtype == torch.float32
    assert rel_error(X.double(), V / (D + 1e-3)) < 1e-6


# ---------------------------------------------------------------- composes with attribute


def test_scores_are_preconditioned_gradient_products():
    """``attribute`` equals ``G_q diag(1 / (D + λ)) G_trainᵀ``; the Kronecker scorer (``model=``) agrees."""
    model, loss, data, opt = _trained(steps=2)
    params = ifunc.params_of(model)
    x, y = data
    query = (x[:3] + 0.5, y[:3])
    D, lam = _by_hand(model, opt), 1e-3
    G, Gq = ifunc.per_sample_grads(loss, params, data), ifunc.per_sample_grads(loss, params, query)
    want = (Gq / (D + lam)) @ G.T
    for model_ in (None, model):
        ihvp = ifunc.ihvp_adam(params, opt, damping=lam, model=model_)
        scores = ifunc.attribute(loss, params, ihvp, data, query, progress=False)
        assert scores.shape == (3, 8) and rel_error(scores, want) < 1e-12


# ---------------------------------------------------------------- matching parameters and the named errors


def test_copies_of_the_parameters_are_matched_by_name_through_model():
    model, _, _, opt = _trained()
    copies = {k: v.clone() + 0.1 for k, v in ifunc.params_of(model).items()}
    with pytest.raises(ValueError, match=r"\['0.bias', '0.weight', '2.bias', '2.weight'\] are not among .*model="):
        ifunc.ihvp_adam(copies, opt)
    V = _vectors(sum(v.numel() for v in copies.values()))
    got = ifunc.ihvp_adam(copies, opt, damping=1e-3, model=model)(V)
    assert rel_error(got, V / (_by_hand(model, opt) + 1e-3)) < 1e-14


def test_a_parameter_outside_the_optimizer_is_named_or_handled_as_asked():
    model, _, loss, data = mlp_problem(seed=2, sizes=(3, 4, 2), n=8)
    opt = torch.optim.Adam(model[0].parameters(), lr=LR)  # the last layer is frozen by the training loop
    _step(model, loss, data, opt)
    params = ifunc.params_of(model)
    with pytest.raises(ValueError, match=r"\['2.bias', '2.weight'\] are not among the optimizer's parameters"):
        ifunc.ihvp_adam(params, opt)
    V = _vectors(sum(v.numel() for v in params.values()))
    first = slice(0, 16)  # flatten order: 0.bias [4], 0.weight [4, 3], then 2.bias, 2.weight
    D0 = _by_hand(model[0], opt)  # the first layer's own: "bias", "weight", as in params' flatten order
    identity = ifunc.ihvp_adam(params, opt, damping=0.5, missing="identity")
    assert rel_error(identity(V)[:, first], V[:, first] / (D0 + 0.5)) < 1e-14
    assert torch.equal(identity(V)[:, 16:], V[:, 16:] / 1.5)
    assert identity.info["blocks"]["2.weight"] == ("identity", "2")
    excluded = ifunc.ihvp_adam(params, opt, damping=0.5, missing="exclude", model=model)
    assert torch.equal(excluded(V)[:, 16:], torch.zeros(3, V.shape[1] - 16))
    assert rel_error(excluded(V)[:, first], V[:, first] / (D0 + 0.5)) < 1e-14
    assert excluded.info["blocks"]["2.bias"] == ("excluded", None)


def test_a_parameter_without_state_is_named():
    model, _, loss, data = mlp_problem(seed=3, sizes=(3, 4, 2), n=8)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    opt.zero_grad()
    loss(dict(model.named_parameters()), data).backward()
    dict(model.named_parameters())["2.bias"].grad = None  # Adam skips a parameter without a gradient: it gets no state
    opt.step()
    with pytest.raises(ValueError, match=r"\['2.bias'\] have no optimizer state .*missing='identity'"):
        ifunc.ihvp_adam(ifunc.params_of(model), opt)
    assert ifunc.ihvp_adam(ifunc.params_of(model), opt, missing="identity").info["blocks"]["2.bias"][0] == "identity"


def test_an_optimizer_before_its_first_step_is_refused():
    model, _, _, _ = mlp_problem(seed=0)
    with pytest.raises(ValueError, match=r"no state yet: take at least one optimizer.step\(\)"):
        ifunc.ihvp_adam(ifunc.params_of(model), torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "got SGD; SGD keeps no second moment"),
        (lambda m: torch.optim.RMSprop(m.parameters()), "got RMSprop; its state is not Adam's"),
        (lambda m: torch.optim.NAdam(m.parameters()), "got NAdam; its state is not Adam's"),
        (lambda m: {"state": {}}, "got dict; it is not a torch.optim.Optimizer"),
    ],
    ids=["sgd", "rmsprop", "nadam", "state-dict"],
)
def test_another_optimizer_is_named(make, match):
    model, _, _, _ = mlp_problem(seed=0)
    with pytest.raises(TypeError, match=f"must be a torch.optim.Adam or AdamW, {match}"):
        ifunc.ihvp_adam(ifunc.params_of(model), make(model))


def _corrupt(key: str, value):
    """An optimizer after two steps whose first layer's weight state has ``key`` replaced by ``value(state)``."""
    model, _, _, opt = _trained(steps=2)
    state = opt.state[dict(model.named_parameters())["0.weight"]]
    state[key] = value(state)
    return model, opt


@pytest.mark.parametrize(
    "key, value, error, match",
    [
        (
            "exp_avg_sq",
            lambda s: torch.ones(7),
            ValueError,
            r"'0.weight' has shape \(7,\) but the parameter has \(4, 3\)",
        ),
        ("exp_avg_sq", lambda s: s["exp_avg_sq"].to("meta"), ValueError, "'0.weight' is on meta but params are on cpu"),
        ("exp_avg_sq", lambda s: s["exp_avg_sq"].long(), TypeError, "'0.weight' has dtype torch.int64"),
        ("exp_avg_sq", lambda s: s["exp_avg_sq"] * float("nan"), ValueError, "non-finite or negative"),
        ("exp_avg_sq", lambda s: -s["exp_avg_sq"] - 1, ValueError, "non-finite or negative"),
        ("step", lambda s: torch.tensor(0.0), ValueError, "'0.weight' has Adam step 0"),
    ],
    ids=["shape", "device", "dtype", "nan", "negative", "step"],
)
def test_a_state_that_does_not_fit_is_named(key, value, error, match):
    model, opt = _corrupt(key, value)
    with pytest.raises(error, match=match):
        ifunc.ihvp_adam(ifunc.params_of(model), opt)


def test_amsgrad_switched_on_after_the_steps_is_named():
    model, _, _, opt = _trained(steps=2)
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"'0.bias' has no max_exp_avg_sq \(amsgrad=True keeps max_exp_avg_sq\)"):
        ifunc.ihvp_adam(ifunc.params_of(model), opt)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"power": 0}, ValueError, "power must be a finite number > 0"),
        ({"power": float("nan")}, ValueError, "power must be a finite number > 0"),
        ({"power": True}, ValueError, "power must be a finite number > 0"),
        ({"missing": "skip"}, ValueError, r"missing must be one of \['error', 'identity', 'exclude'\]"),
        ({"damping": "1e-3"}, TypeError, "damping must be a number"),
        ({"damping": -1.0}, ValueError, "damping must be a finite number >= 0"),
        ({"model": "model"}, TypeError, "model= must be the nn.Module"),
        ({"modules": ["0"]}, ValueError, "modules= chooses layers of model=; pass model= too"),
    ],
)
def test_bad_options_are_named(kw, error, match):
    model, _, _, opt = _trained(steps=1)
    with pytest.raises(error, match=match):
        ifunc.ihvp_adam(ifunc.params_of(model), opt, **kw)


def test_a_flat_vector_as_params_is_refused_by_name():
    """A flat vector has no names or storages to match to the optimizer's parameters: refused, naming the fix
    (matching it as one unknown leaf, then ``missing="identity"``, would give a meaningless identity closure)."""
    model, _, _, opt = _trained(steps=1)
    flat, _ = ifunc.flatten(ifunc.params_of(model))
    with pytest.raises(TypeError, match=r"params is one tensor.*ifunc.params_of\(model\)"):
        ifunc.ihvp_adam(flat, opt)
    with pytest.raises(TypeError, match="params is one tensor"):
        ifunc.ihvp_adam(flat, opt, missing="identity")


def test_damping_zero_is_accepted_however_wide_the_diagonal_in_float32():
    """A diagonal inverse ``v_j / D_j`` is exact to one rounding at any condition number: entries never seen in
    training (``v = 0``, ``D = ε^{2p}``) next to large ones neither refuse ``damping=0`` nor warn, in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))  # float32; tokens 5..9 never seen: v = 0
    opt = torch.optim.Adam(model.parameters())
    model(torch.randint(0, 5, (8,))).sum().backward()
    opt.step()
    params = ifunc.params_of(model)
    for power in (0.5, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ihvp = ifunc.ihvp_adam(params, opt, damping=0, power=power)
        D = ifunc.flatten({k: (opt.state[p]["exp_avg_sq"] / (1 - 0.999)).sqrt().add(1e-8) ** (2 * power)
                           for k, p in model.named_parameters()})[0]  # fmt: skip
        V = torch.randn(3, D.numel())
        assert rel_error(ihvp(V), V / D) < 1e-6
