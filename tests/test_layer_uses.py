"""Layer capture tells the truth: which dimension indexes the examples, and whether a weight is used elsewhere.

References: a batch-first twin of every sequence-first model (same weights, so the same curvature and scores), the
dense diagonal / block-diagonal curvature from per-example gradients (computed example by example, so sequence-first
models need no ``vmap``), and the per-example-gradient scores ``G_q · ihvp(G_train)ᵀ`` of the same closure.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ifunc
from ifunc.ihvp.kronecker import find_layers, layout
from ifunc.ihvp.kronecker.capture import ExampleDimError, WeightUseError, layer_capture
from ifunc.ihvp.kronecker.factors import KroneckerFactors
from ifunc.testing import Conv1D

DTYPES = [torch.float32, torch.float64]
METHODS = [ifunc.ihvp_ekfac, ifunc.ihvp_kfac, ifunc.ihvp_diagonal]


def tol(dtype):
    return {"rtol": 2e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


def ce_loss(model):
    return ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )


def loop_grads(loss, params, data) -> torch.Tensor:
    """Per-example flat gradients ``[n, d]``, one example at a time (no vmap: models may be sequence-first)."""
    x, y = data
    rows = []
    for i in range(x.shape[0]):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss(p, (x[i : i + 1], y[i : i + 1])), list(p.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(p.items(), grads)}
        rows.append(ifunc.flatten(grads)[0])
    return torch.stack(rows)


def reference_scores(loss, params, ih, train, query) -> torch.Tensor:
    return loop_grads(loss, params, query) @ ih(loop_grads(loss, params, train)).T


def data(shape, n_classes=3, n=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen).to(dtype), torch.randint(0, n_classes, (n,), generator=gen)


# ---------------------------------------------------------------- the example dimension


class Seq(nn.Module):
    """``[b, T, 3] -> [b, 3]`` through a Linear or GPT-2 Conv1D and a Linear, applied ``[T, b, ·]`` if seq-first."""

    def __init__(self, seq_first: bool, conv1d: bool = False):
        super().__init__()
        self.seq_first = seq_first
        self.fc1 = Conv1D(4, 3) if conv1d else nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        if self.seq_first:
            x = x.transpose(0, 1)
        return self.fc2(torch.tanh(self.fc1(x))).sum(0 if self.seq_first else 1)


class Encoder(nn.Module):
    """A Linear, one ``nn.TransformerEncoderLayer`` (batch_first or not), a head: ``[b, T, 3] -> [b, 3]``."""

    def __init__(self, seq_first: bool):
        super().__init__()
        self.seq_first = seq_first
        self.emb = nn.Linear(3, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=not seq_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        h = self.block(h.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.block(h)
        return self.head(h).sum(1)


def twins(kind, dtype):
    torch.manual_seed(0)
    build = {"linear": Seq, "conv1d": lambda s: Seq(s, conv1d=True), "encoder": Encoder}[kind]
    batch_first, seq_first = build(False).to(dtype).eval(), build(True).to(dtype).eval()
    seq_first.load_state_dict(batch_first.state_dict())
    return batch_first, seq_first


@pytest.mark.filterwarnings("ignore:.*(performance drop|scaled_dot_product|Attempting to run cuBLAS)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "encoder"])
@pytest.mark.parametrize("method", METHODS)
def test_sequence_first_equals_batch_first(kind, method, dtype):
    """Same weights, same examples: the sequence-first model's closure and scores are the batch-first twin's."""
    ref_model, model = twins(kind, dtype)
    train, query = data((4, 3), dtype=dtype), data((4, 3), n=2, seed=1, dtype=dtype)
    params = ifunc.params_of(model)
    closures = [method(ce_loss(m), params, train, model=m, damping=0.1) for m in (ref_model, model)]
    v = torch.randn(3, closures[0].dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(closures[1](v), closures[0](v), **tol(dtype))
    seq_first_layers = {b.spec.name for b in closures[1].blocks if kind != "encoder" or b.spec.name.startswith("block")}
    assert {b.spec.name for b in closures[1].blocks if b.spec.batch_dim == 1} == seq_first_layers
    assert {b.spec.batch_dim for b in closures[0].blocks} == {0}
    scores = ifunc.attribute(ce_loss(model), params, closures[1], train, query, chunk_size=4)
    torch.testing.assert_close(
        scores, ifunc.attribute(ce_loss(ref_model), params, closures[0], train, query), **tol(dtype)
    )
    torch.testing.assert_close(
        scores, reference_scores(ce_loss(model), params, closures[1], train, query), **tol(dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_first_diagonal_is_the_dense_diagonal(dtype):
    _, model = twins("conv1d", dtype)
    train = data((5, 3), dtype=dtype)
    params, loss = ifunc.params_of(model), ce_loss(model)
    ih = ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.3, curvature="empirical_fisher")
    G = loop_grads(loss, params, train).double()
    expected = 1 / ((G * G).mean(0) + 0.3)
    torch.testing.assert_close(ih(torch.eye(ih.dim, dtype=dtype)).double(), torch.diag(expected), **tol(dtype))


class DeepLinear(nn.Module):
    """``[b, 3] -> [b, 2]`` by two Linear layers applied to ``[1, b, ·]`` (one position, sequence-first)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x.unsqueeze(0))).squeeze(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", [ifunc.ihvp_ekfac, ifunc.ihvp_kfac])
def test_sequence_first_deep_linear_mse_is_the_block_diagonal_ggn(method, dtype):
    """Deep linear nets with squared error: K-FAC = EK-FAC = the block-diagonal GGN, here with ``[1, b, in]`` inputs."""
    torch.manual_seed(0)
    model = DeepLinear().to(dtype)
    x, y = torch.randn(7, 3, dtype=dtype), torch.randn(7, 2, dtype=dtype)
    loss = ifunc.output_loss(lambda p, b: ifunc.call(model, p, b[0]), lambda o, b: 0.5 * ((o - b[1]) ** 2).sum())
    params = ifunc.params_of(model)
    ih = method(loss, params, (x, y), model=model, damping=0.5, curvature="ggn")
    G = ifunc.ggn(loss, params, (x, y)).double()  # vmap sees x [3] -> [1, 3]: fine for this model
    lay = layout(params)
    mask = torch.zeros_like(G, dtype=torch.bool)
    for m in ("fc1", "fc2"):
        idx = torch.cat([torch.arange(lay[f"{m}.{r}"].start, lay[f"{m}.{r}"].stop) for r in ("weight", "bias")])
        mask[idx[:, None], idx] = True
    eye = torch.eye(ih.dim, dtype=dtype)
    expected = torch.linalg.solve(torch.where(mask, G, 0).double() + 0.5 * eye.double(), eye.double())
    torch.testing.assert_close(ih(eye).double(), expected, **tol(dtype))


class Flattened(nn.Module):
    """Tokens flattened into the batch (``x.reshape(b * T, d)``) before a Linear, or a Conv2d on ``[b·F, C, H, W]``."""

    def __init__(self, conv: bool = False):
        super().__init__()
        self.conv = conv
        self.fc1 = nn.Conv2d(1, 2, 3) if conv else nn.Linear(3, 4)
        self.fc2 = nn.Linear(4 if not conv else 8, 3)

    def forward(self, x):
        b = x.shape[0]
        if self.conv:  # x [b, frames, 4, 4]: every frame an image
            return self.fc2(torch.tanh(self.fc1(x.reshape(-1, 1, 4, 4))).reshape(b, -1, 8).sum(1))
        return self.fc2(torch.tanh(self.fc1(x.reshape(-1, x.shape[-1]))).reshape(b, -1, 4)).sum(1)


class SharedInput(nn.Module):
    """A Linear applied to a table shared by the batch (a learned position projection), broadcast over examples."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
        self.fc1, self.pos, self.fc2 = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) + self.pos(self.table))).sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "build,shape,layer",
    [(Flattened, (4, 3), "fc1"), (lambda: Flattened(conv=True), (2, 4, 4), "fc1"), (SharedInput, (4, 3), "pos")],
)
def test_no_example_dimension_is_refused_with_the_fix(build, shape, layer, dtype):
    model = build().to(dtype).eval()
    train = data(shape, dtype=dtype)
    params, loss = ifunc.params_of(model), ce_loss(model)
    message = rf"'{layer}' has no dimension of the examples .*with 1 example and .*modules="
    for method in (*METHODS, ifunc.fit_kronecker_factors):
        with pytest.raises(ExampleDimError, match=message):
            method(loss, params, train, model=model)
    ih = ifunc.ihvp_identity(params, model=model)
    with pytest.raises(ExampleDimError, match=message):
        ifunc.attribute(loss, params, ih, train, train)
    with pytest.raises(ExampleDimError, match=message):
        ifunc.capture_layer_grads(loss, params, train, model=model)
    kept = ifunc.ihvp_diagonal(loss, params, train, model=model, modules=lambda n, m: n != layer, damping=0.1)
    assert kept.info["blocks"][f"{layer}.weight"] == ("diagonal", layer)


def test_every_capture_checks_the_example_rows():
    model = Seq(seq_first=True).double()
    layers, _ = find_layers(model, ifunc.params_of(model))
    with pytest.raises(ExampleDimError, match=r"'fc1' got an input of shape \(5, 3, 3\) with 5 rows along dimension 0"):
        with layer_capture(model, layers, examples=3):
            model(torch.randn(3, 5, 3))
    probed = [s._replace(batch_dim=1) for s in layers]
    with layer_capture(model, probed, examples=3) as rec:
        model(torch.randn(3, 5, 3))
    assert rec.activations(probed[0]).shape == (3, 5, 4)


def test_factor_files_keep_the_example_dimension(tmp_path):
    _, model = twins("linear", torch.float64)
    train = data((4, 3))
    params, loss = ifunc.params_of(model), ce_loss(model)
    factors = ifunc.fit_kronecker_factors(loss, params, train, model=model)
    assert {s.batch_dim for s in factors.layers} == {1}
    ifunc.save_factors(tmp_path / "f.h5", factors, params)
    loaded = ifunc.load_factors(tmp_path / "f.h5", params)
    assert loaded.layers == factors.layers
    old = factors._replace(layers=tuple(tuple(s)[:6] for s in factors.layers))  # written before the field existed
    ifunc.save_factors(tmp_path / "old.h5", KroneckerFactors(*old), params)
    loaded = ifunc.load_factors(tmp_path / "old.h5", params)
    assert {s.batch_dim for s in loaded.layers} == {0}
    ih = ifunc.ihvp_ekfac(loss, params, loaded, model=model, damping=0.1)  # probed again when it first captures
    query = (train[0][:2], train[1][:2])
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ih, train, query), reference_scores(loss, params, ih, train, query)
    )
    torch.testing.assert_close(
        ifunc.self_influence(loss, params, ih, train), reference_scores(loss, params, ih, train, train).diag()
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_first_per_token_and_captured_grads(dtype):
    ref_model, model = twins("linear", dtype)
    train, query = data((4, 3), dtype=dtype), data((4, 3), n=2, seed=1, dtype=dtype)
    params = ifunc.params_of(model)
    ihs = [ifunc.ihvp_identity(params, model=m, damping=2.0) for m in (ref_model, model)]
    tokens = [
        ifunc.attribute(ce_loss(m), params, ih, train, query, per_token=True) for m, ih in zip((ref_model, model), ihs)
    ]
    torch.testing.assert_close(tokens[1], tokens[0], **tol(dtype))
    torch.testing.assert_close(
        tokens[1].sum(-1), reference_scores(ce_loss(model), params, ihs[1], train, query), **tol(dtype)
    )
    grads = [ifunc.capture_layer_grads(ce_loss(m), params, train, model=m) for m in (ref_model, model)]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **tol(dtype))


# ---------------------------------------------------------------- a tracked weight used a second way


class Scaled(nn.Linear):
    """An ``nn.Linear`` subclass with its own forward: ``y = (2W) x + b``."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class Reused(nn.Module):
    """``[b, T, 4] -> [b, 3]`` where the weight of ``fc`` (a Linear, Conv1D or Conv2d) is also used another way."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        if how == "embedding":  # a head weight reused by an Embedding, the head registered first (its name kept)
            self.head = nn.Linear(4, 5, bias=False)
            self.emb = nn.Embedding(5, 4)
            self.emb.weight = self.head.weight
            return
        if how == "conv2d":
            self.fc = nn.Conv2d(1, 1, 3, padding=1)
        elif how == "conv1d":
            self.fc, self.other = Conv1D(4, 4), Conv1D(4, 4)
            self.other.weight = self.fc.weight
        else:
            self.fc = Scaled(4, 4) if how == "subclass" else nn.Linear(4, 4)
            self.other = nn.Linear(4, 4)
            if how == "tied":
                self.other.weight = self.fc.weight
        self.out = nn.Linear(16 if how == "conv2d" else 4, 3)

    def forward(self, x):
        if self.how == "embedding":  # x [b, T, 4]: token ids from the signs
            ids = (x > 0).long().sum(-1)
            return self.head(torch.tanh(self.emb(ids))).sum(1)[:, :3]
        if self.how == "conv2d":  # x [b, T, 4] as a 1-channel image
            h = self.fc(x.unsqueeze(1)) + F.conv2d(x.unsqueeze(1), self.fc.weight, padding=1)
            return self.out(torch.tanh(h).flatten(1))
        h = torch.tanh(self.fc(x))
        h = h + F.linear(x, self.fc.weight) if self.how == "functional" else h
        return self.out(torch.tanh(self.other(h) if hasattr(self, "other") else h)).sum(1)


HOWS = ["tied", "embedding", "functional", "subclass", "conv1d", "conv2d"]  # "plain": no second use


def _reused(how, dtype):
    torch.manual_seed(0)
    model = Reused(how).to(dtype).eval()
    return model, ifunc.params_of(model), ce_loss(model), data((4, 4), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", HOWS)
def test_weight_used_a_second_way_is_refused(how, dtype):
    model, params, loss, train = _reused(how, dtype)
    layer = "head" if how == "embedding" else "fc"
    message = rf"'{layer}.weight' is not the sum over the calls of '{layer}'.*modules="
    for method in (*METHODS, ifunc.fit_kronecker_factors):
        with pytest.raises(WeightUseError, match=message):
            method(loss, params, train, model=model)
    ih = ifunc.ihvp_identity(params, model=model)  # no data at build: checked when it first captures
    with pytest.raises(WeightUseError, match=message):
        ifunc.attribute(loss, params, ih, train, train)
    with pytest.raises(WeightUseError, match=message):
        ifunc.self_influence(loss, params, ih, train)
    with pytest.raises(WeightUseError, match=message):
        ifunc.capture_layer_grads(loss, params, train, model=model)
    if how == "tied":  # the message names the other holder of the Parameter
        with pytest.raises(WeightUseError, match=r"held by \['fc.weight', 'other.weight'\]"):
            ifunc.ihvp_ekfac(loss, params, train, model=model)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", HOWS)
def test_left_out_the_reused_layer_is_exact(how, dtype):
    """The fix the message gives: the layer's parameters in diagonal blocks, exact against the dense diagonal."""
    model, params, loss, train = _reused(how, dtype)
    layer = "head" if how == "embedding" else "fc"
    keep = lambda n, m: n not in (layer, "other")  # noqa: E731  (the tied twin too)
    G = loop_grads(loss, params, train).double()
    ih = ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.2, modules=keep, curvature="empirical_fisher")
    assert ih.info["blocks"][f"{layer}.weight"] == ("diagonal", layer)
    eye = torch.eye(ih.dim, dtype=dtype)
    torch.testing.assert_close(ih(eye).double(), torch.diag(1 / ((G * G).mean(0) + 0.2)), **tol(dtype))
    ek = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.2, modules=keep)
    query = (train[0][:2], train[1][:2])
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ek, train, query), reference_scores(loss, params, ek, train, query), **tol(dtype)
    )


