"""``IHVP.describe()``: what defines a closure, JSON-able, as a score store records it."""

import json

import pytest
import torch
from torch import nn

import ifunc
from ifunc.testing import mlp_problem

KEYS = ["method", "damping", "method_info", "curvature", "identity", "data_recorded"]


def _summary(t: torch.Tensor) -> list:
    t = t.to(torch.float64)
    return [t.numel(), float(t.abs().sum()), float(t.square().sum())]


@pytest.fixture(scope="module")
def problem():
    return mlp_problem(seed=1, sizes=(3, 5, 2), n=10)


def _round_trips(description: dict) -> None:
    assert list(description) == KEYS
    assert json.loads(json.dumps(description)) == description


def test_explicit_holds_its_eigenvalues_and_settings(problem):
    _, params, loss, data = problem
    ihvp = ifunc.ihvp_explicit(loss, params, data, damping=0.1, blocks="layer")
    out = ihvp.describe()
    _round_trips(out)
    assert out["method"] == "explicit" and out["damping"] == 0.1 and out["identity"] is None
    assert list(out["curvature"]) == ["info eigenvalues"]  # a GGN's: tr M and ‖M‖_F², equal to the eigenvalues'
    assert out["curvature"]["info eigenvalues"] == pytest.approx(_summary(ihvp.info["eigenvalues"]), rel=1e-12)
    assert out["method_info"]["curvature"] == "ggn"
    assert out["method_info"]["blocks"]["0.weight"] == ["explicit", "0"]  # tuples become lists
    assert "eigenvalues" not in out["method_info"]
    assert out["data_recorded"] is True  # the eigenvalues summarise the curvature's data


def test_cg_records_the_rule_and_its_data_fingerprint(problem):
    _, params, loss, data = problem
    ihvp = ifunc.ihvp_cg(loss, params, data)
    out = ihvp.describe()
    _round_trips(out)
    assert out["method"] == "cg" and out["damping"] == ihvp.damping and type(out["damping"]) is float
    assert out["curvature"] == {}
    info = out["method_info"]
    assert info["data"] == ihvp.info["data"] and info["damping_rule"] == ihvp.info["damping_rule"]
    assert info["tol"] == ihvp.info["tol"] and info["maxiter"] is None
    assert out["data_recorded"] is True  # info["data"] fingerprints the data it solves on


def test_ekfac_damping_is_per_block_also_after_redamping():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    _, _, _, data = mlp_problem(seed=2, sizes=(3, 2), n=8)
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: nn.functional.cross_entropy(out, b[1], reduction="sum")
    )
    ihvp = ifunc.ihvp_ekfac(loss, params, data, model=model)
    assert isinstance(ihvp, ifunc.KroneckerIHVP)
    out = ihvp.describe()
    _round_trips(out)
    assert out["method"] == "ekfac"
    assert out["damping"] == {k: float(v) for k, v in ihvp.info["damping"].items()}
    assert set(out["damping"]) == {"0", "3", "1.weight", "1.bias"} and all(v > 0 for v in out["damping"].values())
    expected = {f"layer {b.spec.name}": _summary(b.eigenvalues) for b in ihvp.blocks}
    expected.update({f"diagonal {d.name}": _summary(d.diag) for d in ihvp.diags})
    assert out["curvature"] == expected and "damping" not in out["method_info"]
    assert out["data_recorded"] is True
    again = ihvp.with_damping(0.3).describe()
    assert again["damping"] == dict.fromkeys(out["damping"], 0.3)  # a mapping, as the store records it


def test_identity_names_the_data_when_nothing_else_does(problem):
    _, params, loss, data = problem
    ihvp = ifunc.ihvp_datainf(loss, params, data, damping=0.5)
    out = ihvp.describe()
    _round_trips(out)
    assert out["curvature"] == {} and "data" not in out["method_info"]
    assert out["identity"] is None and out["data_recorded"] is False  # nothing tells its data apart
    ihvp.identity = "datainf on training set v1"
    named = ihvp.describe()
    _round_trips(named)
    assert named["identity"] == "datainf on training set v1" and named["data_recorded"] is True
    assert {k: v for k, v in named.items() if k not in ("identity", "data_recorded")} == {
        k: v for k, v in out.items() if k not in ("identity", "data_recorded")
    }


def test_identity_curvature_needs_no_data(problem):
    _, params, _, _ = problem
    out = ifunc.ihvp_identity(params).describe()
    _round_trips(out)
    assert out["method"] == "identity" and out["damping"] == dict.fromkeys(params, 1.0)
    assert out["curvature"] == {f"diagonal {name}": [p.numel(), 0.0, 0.0] for name, p in params.items()}
    assert out["method_info"]["curvature"] == "identity" and out["data_recorded"] is True


def test_a_custom_callable_is_described_by_what_it_shows(problem):
    """Not an ifunc closure: its ``name``, ``info`` and ``damping`` are recorded, and nothing vouches for its data."""

    class Mine:
        name, damping = "mine", 0.5
        info = {"rank": 3, "ev": torch.arange(4.0)}

        def __call__(self, V):
            return V / 0.5

    description = ifunc.ihvp.describe_closure(Mine())
    _round_trips(description)
    assert description["method"] == "mine" and description["damping"] == 0.5
    assert description["method_info"] == {"rank": 3}
    assert description["curvature"] == {"info ev": _summary(torch.arange(4.0))}
    assert description["data_recorded"] is None and description["identity"] is None
    plain = ifunc.ihvp.describe_closure(lambda V: V)
    assert plain["method"] == "test_a_custom_callable_is_described_by_what_it_shows.<locals>.<lambda>"


def test_a_kronecker_closure_can_be_rebuilt_from_its_fields(problem):
    model, params, loss, data = problem
    ekfac = ifunc.ihvp_ekfac(loss, params, data, model=model)
    fields = {k: getattr(ekfac, k) for k in ekfac.FIELDS}
    again = ifunc.KroneckerIHVP(
        ekfac.solve,
        name="ekfac",
        damping=ekfac.damping,
        unflatten=ekfac.unflatten,
        like=torch.zeros(()),
        info=ekfac.info,
        **fields,
    )
    assert again.describe() == ekfac.describe()
    with pytest.raises(TypeError, match="needs the fields"):
        ifunc.KroneckerIHVP(ekfac.solve, name="ekfac", damping=0.1, unflatten=ekfac.unflatten, like=torch.zeros(()))
