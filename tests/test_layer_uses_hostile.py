"""Layer capture checked in combination: probes without evidence, every callable, reordered examples, one-example
batches, in-place activations, sequence-first per-token uses and the tolerance of the weight-use check.

References: per-example gradients computed one example at a time (any model, sequence-first included), the dense
diagonal of the empirical Fisher from them, and the scores ``G_q · ihvp(G_train)ᵀ`` of the same closure.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc.ihvp.kronecker.capture import ExampleMixError, LayerCaptureError, WeightUseError, layer_capture
from ifunc.ihvp.kronecker.layers import find_layers

DTYPES = [torch.float32, torch.float64]
FITS = [ifunc.ihvp_ekfac, ifunc.ihvp_kfac, ifunc.ihvp_diagonal, ifunc.fit_kronecker_factors]


def tol(dtype):
    return {"rtol": 2e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


def loop_grads(loss, params, data) -> torch.Tensor:
    """Per-example flat gradients ``[n, d]`` of a tuple batch, one example at a time."""
    rows = []
    for i in range(data[0].shape[0]):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss(p, tuple(t[i : i + 1] for t in data)), list(p.values()), allow_unused=True)
        rows.append(
            ifunc.flatten({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(p.items(), grads)})[0]
        )
    return torch.stack(rows)


def reference_scores(loss, params, ih, train, query, measurement=None):
    return loop_grads(measurement or loss, params, query) @ ih(loop_grads(loss, params, train)).T


def ce(model):
    return lambda p, b: F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")


def data(shape, n=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


class Reused(nn.Module):
    """``[b, 4] -> [b, 3]``; with ``reuse`` the weight of ``fc`` is also read functionally (a second use)."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.reuse, self.fc, self.out = reuse, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + F.linear(x, self.fc.weight) if self.reuse else h)


def _reused(reuse, dtype):
    torch.manual_seed(0)
    return Reused(reuse).to(dtype).eval()


# ---------------------------------------------------------------- no evidence on the first examples


def masked_ce(model):
    """Cross-entropy weighted per example by ``mask`` (0: the example carries no loss, like a fully padded one)."""
    return lambda p, b: (F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="none") * b[2]).sum()


def padded_first(dtype, n=6, empty=2):
    x, y = data((4,), n=n, dtype=dtype)
    mask = torch.ones(n, dtype=dtype)
    mask[:empty] = 0
    return x, y, mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_second_use_is_refused_when_the_first_examples_carry_no_loss(dtype):
    model = _reused(True, dtype)
    params, loss, train = ifunc.params_of(model), masked_ce(model), padded_first(dtype)
    for data_ in (train, DataLoader(TensorDataset(*train), batch_size=1)):
        for fit in FITS:
            with pytest.raises(WeightUseError, match=r"'fc.weight' is not the sum over the calls of 'fc'"):
                fit(loss, params, data_, model=model, curvature="empirical_fisher")
    ih = ifunc.ihvp_identity(params, model=model)
    with pytest.raises(WeightUseError, match="'fc.weight'"):
        ifunc.attribute(loss, params, ih, train, train)
    with pytest.raises(WeightUseError, match="'fc.weight'"):
        ifunc.self_influence(loss, params, ih, train)
    with pytest.raises(WeightUseError, match="'fc.weight'"):
        ifunc.capture_layer_grads(loss, params, train, model=model)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_first_seen_without_a_gradient_are_checked_and_exact(dtype):
    model = _reused(False, dtype)
    params, loss, train = ifunc.params_of(model), masked_ce(model), padded_first(dtype, empty=4)
    G = loop_grads(loss, params, train).double()
    ih = ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.3, curvature="empirical_fisher", chunk_size=2)
    assert all(not c.pending for c in ih.probe.values())  # verified on the first chunk with a gradient
    torch.testing.assert_close(
        ih(torch.eye(ih.dim, dtype=dtype)).double(), torch.diag(1 / ((G * G).mean(0) + 0.3)), **tol(dtype)
    )
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ih, train, train), reference_scores(loss, params, ih, train, train), **tol(dtype)
    )


# ---------------------------------------------------------------- every callable is checked


def functional_measurement(model):
    """The true-class logit minus a term that reads ``out.weight`` functionally (outside ``out``'s calls)."""

    def f(p, b):
        logit = ifunc.call(model, p, b[0]).gather(1, b[1][:, None]).sum()
        return logit - 0.5 * (F.linear(torch.tanh(b[0]), p["out.weight"]) ** 2).sum()

    return f


