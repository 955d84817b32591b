"""ifunc.evaluate: subsets, LDS, leave-one-out agreement and mislabel AUC against brute-force definitions, and the
retraining driver's resume (after an exception, and after SIGKILL in another process) and refusals."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc.evaluate import lds, loo_correlation, mislabel_auc, random_subsets, retrain
from ifunc.testing import mlp_problem

seeds = st.integers(0, 2**16)


# ---------------------------------------------------------------- brute-force references


def brute_ranks(values: list[float]) -> list[float]:
    """Average ranks from the definition: the number of smaller values plus half the other equal ones."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def brute_pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.corrcoef(a, b)[0, 1])


def brute_spearman(a, b) -> float:
    return brute_pearson(brute_ranks(list(a)), brute_ranks(list(b)))


def brute_auc(scores: list[float], flipped: list[bool]) -> float:
    pairs = [(s, t) for s, f in zip(scores, flipped) if f for t, g in zip(scores, flipped) if not g]
    return sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)


def integer_scores(seed: int, q: int, n: int, spread: int) -> torch.Tensor:
    """Small integer-valued float64 scores: sums are exact, so ties are real ties."""
    return torch.randint(-spread, spread + 1, (q, n), generator=torch.Generator().manual_seed(seed)).double()


# ---------------------------------------------------------------- random_subsets


