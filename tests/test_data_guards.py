"""The guards where data enters: ordered sources, summed losses, deterministic forwards, the global RNG, chunk sizes.

Each case is a way a user could silently change the rankings or the global RNG; each test asserts the named
error, or the exact answer against the same examples passed as one in-memory batch.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import ifunc
from ifunc._data import DataSource
from ifunc.testing import mlp_problem

SHUFFLES = r"the DataLoader shuffles: .*shuffle=False.*or the data set itself"


class Reversed(Sampler):
    """A fixed order that is not the data set's: accepted (column i is the i-th example it yields)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


class GlobalShuffle(Reversed):
    """Shuffles with the global RNG."""

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())


class OwnShuffle(Reversed):
    """Shuffles with a generator of its own (seeded, but advancing on every pass)."""

    def __init__(self, n):
        super().__init__(n)
        self.gen = torch.Generator().manual_seed(0)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.gen).tolist())


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def _problem(n=8):
    model, params, loss, (x, y) = mlp_problem(seed=0, n=n)
    return model, params, loss, x, y


def _random_loaders(ds):
    n = len(ds)
    return {
        "shuffle": DataLoader(ds, batch_size=3, shuffle=True),
        "seeded-random": DataLoader(ds, batch_size=3, sampler=RandomSampler(ds, generator=torch.Generator())),
        "subset-random": DataLoader(ds, batch_size=3, sampler=SubsetRandomSampler(range(n))),
        "weighted-random": DataLoader(ds, batch_size=3, sampler=WeightedRandomSampler([1.0] * n, n)),
        "batch-sampler": DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 3, drop_last=False)),
        "custom-global": DataLoader(ds, batch_size=3, sampler=GlobalShuffle(n)),
        "custom-own": DataLoader(ds, batch_size=3, sampler=OwnShuffle(n)),
        "custom-batches": DataLoader(ds, batch_sampler=BatchSampler(GlobalShuffle(n), 3, drop_last=False)),
    }


@pytest.mark.parametrize("kind", list(_random_loaders(range(4))))
def test_every_shuffling_sampler_is_refused_without_touching_an_rng(kind):
    model, params, loss, x, y = _problem()
    loader = _random_loaders(TensorDataset(x, y))[kind]
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    own = getattr(sampler, "generator", None) or getattr(sampler, "gen", None)
    before, own_before = torch.get_rng_state(), own.get_state() if own is not None else None
    with pytest.raises(ValueError, match="train: " + SHUFFLES):
        ifunc.attribute(loss, params, ifunc.ihvp_identity(params), loader, (x, y))
    assert torch.equal(torch.get_rng_state(), before)
    if kind == "seeded-random":  # refused by type, without drawing from its generator
        assert own is not None and torch.equal(own.get_state(), own_before)


def _entry_points(model, params, loss, x, y):
    ident = ifunc.ihvp_identity(params)
    ek = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    fisher = ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical")
    return {
        "attribute-train-generic": lambda d, tmp: ifunc.attribute(loss, params, ident, d, (x, y)),
        "attribute-train-kronecker": lambda d, tmp: ifunc.attribute(loss, params, ek, d, (x, y)),
        "attribute-query-generic": lambda d, tmp: ifunc.attribute(loss, params, ident, (x, y), d),
        "attribute-query-kronecker": lambda d, tmp: ifunc.attribute(loss, params, ek, (x, y), d),
        "store": lambda d, tmp: ifunc.attribute(loss, params, ek, d, (x, y), out=tmp / "s.h5"),
        "self-influence": lambda d, tmp: ifunc.self_influence(loss, params, ident, d),
        "per-sample-grads": lambda d, tmp: ifunc.per_sample_grads(loss, params, d),
        "fisher-ekfac": lambda d, tmp: ifunc.ihvp_ekfac(
            loss, params, d, model=model, curvature="fisher", sample="categorical", damping=0.1
        ),
        "fisher-cg": lambda d, tmp: ifunc.ihvp_cg(fisher, params, d, curvature="fisher", damping=0.1),
        "fisher-datainf": lambda d, tmp: ifunc.ihvp_datainf(fisher, params, d, curvature="fisher", damping=0.1),
    }