def test_closure_from_factors_checks_the_model_it_scores_with(tmp_path):
    """Factors fitted on a model without the functional use, scored on one with it: refused at the first capture."""
    plain, params, loss, train = _reused("plain", torch.float64)
    factors = ifunc.fit_kronecker_factors(loss, params, train, model=plain)
    ifunc.save_factors(tmp_path / "f.h5", factors, params)
    functional = Reused("functional").double().eval()
    functional.load_state_dict(plain.state_dict())
    loss2 = ce_loss(functional)
    for fs in (factors, ifunc.load_factors(tmp_path / "f.h5", params)):
        ih = ifunc.ihvp_ekfac(loss2, params, fs, model=functional, damping=0.1)
        with pytest.raises(WeightUseError, match="'fc.weight'"):
            ifunc.attribute(loss2, params, ih, train, train)
        with pytest.raises(WeightUseError, match="'fc.weight'"):
            ifunc.attribute(loss2, params, ih.with_damping(1.0), train, train, per_token=True)


# ---------------------------------------------------------------- no supported layer: every parameter diagonal


class NoLayer(nn.Module):
    """Only layers the Kronecker family does not factor: Conv1d, LayerNorm, a reflect-padded and a grouped Conv2d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 2, 3)
        self.norm = nn.LayerNorm(2)
        self.c2 = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv2d(2, 2, 1, groups=2)

    def forward(self, x):  # x [b, 2, 4]
        h = self.norm(torch.tanh(self.c1(x)).transpose(1, 2))  # [b, 2, 2]
        return self.c3(torch.tanh(self.c2(h.unsqueeze(1)))).mean(dim=(2, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["no_layer", "predicate"])
def test_every_method_without_a_supported_layer(case, dtype):
    if case == "no_layer":
        torch.manual_seed(0)
        model, kw = NoLayer().to(dtype).eval(), {}
        train = data((2, 4), n_classes=2, dtype=dtype)
    else:  # a modules= predicate that selects nothing
        model, _, _, train = _reused("plain", dtype)
        kw = {"modules": lambda n, m: False}
    params, loss = ifunc.params_of(model), ce_loss(model)
    G = loop_grads(loss, params, train).double()
    eye = torch.eye(G.shape[1], dtype=dtype)
    query = (train[0][:2], train[1][:2])
    for method in METHODS:
        ih = method(loss, params, train, model=model, damping=0.2, curvature="empirical_fisher", **kw)
        assert not ih.blocks and {v[0] for v in ih.info["blocks"].values()} == {"diagonal"}
        torch.testing.assert_close(ih(eye).double(), torch.diag(1 / ((G * G).mean(0) + 0.2)), **tol(dtype))
        torch.testing.assert_close(
            ifunc.attribute(loss, params, ih, train, query),
            reference_scores(loss, params, ih, train, query),
            **tol(dtype),
        )
        torch.testing.assert_close(
            ifunc.self_influence(loss, params, ih, train, per_module=True).sum(0),
            reference_scores(loss, params, ih, train, train).diag(),
            **tol(dtype),
        )
    ggn = ifunc.ihvp_kfac(loss, params, train, model=model, damping=0.2, **kw)  # the GGN diagonal (default curvature)
    torch.testing.assert_close(ggn(eye), torch.diag(1 / (ifunc.ggn(loss, params, train).diag() + 0.2)), **tol(dtype))
    ih = ifunc.ihvp_identity(params, model=model, damping=2.0, **kw)
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ih, train, query), (G[:2] @ G.T / 2).to(dtype), **tol(dtype)
    )
    assert ifunc.fit_kronecker_factors(loss, params, train, model=model, **kw).layers == ()


# ---------------------------------------------------------------- damping beyond float32's range


@pytest.mark.parametrize("method", [*METHODS, "identity"])
def test_float32_damping_beyond_the_range_gives_v_over_lambda(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).float().eval()
    params, loss = ifunc.params_of(model), ce_loss(model)
    train = data((3,), dtype=torch.float32)
    if method == "identity":
        ih = ifunc.ihvp_identity(params, model=model, damping=1e39)
    else:
        ih = method(loss, params, train, model=model, damping=1.0).with_damping(1e39)
    v = torch.randn(2, ih.dim, generator=torch.Generator().manual_seed(1))
    out = ih(v.float())
    assert out.dtype == torch.float32 and bool((out != 0).all())
    torch.testing.assert_close(out.double() * 1e39, v, rtol=1e-4, atol=1e-5)
    G = loop_grads(loss, params, train).double()
    query = (train[0][:2], train[1][:2])
    scores = ifunc.attribute(loss, params, ih, train, query).double() * 1e39
    torch.testing.assert_close(scores, G[:2] @ G.T, rtol=1e-3, atol=1e-4)
    self_terms = ifunc.self_influence(loss, params, ih, train).double() * 1e39
    torch.testing.assert_close(self_terms, (G * G).sum(1), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- chunk_size


@pytest.mark.parametrize("chunk_size", [-1, 0, 2.5, True])
def test_bad_chunk_size_is_refused_on_every_kronecker_path(chunk_size):
    model, params, loss, train = _reused("plain", torch.float64)
    match = "chunk_size"
    with pytest.raises((ValueError, TypeError), match=match):
        ifunc.fit_kronecker_factors(loss, params, train, model=model, chunk_size=chunk_size)
    for method in METHODS:
        with pytest.raises((ValueError, TypeError), match=match):
            method(loss, params, train, model=model, chunk_size=chunk_size)
    ih = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        ifunc.attribute(loss, params, ih, train, train, chunk_size=chunk_size)
    with pytest.raises((ValueError, TypeError), match=match):
        ifunc.attribute(loss, params, ih, train, train, chunk_size=chunk_size, per_token=True)
    with pytest.raises((ValueError, TypeError), match=match):
        ifunc.self_influence(loss, params, ih, train, chunk_size=chunk_size)