@given(n=st.integers(1, 30), m=st.integers(1, 6), fraction=st.floats(0.05, 1.0), seed=seeds)
def test_random_subsets_size_determinism_and_draws(n, m, fraction, seed):
    k = round(fraction * n)
    if k < 1:
        with pytest.raises(ValueError, match="leaves the subsets empty"):
            random_subsets(n, m, fraction=fraction, generator=torch.Generator().manual_seed(seed))
        return
    state = torch.get_rng_state()
    masks = random_subsets(n, m, fraction=fraction, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert masks.dtype == torch.bool and masks.shape == (m, n)
    assert masks.sum(1).tolist() == [k] * m
    again = random_subsets(n, m, fraction=fraction, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(masks, again)
    gen = torch.Generator().manual_seed(seed)  # the documented draw: the first k of the s-th randperm
    for s in range(m):
        assert masks[s].nonzero().flatten().tolist() == sorted(torch.randperm(n, generator=gen)[:k].tolist())


def test_random_subsets_default_generator_is_seeded():
    assert torch.equal(random_subsets(20, 3), random_subsets(20, 3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 3), {}, ValueError, "n must be an int >= 1"),
        ((5, True), {}, TypeError, "m must be an int >= 1, got the bool"),
        ((5, 3), {"fraction": 0.0}, ValueError, r"fraction must be a number in \(0, 1\]"),
        ((5, 3), {"fraction": 1.5}, ValueError, r"fraction must be a number in \(0, 1\]"),
        ((5, 3), {"fraction": "half"}, ValueError, "fraction must be a number"),
        ((5, 3), {"generator": 1}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_random_subsets_refuses(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        random_subsets(*args, **kwargs)


# ---------------------------------------------------------------- lds


@given(seed=seeds, q=st.integers(1, 4), n=st.integers(2, 12), m=st.integers(3, 12), spread=st.integers(1, 3))
def test_lds_is_one_on_additive_outcomes_and_minus_one_on_the_wrong_sign(seed, q, n, m, spread):
    """Outcomes c_q − a_q Σ_{i∈S} scores[q, i] (a_q > 0), through an increasing map: LDS = 1 exactly where the
    predictions vary (ties included: integer scores tie often), NaN where they are constant; −1 with the sign
    flipped."""
    gen = torch.Generator().manual_seed(seed + 1)
    scores = integer_scores(seed, q, n, spread)
    masks = random_subsets(n, m, fraction=0.5, generator=gen)
    a, c = torch.rand(q, generator=gen) + 0.5, torch.randn(q, generator=gen)
    additive = c - a * (masks.double() @ scores.T)  # [m, q]
    varies = (masks.double() @ scores.T).std(0) > 0
    for outcomes in (additive, torch.exp(additive), additive**3):
        r = lds(scores, masks, outcomes)
        assert r.shape == (q,) and r.dtype == torch.float64
        assert torch.allclose(r[varies], torch.ones(int(varies.sum()), dtype=torch.float64), atol=1e-12)
        assert r[~varies].isnan().all()
    assert torch.allclose(lds(-scores, masks, additive)[varies], -torch.ones(int(varies.sum()), dtype=torch.float64))


@given(seed=seeds, q=st.integers(1, 3), n=st.integers(2, 10), m=st.integers(3, 10))
def test_lds_equals_the_brute_force_spearman_of_each_query(seed, q, n, m):
    gen = torch.Generator().manual_seed(seed)
    scores = integer_scores(seed, q, n, 2)
    masks = random_subsets(n, m, fraction=0.4, generator=gen)
    outcomes = torch.randint(0, 4, (m, q), generator=gen).double()  # ties in the outcomes too
    r = lds(scores, masks, outcomes)
    for j in range(q):
        predicted = [-sum(scores[j, i].item() for i in range(n) if masks[s, i]) for s in range(m)]
        measured = outcomes[:, j].tolist()
        varies = len(set(predicted)) > 1 and len(set(measured)) > 1
        expected = brute_spearman(predicted, measured) if varies else math.nan
        assert (math.isnan(expected) and math.isnan(r[j])) or abs(r[j].item() - expected) < 1e-12


def test_lds_accepts_float32_and_integer_outcomes():
    scores = integer_scores(0, 2, 6, 2).float()
    masks = random_subsets(6, 5, generator=torch.Generator().manual_seed(3))
    outcomes = (-(masks.double() @ scores.double().T)).long()
    assert torch.allclose(lds(scores, masks, outcomes), lds(scores.double(), masks, outcomes.double()))


_S, _M, _O = torch.zeros(2, 6), torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 2)


@pytest.mark.parametrize(
    "scores, subsets, outcomes, error, match",
    [
        (_S.numpy(), _M, _O, TypeError, r"scores must be a torch.Tensor \[q, n\]"),
        (_S[0], _M, _O, ValueError, r"scores must be \[q, n\], got shape \(6,\)"),
        (_S, _M.double(), _O, TypeError, r"subsets must be a bool mask \[m, n\]"),
        (_S, _M[:, :5], _O, ValueError, "subsets mark 5 training examples but scores has 6 columns"),
        (_S, _M[:2], _O[:2], ValueError, "at least 3"),
        (_S, _M, _O.T, ValueError, r"outcomes must be \[m=4, q=2\].*got \(2, 4\)"),
        (_S, _M, torch.zeros(2, 2), ValueError, r"got \(2, 2\)"),
        (_S, _M, _O.bool(), TypeError, "outcomes must hold real numbers"),
        (_S, _M, torch.tensor([[0.0, 1.0]] * 3 + [[math.nan, 0.0]]), ValueError, r"non-finite value at index \(3, 0\)"),
    ],
)
def test_lds_refuses(scores, subsets, outcomes, error, match):
    with pytest.raises(error, match=match):
        lds(scores, subsets, outcomes)


def test_lds_transposed_outcomes_get_a_hint():
    with pytest.raises(ValueError, match="transpose it"):
        lds(torch.zeros(2, 6), torch.ones(4, 6, dtype=torch.bool), torch.zeros(2, 4))


# ---------------------------------------------------------------- loo_correlation


@given(seed=seeds, q=st.integers(1, 3), n=st.integers(3, 10), scale=st.floats(1e-3, 1e3))
def test_loo_correlation_of_exact_changes_is_one_and_matches_brute_force(seed, q, n, scale):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(q, n, generator=gen)
    base = torch.randn(q, generator=gen)
    exact = base + scale * scores.T / n  # removing i changes f_q by scores[q, i] / n, up to one factor
    result = loo_correlation(scores, exact, base)
    assert torch.allclose(result.pearson, torch.ones(q, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(result.spearman, torch.ones(q, dtype=torch.float64))
    noisy = exact + torch.randn(n, q, generator=gen) * scale / n
    result = loo_correlation(scores, noisy, base)
    for j in range(q):
        change = (noisy[:, j] - base[j]).tolist()
        assert abs(result.pearson[j].item() - brute_pearson(scores[j].tolist(), change)) < 1e-9
        assert abs(result.spearman[j].item() - brute_spearman(scores[j].tolist(), change)) < 1e-9


def test_loo_correlation_on_some_examples_uses_their_columns():
    gen = torch.Generator().manual_seed(0)
    scores, base = torch.randn(2, 8, generator=gen), torch.randn(2, generator=gen)
    examples = torch.tensor([6, 1, 3, 4])
    loo = base + torch.randn(4, 2, generator=gen)
    part = loo_correlation(scores, loo, base, examples=examples)
    whole = loo_correlation(scores[:, examples], loo, base)
    assert torch.equal(part.pearson, whole.pearson) and torch.equal(part.spearman, whole.spearman)


@pytest.mark.parametrize(
    "loo, base, examples, error, match",
    [
        (torch.zeros(5, 2), torch.zeros(2), None, ValueError, r"loo_outcomes must be \[k=8, q=2\].*pass examples="),
        (torch.zeros(8, 2), torch.zeros(3), None, ValueError, r"base_outcome must be \[q=2\]"),
        (torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, 1]), ValueError, "leave out at least 3"),
        (torch.zeros(3, 2), torch.zeros(2), torch.tensor([0, 1, 8]), ValueError, r"examples must lie in 0 \.\. 7"),
        (torch.zeros(3, 2), torch.zeros(2), torch.tensor([0, 1, 1]), ValueError, "repeats an index"),
        (torch.zeros(3, 2), torch.zeros(2), torch.tensor([0.0, 1, 2]), TypeError, "integer indices"),
        (torch.zeros(3, 2), torch.zeros(2), torch.tensor([True, False, True]), TypeError, "integer indices"),
    ],
)
def test_loo_correlation_refuses(loo, base, examples, error, match):
    with pytest.raises(error, match=match):
        loo_correlation(torch.zeros(2, 8), loo, base, examples=examples)


# ---------------------------------------------------------------- mislabel_auc


@given(seed=seeds, n=st.integers(2, 30), spread=st.integers(0, 4))
def test_mislabel_auc_equals_the_pair_count(seed, n, spread):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, spread + 1, (n,), generator=gen).double()  # spread 0: all tied, AUC 0.5
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: 1 + seed % (n - 1)]] = True
    auc = mislabel_auc(scores, flipped)
    assert isinstance(auc, float)
    assert abs(auc - brute_auc(scores.tolist(), flipped.tolist())) < 1e-12
    assert abs(mislabel_auc(-scores, flipped) - (1 - auc)) < 1e-12  # reversed ranking, ties still half