@pytest.mark.parametrize("dtype", DTYPES)
def test_measurements_and_train_losses_are_each_checked(dtype):
    model = _reused(False, dtype)
    params, loss, train = ifunc.params_of(model), ce(model), data((4,), dtype=dtype)
    bad = functional_measurement(model)
    fitted = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.3)
    for ih in (fitted, ifunc.ihvp_identity(params, model=model)):
        with pytest.raises(WeightUseError, match="'out.weight'"):
            ifunc.attribute(loss, params, ih, train, train, measurement=bad)
        with pytest.raises(WeightUseError, match="'out.weight'"):  # a train loss other than the fit's
            ifunc.attribute(bad, params, ih, train, train, measurement=loss)
        with pytest.raises(WeightUseError, match="'out.weight'"):
            ifunc.self_influence(bad, params, ih, train)
    good = lambda p, b: ifunc.call(model, p, b[0]).gather(1, b[1][:, None]).sum()  # noqa: E731
    scores = ifunc.attribute(loss, params, fitted, train, train, measurement=good)
    torch.testing.assert_close(scores, reference_scores(loss, params, fitted, train, train, good), **tol(dtype))
    assert {id(loss), id(good)} <= set(fitted.probe)  # each callable checked once, kept by the closure


# ---------------------------------------------------------------- rows that are not the examples


class Sorting(nn.Module):
    """Sorts the batch by the first feature, applies ``l``, restores the order (length bucketing)."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        order = x[:, 0].argsort()
        return self.h(torch.tanh(self.l(x[order]))[order.argsort()])


class Mixing(nn.Module):
    """Subtracts the batch mean before ``l``: the examples interact."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.l(x - 0.5 * x.mean(0, keepdim=True))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("build", [Sorting, Mixing])
def test_models_that_reorder_or_mix_examples_are_refused(build, dtype):
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    params, loss = ifunc.params_of(model), ce(model)
    x, y = data((3,), dtype=dtype)
    x[0, 0], x[1, 0] = 2.0, -2.0  # the first two examples are out of order
    # a model that mixes the examples is no sum over them: the fits refuse its loss first (check_summed)
    error, message = (ExampleMixError, r"'l'.*reorders the examples") if build is Sorting else (ValueError, "couples")
    for fit in FITS:
        with pytest.raises(error, match=message):
            fit(loss, params, (x, y), model=model)
    error, message = (
        (ExampleMixError, r"'l'.*or lets them interact.*modules=") if build is Sorting else (error, message)
    )
    with pytest.raises(error, match=message):  # a mixing model's measurement is refused first, as its loss is
        ifunc.attribute(loss, params, ifunc.ihvp_identity(params, model=model), (x, y), (x, y))
    if build is Mixing:
        return
    keep = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.3, modules=["h"])  # the fix: l left out
    assert keep.info["blocks"]["l.weight"] == ("diagonal", "l")
    torch.testing.assert_close(
        ifunc.attribute(loss, params, keep, (x, y), (x, y)),
        reference_scores(loss, params, keep, (x, y), (x, y)),
        **tol(dtype),
    )


# ---------------------------------------------------------------- one example per batch


class SeqFirst(nn.Module):
    """``[b, T, 3] -> [b, 3]`` run sequence-first ``[T, b, ·]``."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.l(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_example_batches_decide_the_example_dimension_on_two(dtype):
    torch.manual_seed(0)
    model = SeqFirst().to(dtype).eval()
    params, loss = ifunc.params_of(model), ce(model)
    one = (torch.randn(1, 1, 3).to(dtype), torch.tensor([1]))
    four = (torch.randn(4, 4, 3).to(dtype), torch.randint(0, 3, (4,)))
    x, y = torch.randn(6, 4, 3).to(dtype), torch.randint(0, 3, (6,))
    G = loop_grads(loss, params, (x, y)).double()
    for train in ([(x[:1], y[:1]), (x[1:], y[1:])], DataLoader(TensorDataset(x, y), batch_size=1)):
        ih = ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.3, curvature="empirical_fisher")
        assert [b.spec.batch_dim for b in ih.blocks] == [1, 0]  # l sequence-first, h on the pooled [b, 4]
        torch.testing.assert_close(
            ih(torch.eye(ih.dim, dtype=dtype)).double(), torch.diag(1 / ((G * G).mean(0) + 0.3)), **tol(dtype)
        )
    ih = ifunc.ihvp_diagonal(loss, params, one, model=model, damping=0.3, curvature="empirical_fisher")
    assert [b.spec.batch_dim for b in ih.blocks] == [None, None]  # one example anywhere: undecided until two
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ih, four, four), reference_scores(loss, params, ih, four, four), **tol(dtype)
    )
    assert [[s.batch_dim for s in c.layers] for c in ih.probe.values()] == [[1, 0]]
    ident = ifunc.ihvp_identity(params, model=model)  # probed on a one-example query, then a train batch of four
    torch.testing.assert_close(
        ifunc.attribute(loss, params, ident, four, one), reference_scores(loss, params, ident, four, one), **tol(dtype)
    )


# ---------------------------------------------------------------- outputs modified in place


def inplace_models(dtype):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).to(dtype).eval()
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 3)).to(dtype).eval()
    return [(lin, data((4,), n=8, dtype=dtype)), (conv, data((2, 5, 5), n=8, dtype=dtype))]


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_modified_in_place_are_captured_before_the_change(dtype):
    for model, train in inplace_models(dtype):
        params, loss = ifunc.params_of(model), ce(model)
        G = loop_grads(loss, params, train).double()
        ih = ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.3, curvature="empirical_fisher")
        assert [b.spec.copy_output for b in ih.blocks] == [True, False]
        torch.testing.assert_close(
            ih(torch.eye(ih.dim, dtype=dtype)).double(), torch.diag(1 / ((G * G).mean(0) + 0.3)), **tol(dtype)
        )
        ek = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.3)
        torch.testing.assert_close(
            ifunc.attribute(loss, params, ek, train, train),
            reference_scores(loss, params, ek, train, train),
            **tol(dtype),
        )
        layers, _ = find_layers(model, params)  # not probed: the in-place change is refused, naming the fix
        with pytest.raises(LayerCaptureError, match=r"modified in place .*inplace=False"):
            with layer_capture(model, layers, examples=8) as rec, torch.enable_grad():
                ifunc.call(model, {k: v.requires_grad_() for k, v in ifunc.params_of(model).items()}, train[0])
            rec.check()


# ---------------------------------------------------------------- per-token uses that are sequence-first


class SeqFirstNorm(nn.Module):
    """``[b, T, 3] -> [b, 3]``: a Linear and a LayerNorm run sequence-first, pooled over positions."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.h = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        z = self.norm(torch.tanh(self.inp(x.transpose(0, 1))))
        self.seen.append(tuple(z.shape))
        return self.h(z.mean(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 6])