def test_every_ordered_entry_point_refuses_a_shuffled_loader_and_accepts_a_fixed_order(tmp_path):
    model, params, loss, x, y = _problem()
    ds = TensorDataset(x, y)
    calls = _entry_points(model, params, loss, x, y)
    random_sampler = DataLoader(ds, batch_size=3, sampler=GlobalShuffle(len(ds)))
    for name, call in calls.items():
        before = torch.get_rng_state()
        with pytest.raises(ValueError, match=SHUFFLES):
            call(random_sampler, tmp_path)
        assert torch.equal(torch.get_rng_state(), before), name
    DataSource(DataLoader(ds, batch_size=None), ordered=True)  # no automatic batching: the sampler itself
    with pytest.raises(ValueError, match=SHUFFLES):
        DataSource(DataLoader(ds, batch_size=None, shuffle=True), ordered=True)
    # fixed orders: the data set's own (explicit sampler, under a BatchSampler, a stream) or a custom
    # deterministic one, whose columns are the examples in the order it yields them
    fixed = {
        "sequential": (DataLoader(ds, batch_size=3, sampler=SequentialSampler(ds)), slice(None)),
        "batch-sequential": (DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 5, False)), slice(None)),
        "iterable": (DataLoader(Stream(x, y), batch_size=3), slice(None)),
        "reversed": (DataLoader(ds, batch_size=3, sampler=Reversed(len(ds))), torch.arange(len(ds) - 1, -1, -1)),
    }
    ek = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    reference = ifunc.attribute(loss, params, ek, (x, y), (x, y))
    for name, (loader, order) in fixed.items():
        scores = ifunc.attribute(loss, params, ek, loader, loader)
        torch.testing.assert_close(scores, reference[order][:, order], msg=name)


def test_a_summed_loss_passes_and_a_shuffled_loader_is_fine_where_order_does_not_matter():
    """The curvature of the mean loss does not depend on the order: ihvp_cg takes a shuffling loader."""
    model, params, loss, x, y = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    v = torch.randn(ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    got = ifunc.ihvp_cg(loss, params, loader, damping=0.1, tol=1e-12)(v)
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(got, ifunc.ihvp_cg(loss, params, (x, y), damping=0.1, tol=1e-12)(v))


# --- the loss must be a sum over examples -------------------------------------------------------------------


def _mean(model):
    return lambda p, b: F.cross_entropy(ifunc.call(model, p, b[0]), b[1])  # reduction="mean"


MEAN = r"looks mean-reduced.*reduction='sum'"


@pytest.mark.parametrize("path", ["cg", "ekfac", "per-sample", "attribute-measurement"])
@pytest.mark.parametrize("layout", ["batch-size-1", "first-batch-of-one"])
def test_a_mean_loss_is_refused_whatever_the_batch_layout(path, layout):
    model, params, loss, x, y = _problem()
    data = (
        DataLoader(TensorDataset(x, y), batch_size=1) if layout == "batch-size-1" else [(x[:1], y[:1]), (x[1:], y[1:])]
    )
    mean = _mean(model)
    run = {
        "cg": lambda: ifunc.ihvp_cg(mean, params, data, damping=0.1),
        "ekfac": lambda: ifunc.ihvp_ekfac(mean, params, data, model=model, damping=0.1),
        "per-sample": lambda: ifunc.per_sample_grads(mean, params, data, chunk_size=1),
        "attribute-measurement": lambda: ifunc.attribute(
            loss, params, ifunc.ihvp_identity(params), (x, y), data, measurement=mean, chunk_size=1
        ),
    }[path]
    with pytest.raises(ValueError, match=MEAN):
        run()


class TokenLM(nn.Module):
    """``input_ids [b, T]`` (+ ``attention_mask``) -> an object with ``.logits [b, T, V]`` and a Hugging Face-style
    ``.loss``: the mean next-token loss over the real tokens of the batch."""

    def __init__(self, vocab=7, width=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        token = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        mask = attention_mask[:, 1:].to(token.dtype)
        return {"logits": logits, "loss": (token * mask).sum() / mask.sum()}


def _tokens(dtype):
    torch.manual_seed(0)
    model = TokenLM().to(dtype).eval()
    ids = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(6) < torch.tensor([6, 3, 5, 4])[:, None]).long()  # right padding, unequal lengths
    return model, ifunc.params_of(model), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_mean_over_padded_tokens_is_refused_and_the_token_sum_passes(dtype):
    model, params, batch = _tokens(dtype)
    hf_loss = lambda p, b: ifunc.call(model, p, b["input_ids"], b["attention_mask"])["loss"]  # noqa: E731
    summed = ifunc.language.causal_lm_loss(
        lambda p, b: ifunc.call(model, p, b["input_ids"], b["attention_mask"])["logits"]
    )
    with pytest.raises(ValueError, match=MEAN + ".*mean over the real tokens"):
        ifunc.ihvp_cg(hf_loss, params, batch, damping=0.1)
    with pytest.raises(ValueError, match=MEAN):
        ifunc.ihvp_ekfac(hf_loss, params, batch, model=model, damping=0.1)
    with pytest.raises(ValueError, match=r"measurement\(params, batch\) looks mean-reduced"):
        ek = ifunc.ihvp_ekfac(summed, params, batch, model=model, damping=0.1)
        ifunc.attribute(summed, params, ek, batch, batch, measurement=hf_loss)
    with pytest.raises(ValueError, match=r"^loss\(params, batch\) looks mean-reduced") as error:  # no measurement:
        ident = ifunc.ihvp_identity(params, model=model)  # the loss is named as the callable the user passed
        ifunc.attribute(hf_loss, params, ident, batch, batch)
    assert "measurement" not in str(error.value).split(";")[0]
    G = ifunc.per_sample_grads(summed, params, batch)
    assert G.shape[0] == 4 and G.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_false_alarm_from_rounding_for_terms_of_very_different_size(dtype):
    """float32 sums of a huge and a tiny term, and of nearly cancelling terms, are additive up to rounding."""
    model, params, _, (x, _) = mlp_problem(seed=3, n=6, sizes=(3, 8, 2), task="regression", dtype=dtype)
    x = x * torch.tensor([1e3, 1e-3, 1.0, 1e3, 1e-3, 1.0], dtype=dtype)[:, None]
    y = torch.tensor([[1e4, -1e4], [1e-3, 0.0], [1.0, 2.0]] * 2, dtype=dtype)
    squared = lambda p, b: 0.5 * ((ifunc.call(model, p, b[0]) - b[1]) ** 2).sum()  # noqa: E731
    signed = lambda p, b: (ifunc.call(model, p, b[0]) - b[1]).sum()  # noqa: E731  terms of both signs
    for loss in (squared, signed):
        for data in ((x, y), (x.flip(0), y.flip(0)), DataLoader(TensorDataset(x, y), batch_size=1)):
            ifunc.grads.check_summed(loss, params, data)
    assert ifunc.per_sample_grads(squared, params, DataLoader(TensorDataset(x, y), batch_size=1)).dtype == dtype
    with pytest.raises(ValueError, match=MEAN):
        ifunc.grads.check_summed(lambda p, b: squared(p, b) / len(b[0]), params, (x, y))


# --- the forward must not draw random numbers ---------------------------------------------------------------


class FunctionalDropout(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4, dtype=dtype), nn.Linear(4, 2, dtype=dtype)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), p=0.5, training=self.training))