def test_mislabel_auc_separation():
    flipped = torch.tensor([True, True, False, False, False])
    assert mislabel_auc(torch.tensor([9.0, 8, 1, 2, 3]), flipped) == 1.0
    assert mislabel_auc(torch.tensor([0.0, 0, 1, 2, 3]), flipped) == 0.0


@pytest.mark.parametrize(
    "scores, flipped, error, match",
    [
        (torch.zeros(4), torch.tensor([1, 0, 0, 1]), TypeError, "flipped must be a bool tensor"),
        (torch.zeros(4), torch.zeros(3, dtype=torch.bool), ValueError, "flipped has 3 entries but self_scores has 4"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.bool), ValueError, "needs both flipped and clean examples"),
        (torch.zeros(2, 2), torch.zeros(4, dtype=torch.bool), ValueError, r"self_scores must be \[n\]"),
        (torch.tensor([0.0, math.inf]), torch.tensor([True, False]), ValueError, "non-finite value at index"),
    ],
)
def test_mislabel_auc_refuses(scores, flipped, error, match):
    with pytest.raises(error, match=match):
        mislabel_auc(scores, flipped)


# ---------------------------------------------------------------- retrain

X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)).tolist()
Y = [a - 2 * b + c / 2 for a, b, c in X]
XQ = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)).tolist()
YQ = [a - 2 * b + c / 2 for a, b, c in XQ]


def fit(idx) -> list[float]:
    """A stand-in for training that is exact to the last bit in any process: the moment estimate
    ``w_j = mean_i x_ij y_i`` over the subset, summed exactly rounded (BLAS results may depend on memory alignment)."""
    rows = idx.tolist()
    return [math.fsum(X[i][j] * Y[i] for i in rows) / len(rows) for j in range(3)]


