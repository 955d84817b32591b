"""Score stores record the loss, the measurement and the model by content, and never mix two runs' scores.

``ifunc._identity.content_hash`` hashes code, closures, referenced globals and module structure; the stores
refuse a rerun or a resume whose hashes differ (``defined_by`` in the metadata), refuse what cannot be hashed
stably (naming its path) unless ``identity=`` names the run, and the same code in a fresh process matches.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ifunc
from ifunc import store
from ifunc._hash_walk import MAX_DEPTH, UnidentifiableError
from ifunc._identity import content_hash
from ifunc.measurements import output_measurement
from ifunc.testing import mlp_problem

HASH = r"'[0-9a-f]{32}'"


def source(text: str, **names):
    """The function ``f`` defined by ``text`` in a fresh module namespace holding ``names`` (user code)."""
    scope = dict(names, __name__="user_code")
    exec(textwrap.dedent(text), scope)
    return scope["f"]


def sha(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------- content hashes


def test_the_same_code_hashes_the_same_and_every_part_of_a_function_counts():
    base = "def f(p, b, k=2):\n    return k * scale * p + b.x\n"
    h = content_hash(source(base, scale=1.0))
    assert content_hash(source(base, scale=1.0)) == h  # another function object, same code
    assert content_hash(source(base.replace("k * ", "k + "), scale=1.0)) != h  # its code
    assert content_hash(source(base.replace("k=2", "k=3"), scale=1.0)) != h  # a default
    assert content_hash(source(base, scale=2.0)) != h  # a global it reads
    assert content_hash(source(base, scale=1.0, unused=5)) == h  # a global it does not read
    assert content_hash(source(base, scale=1.0, x=7)) == h  # `b.x` is an attribute, not the global x

    def closing(value):
        return lambda p, b: value * p

    assert content_hash(closing(3)) == content_hash(closing(3)) != content_hash(closing(4))  # closure cells
    t = torch.arange(4.0)
    assert content_hash(closing(t)) == content_hash(closing(t.clone())) != content_hash(closing(t + 1))


def test_containers_partials_and_output_losses_hash_by_content():
    a = source("def f(p, b):\n    return p.sum()\n")
    b = source("def f(p, b):\n    return p.mean()\n")
    assert content_hash(functools.partial(a, b=1)) == content_hash(functools.partial(a, b=1))
    assert content_hash(functools.partial(a, b=1)) != content_hash(functools.partial(a, b=2))
    assert content_hash(ifunc.output_loss(a, b)) != content_hash(ifunc.output_loss(b, a))
    assert content_hash({"x": 1, 2: "y"}) == content_hash({"x": 1, 2: "y"})
    assert content_hash({"x": 1, 2: "y"}) != content_hash({2: "y", "x": 1})  # insertion order: a loss may iterate it
    assert content_hash({"a", "b", "c"}) == content_hash({"c", "b", "a"})
    assert content_hash([1, (2.0, None, True)]) != content_hash([1, (2.0, None, False)])


def test_cycles_end_in_back_references_and_depth_is_bounded():
    loop: list = [1]
    loop.append(loop)
    assert content_hash(loop) == content_hash(loop)
    other: list = [2]
    other.append(other)
    assert content_hash(loop) != content_hash(other)
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(UnidentifiableError, match=rf"value -> \[0\] -> .* nested deeper than {MAX_DEPTH} levels"):
        content_hash(deep)


class _Opaque:
    """An object that only its address tells apart: its repr is ``<... object at 0x...>``."""

    __slots__ = ()


class _Holder:
    def __init__(self):
        self.foo = _Opaque()


def test_a_value_without_a_stable_identity_is_named_by_its_path():
    thing = _Holder()
    loss = lambda p, b: p.sum() + len(thing.__dict__)  # noqa: E731
    with pytest.raises(
        UnidentifiableError,
        match=r"loss -> closure 'thing' -> attribute 'foo': <.*_Opaque object at 0x.*> has no stable identity "
        r"\(its repr holds a memory address\)",
    ):
        content_hash(loss, name="loss")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("mask", torch.ones(3))
        self.scale = 1.0

    def forward(self, x):
        return self.scale * torch.tanh(self.fc(x)) * self.mask


def _net() -> Net:
    torch.manual_seed(0)
    return Net().double().eval()


def _sigmoid_forward(self, x):
    return self.scale * torch.sigmoid(self.fc(x)) * self.mask


def test_a_module_is_hashed_by_structure_forward_buffers_and_flags_not_parameters(monkeypatch):
    tracked = dict(_net().named_parameters())
    h = content_hash(_net(), tracked=tracked)
    net = _net()
    with torch.no_grad():
        net.fc.weight += 1.0  # tracked parameters are the call's params, fingerprinted on their own
    assert content_hash(net, tracked=tracked) == h
    assert content_hash(net) != content_hash(_net())  # untracked ones (a frozen base) by content
    for change in (
        lambda m: m.mask.mul_(2.0),  # a buffer
        lambda m: m.train(),  # the training flag
        lambda m: setattr(m, "scale", 2.0),  # a plain attribute the forward reads
        lambda m: setattr(m, "fc", nn.Linear(3, 3, bias=False).double()),  # structure
        lambda m: m.register_forward_hook(lambda mod, args, out: out * 2),  # a hook
    ):
        changed = _net()
        change(changed)
        assert content_hash(changed, tracked=tracked) != h
    monkeypatch.setattr(Net, "forward", _sigmoid_forward)  # the class's code
    assert content_hash(_net(), tracked=tracked) != h


# ---------------------------------------------------------------- stores refuse another loss, measurement or model


def _problem():
    model, params, loss, (x, y) = mlp_problem(seed=1, sizes=(3, 5, 3), n=15)
    margin = output_measurement(lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: -out[:, 0].sum())
    return model, params, loss, margin, (x, y), (x[:2], y[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_finished_store_rerun_with_another_measurement_is_refused(dtype, tmp_path):
    model, params, loss, margin, train, query = _problem()
    params = {k: v.to(dtype) for k, v in params.items()}
    model.to(dtype)
    train = tuple(t.to(dtype) if t.is_floating_point() else t for t in train)
    query = tuple(t.to(dtype) if t.is_floating_point() else t for t in query)
    ihvp = ifunc.ihvp_identity(params, damping=1.0)
    path = ifunc.attribute(loss, params, ihvp, train, query, out=tmp_path / "s.h5", chunk_size=4, progress=False)
    before = sha(path)
    with pytest.raises(ValueError, match=rf"different run \(defined_by\.measurement: file has {HASH}, this call has"):
        ifunc.attribute(loss, params, ihvp, train, query, measurement=margin, out=path, chunk_size=4, progress=False)
    assert sha(path) == before
    # the default measurement is the loss itself: naming it changes nothing
    ifunc.attribute(loss, params, ihvp, train, query, measurement=loss, out=path, chunk_size=4, progress=False)
    expected = ifunc.attribute(loss, params, ihvp, train, query, progress=False)
    np.testing.assert_array_equal(ifunc.load_scores(path), expected.float().numpy())
    assert sha(path) == before


class Stop(Exception):
    pass


def test_a_killed_store_resumed_with_another_measurement_is_refused(tmp_path, monkeypatch):
    _, params, loss, margin, train, query = _problem()
    ihvp = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    path = tmp_path / "s.h5"
    real = store.ScoreWriter.write

    def crash_after_two(self, index, columns, fp):
        if len(self.done) == 2:
            raise Stop
        real(self, index, columns, fp)

    with monkeypatch.context() as patch, pytest.raises(Stop):
        patch.setattr(store.ScoreWriter, "write", crash_after_two)
        ifunc.attribute(loss, params, ihvp, train, query, measurement=margin, out=path, chunk_size=3, progress=False)
    before = sha(path)
    with pytest.raises(ValueError, match=rf"defined_by\.measurement: file has {HASH}, this call has {HASH}"):
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=3, progress=False)
    assert sha(path) == before
    ifunc.attribute(loss, params, ihvp, train, query, measurement=margin, out=path, chunk_size=3, progress=False)
    expected = ifunc.attribute(loss, params, ihvp, train, query, measurement=margin, progress=False)
    np.testing.assert_allclose(ifunc.load_scores(path), expected.numpy(), rtol=1e-6, atol=1e-7)


def _net_problem():
    model = _net()
    params = ifunc.params_of(model)
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(3))
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    return model, params, loss, (x, y), (x[:2], y[:2])


def test_an_identity_store_after_a_change_of_the_models_forward_is_refused(tmp_path, monkeypatch):
    model, params, loss, train, query = _net_problem()
    ihvp = ifunc.ihvp_identity(params, damping=1.0)
    path = ifunc.attribute(loss, params, ihvp, train, query, out=tmp_path / "s.h5", chunk_size=4, progress=False)
    before = sha(path)
    monkeypatch.setattr(Net, "forward", _sigmoid_forward)
    with pytest.raises(ValueError, match=rf"different run \(defined_by\.loss: file has {HASH}, this call has"):
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, progress=False)
    model.scale = 3.0
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"defined_by\.loss"):  # an attribute the forward reads
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, progress=False)
    assert sha(path) == before


def test_a_kronecker_store_records_the_closures_model(tmp_path, monkeypatch):
    model, params, loss, train, query = _net_problem()
    ihvp = ifunc.ihvp_kfac(loss, params, train, model=model, damping=0.1)
    path = ifunc.attribute(loss, params, ihvp, train, query, out=tmp_path / "k.h5", chunk_size=4, progress=False)
    with h5py.File(path, "r") as f:
        recorded = json.loads(f["meta"][()])["defined_by"]
    assert recorded["model"] == content_hash(model, name="model", tracked=params)
    assert recorded["loss"] == recorded["measurement"]
    before = sha(path)
    monkeypatch.setattr(Net, "forward", _sigmoid_forward)
    with pytest.raises(ValueError, match=r"defined_by\.loss: .*defined_by\.model: file has"):
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, progress=False)
    assert sha(path) == before


def test_an_unidentifiable_loss_is_refused_before_any_work_and_identity_names_the_run(tmp_path):
    _, params, plain, _, train, query = _problem()
    thing = _Holder()

    def loss(p, b):
        return plain(p, b) + 0 * len(thing.__dict__)

    ihvp = ifunc.ihvp_identity(params, damping=1.0)
    path = tmp_path / "s.h5"
    with pytest.raises(
        UnidentifiableError,
        match=r"loss -> closure 'thing' -> attribute 'foo' cannot be identified: .*memory address.*Pass "
        r"identity='<a name that changes whenever the loss, measurement or model does>'",
    ):
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []
    ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, progress=False, identity="run v1")
    with h5py.File(path, "r") as f:
        assert json.loads(f["meta"][()])["defined_by"] == {"identity": "run v1"}
    before = sha(path)
    assert ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, identity="run v1") == path
    with pytest.raises(ValueError, match=r"defined_by\.identity: file has 'run v1', this call has 'run v2'"):
        ifunc.attribute(loss, params, ihvp, train, query, out=path, chunk_size=4, identity="run v2")
    assert sha(path) == before
    with pytest.raises(ValueError, match="identity= names what defines the scores of a score store; it needs out="):
        ifunc.attribute(plain, params, ihvp, train, query, identity="run v1")
    with pytest.raises(TypeError, match="identity= must be a non-empty string"):
        ifunc.attribute(plain, params, ihvp, train, query, out=path, identity=3)


# ---------------------------------------------------------------- across processes

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    import ifunc

    torch.set_default_dtype(torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return ACTIVATION(self.fc(x))

    torch.manual_seed(0)
    model = Net().eval()
    params = ifunc.params_of(model)
    x, y = torch.randn(9, 3, generator=torch.Generator().manual_seed(1)), torch.arange(9) % 3
    loss = ifunc.output_loss(lambda p, b: ifunc.call(model, p, b[0]),
                             lambda out, b: F.cross_entropy(out, b[1], reduction="sum"))
    measurement = lambda p, b: MEASUREMENT
    ihvp = ifunc.ihvp_identity(params, damping=1.0)
    try:
        print(ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), measurement=measurement, out=sys.argv[1],
                              chunk_size=3, progress=False))
    except ValueError as err:
        print("refused:", err)
""")