class AttentionDropout(nn.Module):
    """Like Llama's attention: a float ``attention_dropout`` used only in train mode, no Dropout module."""

    def __init__(self, dtype):
        super().__init__()
        self.attention_dropout = 0.1
        self.qkv, self.out = nn.Linear(3, 9, dtype=dtype), nn.Linear(3, 2, dtype=dtype)

    def forward(self, x):
        q, k, v = self.qkv(x[:, None, :]).split(3, dim=-1)
        p = self.attention_dropout if self.training else 0.0
        return self.out(F.scaled_dot_product_attention(q, k, v, dropout_p=p)[:, 0])


RANDOM = r"ifunc.call: the forward pass of \w+ drew random numbers from the global RNG.*model.eval\(\)"


@pytest.mark.parametrize("kind", [FunctionalDropout, AttentionDropout])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_random_forward_is_refused_and_the_global_rng_is_restored(kind, dtype):
    model = kind(dtype).train()
    params = ifunc.params_of(model)
    x = torch.randn(6, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    loss = lambda p, b: F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")  # noqa: E731
    runs = {
        "ihvp_cg": lambda: ifunc.ihvp_cg(loss, params, (x, y), damping=0.1),
        "attribute": lambda: ifunc.attribute(loss, params, ifunc.ihvp_identity(params), (x, y), (x, y)),
        "ihvp_ekfac": lambda: ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1),
    }
    for name, run in runs.items():
        before = torch.get_rng_state()
        with pytest.raises(ValueError, match=RANDOM):
            run()
        assert torch.equal(torch.get_rng_state(), before), name
    model.eval()  # the fix: deterministic, and the same answers twice
    eye = torch.eye(ifunc.flatten(params)[0].numel(), dtype=dtype)
    one = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1).solve(eye)
    two = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1).solve(eye)
    assert torch.equal(one, two)


def test_call_under_torch_func_transforms_equals_the_plain_call():
    model, params, loss, x, y = _problem()
    flat, unflatten = ifunc.flatten(params)
    one = lambda f, xi, yi: loss(unflatten(f), (xi[None], yi[None]))  # noqa: E731
    G = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(flat, x, y)
    torch.testing.assert_close(G, ifunc.per_sample_grads(loss, params, (x, y)))
    value, slope = torch.func.jvp(lambda f: loss(unflatten(f), (x, y)), (flat,), (torch.ones_like(flat),))
    torch.testing.assert_close(value, loss(params, (x, y)))
    torch.testing.assert_close(slope, torch.func.grad(lambda f: loss(unflatten(f), (x, y)))(flat).sum())
    train_mode = FunctionalDropout(torch.float64).train()
    tp = ifunc.params_of(train_mode)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="randomness"):  # vmap refuses the random op itself, drawing nothing
        torch.func.vmap(lambda xi: ifunc.call(train_mode, tp, xi[None]))(x)
    assert torch.equal(torch.get_rng_state(), before)