def query_errors(w: list[float]) -> torch.Tensor:
    return torch.tensor([(math.fsum(a * b for a, b in zip(x, w)) - y) ** 2 for x, y in zip(XQ, YQ)])


MASKS = random_subsets(12, 6, generator=torch.Generator().manual_seed(3))


class Counted:
    """:func:`fit` recording every call; raises at call number ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_at = fail_at

    def __call__(self, idx):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("stopped by the test")
        self.calls.append(idx.tolist())
        return fit(idx)


def test_retrain_calls_train_fn_on_each_subset_in_order():
    train = Counted()
    outcomes = retrain(train, query_errors, MASKS, progress=False)
    assert train.calls == [row.nonzero().flatten().tolist() for row in MASKS]
    expected = torch.stack([query_errors(fit(r.nonzero().flatten())) for r in MASKS])
    assert outcomes.dtype == torch.float64 and torch.equal(outcomes, expected)


@pytest.mark.parametrize("k", [0, 1, 4, 5])
def test_retrain_resumes_after_a_crash_and_redoes_only_the_rest(tmp_path, k):
    out = tmp_path / "outcomes.h5"
    reference = retrain(Counted(), query_errors, MASKS, progress=False)
    with pytest.raises(KeyboardInterrupt):
        retrain(Counted(fail_at=k + 1), query_errors, MASKS, out=out, progress=False)
    train = Counted()
    resumed = retrain(train, query_errors, MASKS, out=out, progress=False)
    assert train.calls == [row.nonzero().flatten().tolist() for row in MASKS[k:]]
    assert torch.equal(resumed, reference)
    finished = Counted()
    assert torch.equal(retrain(finished, query_errors, MASKS, out=out, progress=False), reference)
    assert finished.calls == []  # a finished file retrains nothing


WORKER = """
import json, math, os, signal, sys
import torch
from ifunc.evaluate import random_subsets, retrain

out, kill_after, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)).tolist()
y = [math.tanh(a + b - c) for a, b, c in x]
masks = random_subsets(12, 6, generator=torch.Generator().manual_seed(3))
calls = []

def fit(idx):  # exact in any process (see fit in the test file)
    return [math.fsum(x[i][j] * y[i] for i in idx.tolist()) / len(idx) for j in range(3)]

def train_fn(idx):
    if kill_after and len(calls) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-way through subset kill_after + 1
    calls.append(idx.tolist())
    with open(log, "a") as f:
        f.write(json.dumps(idx.tolist()) + "\\n")
    return fit(idx)