def _run(tmp_path, path, activation="torch.tanh", measurement="loss(p, b)", seed="0"):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.replace("ACTIVATION", activation).replace("MEASUREMENT", measurement))
    env = dict(os.environ, PYTHONHASHSEED=seed)
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_same_script_in_a_fresh_process_matches_and_a_changed_one_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    assert _run(tmp_path, path) == str(path)
    before = sha(path)
    assert _run(tmp_path, path, seed="1") == str(path)  # another process, another string-hash seed
    assert sha(path) == before
    refused = _run(tmp_path, path, measurement="2 * loss(p, b)")
    assert refused.startswith("refused:") and "defined_by.measurement: file has" in refused
    refused = _run(tmp_path, path, activation="torch.sigmoid")
    assert refused.startswith("refused:") and "defined_by.loss: file has" in refused
    assert sha(path) == before


HF_HASH = textwrap.dedent("""
    import json, time
    from ifunc import language
    from ifunc._identity import content_hash
    from ifunc.testing import hf_logits, tiny_gpt2

    model = tiny_gpt2()
    loss = language.causal_lm_loss(hf_logits(model))
    start = time.perf_counter()
    hashes = [content_hash(model, name="model"), content_hash(loss, name="loss")]
    print(json.dumps({"hashes": hashes, "seconds": time.perf_counter() - start}))
""")