def test_per_token_refuses_sequence_first_diagonal_uses_without_changing_the_forward(T, dtype):
    torch.manual_seed(0)
    model = SeqFirstNorm().to(dtype).eval()
    params, loss = ifunc.params_of(model), ce(model)
    train, query = data((T, 3), dtype=dtype), data((T, 3), n=2, seed=1, dtype=dtype)
    ih = ifunc.ihvp_identity(params, model=model)
    with pytest.raises(ValueError, match=r"'norm'.*batch-first modules.*exclude=\['norm.bias', 'norm.weight'\]"):
        ifunc.attribute(loss, params, ih, train, query, per_token=True)
    assert all(s[0] == T and s[2] == 8 for s in model.seen)  # no hook widened the LayerNorm's output
    kept = ifunc.ihvp_identity(params, model=model, exclude=["norm", "h"])  # (h sees pooled vectors: no tokens)
    tokens = ifunc.attribute(loss, params, kept, train, query, per_token=True)
    torch.testing.assert_close(tokens.sum(-1), reference_scores(loss, params, kept, train, query), **tol(dtype))


# ---------------------------------------------------------------- the tolerance of the weight-use check


class Cancelling(nn.Module):
    """A Linear at 64 positions whose output is centred over positions (the terms ``g_t a_tᵀ`` cancel), its weight
    also read functionally with a small coefficient ``eps``."""

    def __init__(self, eps):
        super().__init__()
        self.fc, self.h, self.eps = nn.Linear(4, 4, bias=False), nn.Linear(4, 3), eps

    def forward(self, x):
        z = self.fc(x)
        z = z - z.mean(1, keepdim=True) + self.eps * F.linear(x[:, :1], self.fc.weight)
        return self.h(torch.tanh(z).sum(1))


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 3e-7), (torch.float64, 1e-11)])
def test_a_small_second_use_is_refused_when_the_terms_cancel(dtype, eps):
    torch.manual_seed(0)
    x = (torch.randn(8, 1, 4) * 3 + 0.05 * torch.randn(8, 64, 4)).to(dtype)
    train = (x, torch.randint(0, 3, (8,)))
    model = Cancelling(eps).to(dtype).eval()
    params, loss = ifunc.params_of(model), ce(model)
    with pytest.raises(WeightUseError, match="'fc.weight'"):
        ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.1)
    model.eps = 0.0  # the same model without the second use is accepted
    ifunc.ihvp_diagonal(loss, params, train, model=model, damping=0.1)


def test_large_float32_layers_are_not_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)).eval()
    params = ifunc.params_of(model)
    x, y = torch.randn(2, 1024, 256) * 1e3 + 1e3, torch.randint(0, 3, (2, 1024))

    def loss(p, b):
        return F.cross_entropy(ifunc.call(model, p, b[0]).reshape(-1, 3), b[1].reshape(-1), reduction="sum")

    ifunc.capture_layer_grads(loss, params, (x, y), model=model)