# --- iterating a DataLoader leaves the global RNG alone -----------------------------------------------------


def test_attribute_and_ekfac_over_a_dataloader_leave_the_global_rng_unchanged():
    model, params, loss, x, y = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    before = torch.get_rng_state()
    ek = ifunc.ihvp_ekfac(loss, params, loader, model=model, damping=0.1)
    scores = ifunc.attribute(loss, params, ek, loader, loader, chunk_size=2)
    generic = ifunc.attribute(loss, params, ifunc.ihvp_cg(loss, params, loader, damping=0.1), loader, loader)
    assert torch.equal(torch.get_rng_state(), before)
    ref_ek = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    torch.testing.assert_close(scores, ifunc.attribute(loss, params, ref_ek, (x, y), (x, y)))
    ref_cg = ifunc.ihvp_cg(loss, params, (x, y), damping=0.1)
    torch.testing.assert_close(generic, ifunc.attribute(loss, params, ref_cg, (x, y), (x, y)))


class Augmented(Dataset):
    """Draws from the global RNG in ``__getitem__`` (an augmentation), and reports the worker's seed."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return torch.randn(2), torch.tensor(-1 if info is None else info.seed)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_pass_sees_the_same_data_and_workers_keep_distinct_seeds(workers):
    source = DataSource(DataLoader(Augmented(), batch_size=2, num_workers=workers))
    before = torch.get_rng_state()
    first = [b for b in source]
    second = [b for b in source]
    assert torch.equal(torch.get_rng_state(), before)
    for (a, sa), (b, sb) in zip(first, second):
        assert torch.equal(a, b) and torch.equal(sa, sb)
    if workers:
        seeds = {int(s[0]) for _, s in first}
        assert len(seeds) == workers  # batch i comes from worker i mod 2, each with its own seed
    else:
        assert not torch.equal(first[0][0], first[1][0])  # the draws still advance within a pass


# --- chunk sizes ----------------------------------------------------------------------------------------------

BAD_CHUNKS = [(-1, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)]


@pytest.mark.parametrize("value, error", BAD_CHUNKS)
def test_a_chunk_size_must_be_a_positive_int_everywhere(value, error):
    model, params, loss, x, y = _problem()
    data = DataLoader(TensorDataset(x, y), batch_size=3)
    cg = ifunc.ihvp_cg(loss, params, (x, y), damping=0.1)
    ek = ifunc.ihvp_ekfac(loss, params, (x, y), model=model, damping=0.1)
    runs = {
        "attribute-cg": lambda: ifunc.attribute(loss, params, cg, data, data, chunk_size=value),
        "attribute-ekfac": lambda: ifunc.attribute(loss, params, ek, data, data, chunk_size=value),
        "self_influence-cg": lambda: ifunc.self_influence(loss, params, cg, data, chunk_size=value),
        "self_influence-ekfac": lambda: ifunc.self_influence(loss, params, ek, data, chunk_size=value),
        "ihvp_ekfac": lambda: ifunc.ihvp_ekfac(loss, params, data, model=model, damping=0.1, chunk_size=value),
        "per_sample_grads": lambda: ifunc.per_sample_grads(loss, params, data, chunk_size=value),
        "chunks": lambda: list(DataSource(data).chunks(value)),
    }
    for run in runs.values():  # the failing line of the traceback names the entry point
        with pytest.raises(error, match=rf"chunk_size must be a positive int, got .*{value!r}.*chunk_size=64"):
            run()
    with pytest.raises(error, match="chunk_size must be"):  # DataInf has no memory-budget default (its own rule)
        ifunc.ihvp_datainf(loss, params, data, damping=0.1, chunk_size=value)
    # numpy integers are whole numbers too
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(
        ifunc.attribute(loss, params, cg, data, data, chunk_size=np.int64(4)),
        ifunc.attribute(loss, params, cg, data, data, chunk_size=4),
    )


def test_a_loader_that_drops_its_last_examples_is_refused_where_columns_follow_the_data():
    from torch.utils.data import DataLoader, TensorDataset

    _, params, loss, (x, y) = mlp_problem(seed=0, sizes=(3, 4, 2), n=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    ihvp = ifunc.ihvp_identity(params, damping=1.0)
    with pytest.raises(ValueError, match="train: the DataLoader has drop_last=True.*drop_last=False"):
        ifunc.attribute(loss, params, ihvp, loader, (x[:2], y[:2]))
