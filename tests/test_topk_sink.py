"""Top-k sinks: ``attribute(..., sink=TopK(k))`` equals the first ``k`` columns of a stable sort of the full matrix.

The reference is ``torch.sort(scores, dim=1, descending=largest, stable=True)`` of the matrix the default sink
returns for the same call (the same columns, bit for bit), so values and indices are compared exactly, ties (broken
by the lower index) included. The loop itself (:func:`ifunc._score_loop.run_chunks`) drives the sink over
hypothesis-drawn matrices full of ties, in chunks of every width.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifunc
from ifunc._chunks import Partition
from ifunc._data import DataSource
from ifunc._score_loop import run_chunks
from ifunc._topk_sink import Extremes, HelpfulHarmful, Ranked, TopK
from ifunc.store.reading import ChecksumError, read_blocks
from ifunc.testing import mlp_problem


def _reference(scores: torch.Tensor, k: int, largest: bool) -> Ranked:
    order = torch.sort(scores, dim=1, descending=largest, stable=True)
    return Ranked(order.values[:, :k], order.indices[:, :k])


def _assert_ranked(got: Ranked, want: Ranked) -> None:
    assert isinstance(got, Ranked) and got.indices.dtype == torch.int64
    assert torch.equal(got.indices, want.indices), (got.indices, want.indices)
    assert torch.equal(got.values, want.values)


def _drive(scores: torch.Tensor, chunk: int, sink):
    """Run the scoring loop over ``scores [q, n]`` in chunks of ``chunk`` columns into ``sink``."""
    n = scores.shape[1]
    source = DataSource(torch.zeros(n, 1), name="train", ordered=True)
    columns = lambda batch, offset: scores[:, offset : offset + batch.shape[0]]  # noqa: E731
    return run_chunks(source, chunk, Partition(), columns, sink, n_query=scores.shape[0], desc="", progress=False)


@given(
    seed=st.integers(0, 2**31 - 1),
    q=st.integers(1, 4),
    n=st.integers(1, 60),
    chunk=st.integers(1, 25),
    k=st.integers(1, 12),
    levels=st.sampled_from([2, 5, 1000]),
)
def test_the_sink_equals_a_stable_sort_of_the_matrix_ties_by_lower_index(seed, q, n, chunk, k, levels):
    """Few distinct values (``levels``) make ties at the k-th place the rule, not the exception."""
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-levels, levels, (q, n), generator=gen).double() / 4
    for largest in (True, False):
        _assert_ranked(_drive(scores, chunk, TopK(k, largest=largest)), _reference(scores, k, largest))
    both = _drive(scores, chunk, HelpfulHarmful(k))
    assert isinstance(both, Extremes)
    _assert_ranked(both.helpful, _reference(scores, k, True))
    _assert_ranked(both.harmful, _reference(scores, k, False))


@pytest.mark.parametrize("trend", ["rising", "falling", "flat", "signed zeros"])
def test_every_chunk_beating_the_last_and_none_beating_it_give_the_same_answer(trend):
    """Rising scores make every column a contender (the whole-block path); falling ones make none (the filter)."""
    base = torch.arange(200, dtype=torch.float32).expand(3, -1).clone()
    scores = {
        "rising": base,
        "falling": -base,
        "flat": torch.zeros(3, 200),
        "signed zeros": torch.where(base % 3 == 0, -0.0, 0.0),  # -0.0 == 0.0: a tie, broken by index
    }[trend]
    for chunk in (1, 7, 64, 200):
        for largest in (True, False):
            _assert_ranked(_drive(scores, chunk, TopK(5, largest=largest)), _reference(scores, 5, largest))


def test_values_keep_the_dtype_of_the_columns():
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = _drive(scores, 8, TopK(4))
    assert got.values.dtype == torch.bfloat16
    _assert_ranked(got, _reference(scores, 4, True))


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def problem(request):
    model, params, loss, (x, y) = mlp_problem(seed=4, sizes=(4, 6, 3), n=30, dtype=request.param)
    return model, params, loss, (x, y), (x[:5] + 0.1, y[:5])


@pytest.mark.parametrize("method", ["explicit", "ekfac"])
def test_attribute_with_a_top_k_sink_equals_the_full_matrix(problem, method):
    model, params, loss, train, query = problem
    ihvp = {
        "explicit": lambda: ifunc.ihvp_explicit(loss, params, train, damping=0.1),  # the generic scorer
        "ekfac": lambda: ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1),  # captured contractions
    }[method]()
    for chunk_size in (4, 30):
        full = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=chunk_size, progress=False)
        for largest in (True, False):
            got = ifunc.attribute(
                loss, params, ihvp, train, query, chunk_size=chunk_size, sink=TopK(6, largest=largest), progress=False
            )
            _assert_ranked(got, _reference(full, 6, largest))
        both = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=chunk_size, sink=HelpfulHarmful(3))
        _assert_ranked(both.helpful, _reference(full, 3, True))
        _assert_ranked(both.harmful, _reference(full, 3, False))


def test_a_gradient_index_as_train(problem, tmp_path):
    model, params, loss, train, query = problem
    index = ifunc.build_index(loss, params, train, tmp_path / "i.h5", model=model, layer_size=2, dense_size=3)
    ihvp = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
    full = ifunc.attribute(loss, params, ihvp, index, query, progress=False)
    both = ifunc.attribute(loss, params, ihvp, index, query, sink=HelpfulHarmful(7), progress=False)
    _assert_ranked(both.helpful, _reference(full, 7, True))
    _assert_ranked(both.harmful, _reference(full, 7, False))


def test_bad_arguments_are_refused_by_name(problem):
    model, params, loss, train, query = problem
    ihvp = ifunc.ihvp_identity(params, model=model, damping=1.0)
    with pytest.raises(ValueError, match=r"TopK: k=31 exceeds the 30 training examples"):
        ifunc.attribute(loss, params, ihvp, train, query, sink=TopK(31))
    with pytest.raises(ValueError, match=r"HelpfulHarmful: k must be an int >= 1, got 0"):
        HelpfulHarmful(0)
    with pytest.raises(TypeError, match=r"TopK: k must be an int >= 1, got the bool True"):
        TopK(True)
    with pytest.raises(TypeError, match=r"largest must be True or False, got 'smallest'"):
        TopK(3, largest="smallest")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"ranks pairwise scores \[n_query=5, b\]; got a block of shape \[2, 5, 30\]"):
        ifunc.attribute(loss, params, ihvp, train, query, per_module=True, sink=TopK(3))
    with pytest.raises(ValueError, match=r"pass either out= .* or sink="):
        ifunc.attribute(loss, params, ihvp, train, query, out="x.h5", sink=TopK(3))


def test_k_beyond_an_unknown_count_is_refused_at_the_end():
    """Batches from an iterable without a length have no cheap count: the check runs once the examples are seen."""

    class Batches:
        def __iter__(self):
            return (torch.zeros(3, 1) for _ in range(3))

    scores = torch.randn(2, 9)
    source = DataSource(Batches(), name="train", ordered=True)
    assert source.cheap_count() is None
    columns = lambda batch, offset: scores[:, offset : offset + batch.shape[0]]  # noqa: E731
    with pytest.raises(ValueError, match=r"k=10 exceeds the 9 training examples"):
        run_chunks(source, 3, Partition(), columns, TopK(10), n_query=2, desc="", progress=False)


def test_the_verified_block_reader_yields_whole_chunks_and_names_a_damaged_one(problem, tmp_path):
    """The reader under ``top_k`` and the index's rows: blocks of whole chunks; a changed chunk is a ChecksumError."""
    h5py = pytest.importorskip("h5py")
    model, params, loss, train, query = problem
    ihvp = ifunc.ihvp_identity(params, model=model, damping=1.0)
    path = ifunc.attribute(loss, params, ihvp, train, query, out=tmp_path / "s.h5", chunk_size=3, progress=False)
    whole = ifunc.load_scores(path)
    blocks = list(read_blocks(path, block=7))  # rounded down to 2 chunks of 3
    assert [(start, cols.shape[1]) for start, cols in blocks] == [(s, 6) for s in range(0, 30, 6)]
    assert (torch.cat([torch.from_numpy(c) for _, c in blocks], 1).numpy() == whole).all()
    assert [start for start, _ in read_blocks(path)] == [0]  # the default: about 64 MiB, here everything
    with h5py.File(path, "r+") as f:  # chunk 2 = columns 6, 7, 8
        f["scores"][1, 7] = f["scores"][1, 7] + 1.0
    with pytest.raises(ChecksumError, match=r"s\.h5: chunk 2 fails its checksum") as caught:
        list(read_blocks(path, block=7))
    assert (caught.value.chunk, caught.value.start, caught.value.stop) == (2, 6, 9)
    assert len(list(read_blocks(path, block=7, verify=False))) == 5