measure = lambda w: torch.tensor([(math.fsum(a * b for a, b in zip(x[k], w)) - y[k]) ** 2 for k in range(5)])
resumed = retrain(train_fn, measure, masks, out=out, progress=False)
fresh = retrain(fit, measure, masks, progress=False)
print(json.dumps({"resumed": resumed.tolist(), "fresh": fresh.tolist(), "masks": masks.tolist()}))
"""


def test_retrain_killed_by_sigkill_resumes_with_the_same_outcomes(tmp_path):
    script, out, log = tmp_path / "worker.py", tmp_path / "outcomes.h5", tmp_path / "calls.jsonl"
    script.write_text(WORKER)
    killed = subprocess.run([sys.executable, str(script), str(out), "2", str(log)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(log.read_text().splitlines()) == 2
    done = subprocess.run([sys.executable, str(script), str(out), "0", str(log)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    masks = torch.tensor(result["masks"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [row.nonzero().flatten().tolist() for row in masks]  # 2 before the kill, then only the other 4
    assert result["resumed"] == result["fresh"]  # bit for bit: the stored rows are float64


def test_retrain_refuses_other_subsets_before_retraining(tmp_path):
    out = tmp_path / "outcomes.h5"
    with pytest.raises(KeyboardInterrupt):
        retrain(Counted(fail_at=3), query_errors, MASKS, out=out, progress=False)
    train = Counted()
    other = random_subsets(12, 6, generator=torch.Generator().manual_seed(4))
    with pytest.raises(
        ValueError, match=r"retrain: .*outcomes\.h5 holds scores from a different run \(.*subsets: file"
    ):
        retrain(train, query_errors, other, out=out, progress=False)
    with pytest.raises(ValueError, match="n_subsets: file has 6, this call has 5"):
        retrain(train, query_errors, MASKS[:5], out=out, progress=False)
    assert train.calls == []
    assert retrain(Counted(), query_errors, MASKS, out=out, progress=False).shape == (6, 4)  # the file is intact


def shrinking(after: int, *, to=lambda e: e[:3]):
    """``query_errors``, changed by ``to`` from call number ``after + 1`` on."""
    calls = []

    def measure(w):
        calls.append(1)
        return query_errors(w) if len(calls) <= after else to(query_errors(w))

    return measure


def test_retrain_refuses_another_q_and_stores_nothing_for_it(tmp_path):
    out = tmp_path / "outcomes.h5"
    with pytest.raises(KeyboardInterrupt):
        retrain(Counted(fail_at=3), query_errors, MASKS, out=out, progress=False)
    with pytest.raises(ValueError, match=r"measure returned 3 outcomes for subset 2, but .* have q=4"):
        retrain(Counted(), shrinking(0), MASKS, out=out, progress=False)
    with pytest.raises(ValueError, match=r"returned 3 outcomes for subset 1, but .* have q=4"):  # in memory too
        retrain(Counted(), shrinking(1), MASKS, progress=False)
    train = Counted()
    retrain(train, query_errors, MASKS, out=out, progress=False)
    assert len(train.calls) == 4


def test_retrain_refuses_non_finite_outcomes_and_stores_nothing(tmp_path):
    out = tmp_path / "outcomes.h5"
    with pytest.raises(ValueError, match="non-finite outcome for subset 2.*Nothing was stored"):
        retrain(Counted(), shrinking(2, to=lambda e: e / 0), MASKS, out=out, progress=False)
    train = Counted()
    retrain(train, query_errors, MASKS, out=out, progress=False)
    assert len(train.calls) == 4


def test_retrain_retrains_only_a_damaged_row_and_names_it(tmp_path):
    """A row failing its CRC-32 (the subsets are checked at open, so only damage can cause it) is named in a warning,
    retrained and written again; the other rows are read, not retrained."""
    out = tmp_path / "outcomes.h5"
    reference = retrain(Counted(), query_errors, MASKS, out=out, progress=False)
    with h5py.File(out, "r") as f:
        offset = f["scores"].id.get_offset()
    with open(out, "r+b") as f:  # flip a byte of subset 1's first outcome (cells 4..7 of the one row)
        f.seek(offset + 4 * 8)
        byte = f.read(1)
        f.seek(offset + 4 * 8)
        f.write(bytes([byte[0] ^ 0xFF]))
    train = Counted()
    with pytest.warns(UserWarning, match=r"stored outcome of subset 1 .* is damaged .*retrained"):
        again = retrain(train, query_errors, MASKS, out=out, progress=False)
    assert train.calls == [MASKS[1].nonzero().flatten().tolist()] and torch.equal(again, reference)
    train = Counted()
    assert torch.equal(retrain(train, query_errors, MASKS, out=out, progress=False), reference)  # repaired
    assert train.calls == []


@pytest.mark.parametrize(
    "measure, match",
    [
        (lambda w: torch.zeros(2, 2), r"measure must return a real vector \[q\].*shape \(2, 2\) for subset 0"),
        (lambda w: torch.zeros(0), "no outcome for subset 0"),
        (lambda w: torch.tensor([1j]), r"real vector \[q\]"),
    ],
)
def test_retrain_refuses_bad_measurements(measure, match):
    with pytest.raises(ValueError, match=match):
        retrain(Counted(), measure, MASKS, progress=False)


def test_retrain_takes_per_query_correctness_as_zeros_and_ones():
    outcomes = retrain(Counted(), lambda w: query_errors(w) < 1.0, MASKS, progress=False)
    assert outcomes.dtype == torch.float64 and set(outcomes.unique().tolist()) <= {0.0, 1.0}


def test_lds_gives_identical_subsets_identical_predictions():
    """Two equal rows of the mask must tie in the predictions as their (additive) outcomes tie: exactly 1."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-1000, 1000, (3, 40), generator=gen).double()  # integers: every sum exact
    masks = random_subsets(40, 12, generator=gen)
    masks = torch.cat([masks, masks[:4]])  # four subsets drawn twice
    outcomes = -(masks.double() @ scores.T)
    assert torch.equal(lds(scores, masks, outcomes), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("fraction", [np.float32(0.5), torch.tensor(0.5), 0.5])
def test_random_subsets_takes_any_real_scalar_as_fraction(fraction):
    masks = random_subsets(10, 3, fraction=fraction, generator=torch.Generator().manual_seed(0))
    assert masks.sum(dim=1).tolist() == [5, 5, 5]


def test_retrain_takes_a_number_as_one_outcome():
    outcomes = retrain(Counted(), lambda w: float(query_errors(w).sum()), MASKS, progress=False)
    assert outcomes.shape == (6, 1)


def test_retrain_refuses_bad_arguments_before_training(tmp_path):
    train = Counted()
    with pytest.raises(TypeError, match=r"subsets must be a bool mask \[m, n\]"):
        retrain(train, query_errors, MASKS.long())
    with pytest.raises(TypeError, match="measure must be callable"):
        retrain(train, "loss", MASKS)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="is a directory"):
        retrain(train, query_errors, MASKS, out=tmp_path)
    with pytest.raises(ValueError, match="directory that does not exist"):
        retrain(train, query_errors, MASKS, out=tmp_path / "missing" / "o.h5")
    (tmp_path / "notes.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="notes.h5"):
        retrain(train, query_errors, MASKS, out=tmp_path / "notes.h5")
    assert train.calls == []


def test_retrain_refuses_a_score_store_of_another_kind(tmp_path):
    _, params, loss, (x, y) = mlp_problem(seed=0, n=6)
    ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1)
    ifunc.attribute(loss, params, ihvp, (x, y), (x[:2], y[:2]), out=tmp_path / "scores.h5", progress=False)
    with pytest.raises(ValueError, match="is a score store file, not a retraining outcomes file"):
        retrain(Counted(), query_errors, MASKS, out=tmp_path / "scores.h5", progress=False)