@pytest.mark.slow
def test_a_hugging_face_gpt2_hashes_the_same_in_every_process_and_cheaply(tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "hf.py"
    script.write_text(HF_HASH)
    runs = []
    for seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert runs[0]["hashes"] == runs[1]["hashes"]
    assert max(r["seconds"] for r in runs) < 1.0  # measured: about 10 ms for model and loss together
    start = time.perf_counter()
    content_hash(_net())
    assert time.perf_counter() - start < 1.0


def test_weights_outside_params_are_recorded_by_content(tmp_path):
    """A frozen base (parameters the call reads from the module, as under LoRA adapters) is part of the run;
    the module's own copies of the tracked parameters are not (``params`` override them)."""
    model, params, loss, _, train, query = _problem()
    head = next(k for k in reversed(list(params)) if k.endswith("weight"))
    tracked = {head: params[head].clone()}  # only the head: every other weight is frozen in the module
    ihvp = ifunc.ihvp_identity(tracked, damping=1.0)
    run = lambda: ifunc.attribute(
        loss, tracked, ihvp, train, query, out=tmp_path / "f.h5", chunk_size=4, progress=False
    )  # noqa: E731
    path = run()
    before = sha(path)
    owned = dict(model.named_parameters())
    with torch.no_grad():
        owned[head].add_(1.0)  # overridden by params: the scores cannot change
    assert run() == path and sha(path) == before
    frozen = next(k for k in owned if k != head and k.endswith("weight"))
    with torch.no_grad():
        owned[frozen].mul_(1.5)
    with pytest.raises(ValueError, match=r"defined_by\.loss"):
        run()
    assert sha(path) == before


def test_what_a_loss_reads_through_its_own_module_functions_and_private_attributes_counts(tmp_path):
    import types

    helpers = types.ModuleType("user_helpers")  # a module of the user's project (not an installed library)
    helpers.SCALE = 1.0
    sys.modules["user_helpers"] = helpers
    try:
        f = source("import user_helpers\ndef f(p, b):\n    return user_helpers.SCALE * p\n")
        h = content_hash(f)
        helpers.SCALE = 2.0
        assert content_hash(f) != h
    finally:
        del sys.modules["user_helpers"]
    g = source("def f(p, b):\n    return f.scale * p\n")
    g.scale = 1.0
    h = content_hash(g)
    g.scale = 2.0
    assert content_hash(g) != h
    net = _net()
    net._temperature = 1.0
    h = content_hash(net)
    net._temperature = 2.0
    assert content_hash(net) != h
    assert content_hash(torch.tensor(2.0)) != content_hash(torch.tensor(3.0))  # 0-d tensors (BatchNorm's counter)
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double().eval()
    assert content_hash(bn) == content_hash(bn)


def test_a_frozen_module_with_the_names_of_the_trained_one_is_recorded_by_content():
    """params of a head; a backbone whose parameter names collide with the head's is still a frozen input."""
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(3, 4)).double(), nn.Sequential(nn.Linear(4, 2)).double()
    params = ifunc.params_of(head)
    loss = lambda p, b: ifunc.call(head, p, backbone(b[0])).sum()  # noqa: E731
    h = content_hash(loss, tracked=params)
    with torch.no_grad():
        backbone[0].weight.add_(1.0)
    assert content_hash(loss, tracked=params) != h
    h = content_hash(loss, tracked=params)
    with torch.no_grad():
        head[0].weight.add_(1.0)  # the call reads params, not the module's copy
    assert content_hash(loss, tracked=params) == h


def test_a_cg_store_is_refused_when_the_closure_solves_on_other_data(tmp_path):
    """CG keeps nothing computed from its data; the data it solves on is recorded, so other data is refused."""
    model, params, loss, _, (x, y), query = _problem()
    path = tmp_path / "cg.h5"

    def run(train):
        ihvp = ifunc.ihvp_cg(loss, params, train, damping=0.5)
        return ifunc.attribute(loss, params, ihvp, (x, y), query, out=path, chunk_size=4, progress=False)

    run((x, y))
    before = sha(path)
    assert run((x, y)) == path and sha(path) == before  # the same data: the finished store is returned
    with pytest.raises(ValueError, match=r"different run \(method_info\.data"):
        run((x[:-1], y[:-1]))  # the curvature of other data
    assert sha(path) == before