def test_overwrite_starts_over(tmp_path):
    out = tmp_path / "outcomes.h5"
    retrain(Counted(), query_errors, MASKS, out=out, progress=False)
    train = Counted()
    outcomes = retrain(train, lambda w: query_errors(w)[:2], MASKS, out=out, overwrite=True, progress=False)
    assert len(train.calls) == 6 and outcomes.shape == (6, 2)


# ---------------------------------------------------------------- end to end: the docs example


def test_logistic_regression_scores_predict_retraining(tmp_path):
    """docs/evaluate.md's example, smaller: exact influence of an L2-regularised logistic regression ranks the
    half-subset retrainings well (LDS), and its self-influence finds flipped labels better than chance."""
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(80, 4, generator=g), torch.randn(10, 4, generator=g)
    w_true = torch.randn(4, generator=g)
    y, yq = (x @ w_true > 0).double(), (xq @ w_true > 0).double()
    clean = y.clone()
    y[:8] = 1 - y[:8]
    l2 = 1e-2
    loss = lambda p, b: F.binary_cross_entropy_with_logits(b[0] @ p["w"], b[1], reduction="sum")

    def fit(idx):  # Newton's method on the regularised mean loss (convex: converged after 10 steps)
        objective = lambda w: loss({"w": w}, (x[idx], y[idx])) / len(idx) + l2 / 2 * w @ w
        w = torch.zeros(4)
        for _ in range(10):
            w = w - torch.linalg.solve(torch.func.hessian(objective)(w), torch.func.grad(objective)(w))
        return {"w": w}

    query_losses = lambda p: F.binary_cross_entropy_with_logits(xq @ p["w"], yq, reduction="none")
    params = fit(torch.arange(80))
    ihvp = ifunc.ihvp_explicit(loss, params, (x, y), damping=l2)
    scores = ifunc.attribute(loss, params, ihvp, (x, y), (xq, yq), progress=False)
    masks = random_subsets(80, 20, generator=torch.Generator().manual_seed(1))
    outcomes = retrain(fit, query_losses, masks, out=tmp_path / "lds.h5", progress=False)
    assert lds(scores, masks, outcomes).nanmean() > 0.9
    assert lds(torch.randn(10, 80, generator=g), masks, outcomes).nanmean().abs() < 0.5
    self_scores = ifunc.self_influence(loss, params, ihvp, (x, y), progress=False)
    assert mislabel_auc(self_scores, y != clean) > 0.8
