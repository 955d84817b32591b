"""Under ``torchrun`` a rank loads only its own chunks of data indexed by example; every chunk stays bit for bit.

One process: :func:`ifunc._chunks.read_chunks` with a ``wanted`` rule gives exactly the chunks of a full pass (a
Dataset, a Dataset with ``__getitems__``, a DataLoader whose batch size is not the chunk size, with torch's collate
or its own, one batch in memory, a list of ragged batches) and loads only the wanted chunks' examples. Two gloo
ranks (this file run as ``torchrun -m tests.test_rank_reading OUT``): ``attribute`` (memory and a resumed store)
and ``build_index`` count each rank's loads and give the one-process scores bit for bit.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

import ifunc
from ifunc._batches import UnreadChunk, batch_size, concat_batches, tensor_leaves
from ifunc._chunks import Partition, iter_chunks, read_chunks
from ifunc._data import DataSource
from ifunc.index import build_index
from ifunc.testing import mlp_problem

N, FIRST = 600, 256  # examples; the first batch of ifunc's own loader over a Dataset (every rank's data check)


class Counted(Dataset):
    """Examples ``(x[j], y[j])`` (``(x[j], {"label": y[j]})`` with ``labels``) by ``__getitem__``; ``loads`` lists
    the indices of every call, in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, labels: bool = False):
        self.x, self.y, self.labels, self.loads = x, y, labels, []

    def __len__(self) -> int:
        return len(self.x)

    def example(self, j: int):
        return (self.x[j], {"label": self.y[j]}) if self.labels else (self.x[j], self.y[j])

    def __getitem__(self, j: int):
        self.loads.append([j])
        return self.example(j)


class CountedItems(Counted):
    """Loads a batch of examples in one ``__getitems__`` call (as the DataLoader prefers)."""

    def __getitems__(self, indices: list[int]):
        self.loads.append(list(indices))
        return [self.example(j) for j in indices]


def stacked(examples):
    """A collate_fn of the user's own: ``(x [b, ...], y [b])`` as a tuple (not torch's default collate)."""
    return torch.stack([x for x, _ in examples]), torch.stack([y for _, y in examples])


def _data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 5, (n,), generator=gen)


def _same(a, b) -> bool:
    """Same tree, same tensors bit for bit (shape, dtype, bytes)."""
    la, lb = tensor_leaves(a), tensor_leaves(b)
    return (
        type(a) is type(b)
        and len(la) == len(lb)
        and all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(la, lb))
    )


def _owned(n: int, size: int, rank: int, count: int) -> list[int]:
    """The examples of the chunks ``i ≡ rank (mod count)`` of ``size``."""
    return [j for i in range(rank, -(-n // size), count) for j in range(i * size, min((i + 1) * size, n))]


def _check_reads(make, n: int, size: int, count: int):
    """Every rank's chunks equal the full pass's bit for bit, the others unread; returns each rank's source."""
    full_source = make()
    full = list(full_source.chunks(size))
    assert sum(len(tensor_leaves(c)[0]) for c in full) == n
    sources = []
    for rank in range(count):
        source = make()
        part = Partition(rank, count)
        got = list(iter_chunks(source, size, partition=part, skip_others=True))
        assert [c.index for c in got] == list(range(len(full)))
        assert [c.offset for c in got] == [i * size for i in range(len(full))]
        for c, want in zip(got, full):
            if c.mine:
                assert _same(c.batch, want), (rank, c.index)
            else:
                assert isinstance(c.batch, UnreadChunk) and c.batch.size == len(tensor_leaves(want)[0])
        sources.append(source)
    return sources


def _loaded(source: DataSource) -> Counter:
    data = source.loader.dataset if source.loader is not None else None
    return Counter(j for call in data.loads for j in call) if isinstance(data, Counted) else Counter()


@given(n=st.integers(1, 40), size=st.integers(1, 12), batch=st.integers(1, 9), count=st.integers(1, 3))
def test_a_rank_loads_exactly_its_chunks_of_a_dataset_or_a_sequential_loader(n, size, batch, count):
    x, y = _data(n)
    makers = {
        "dataset": lambda: DataSource(Counted(x, y, labels=True), batch_size_hint=batch),
        "getitems": lambda: DataSource(CountedItems(x, y), batch_size_hint=batch),
        "loader": lambda: DataSource(DataLoader(CountedItems(x, y, labels=True), batch_size=batch)),
    }
    for name, make in makers.items():
        sources = _check_reads(make, n, size, count)
        for rank, source in enumerate(sources):
            want = Counter(_owned(n, size, rank, count))
            assert _loaded(source) == want, (name, rank)  # each owned example once, no other
            calls = source.loader.dataset.loads  # pyright: ignore[reportOptionalMemberAccess]
            if name != "dataset":  # one __getitems__ per read of at most the loader's batch size
                assert max(map(len, calls), default=0) <= batch


@given(n=st.integers(1, 40), size=st.integers(1, 12), batch=st.integers(1, 9), count=st.integers(1, 3))
def test_a_loader_with_its_own_collate_loads_only_its_batches_that_meet_its_chunks(n, size, batch, count):
    x, y = _data(n)
    make = lambda: DataSource(DataLoader(CountedItems(x, y), batch_size=batch, collate_fn=stacked))  # noqa: E731
    for rank, source in enumerate(_check_reads(make, n, size, count)):
        owned = set(_owned(n, size, rank, count))
        meeting = {k for k in range(-(-n // batch)) if owned & set(range(k * batch, (k + 1) * batch))}
        want = Counter(j for k in meeting for j in range(k * batch, min((k + 1) * batch, n)))
        assert _loaded(source) == want, rank  # the batches collated as a full pass collates them, each once


@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6), size=st.integers(1, 10), count=st.integers(1, 3))
def test_batches_in_memory_give_the_same_chunks(sizes, size, count):
    x, y = _data(sum(sizes))
    cuts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    ragged = [{"x": x[a:b], "y": y[a:b]} for a, b in zip(cuts[:-1], cuts[1:])]
    for data in (ragged, (x, y), x, {"x": x, "y": y}):
        _check_reads(lambda: DataSource(data), len(x), size, count)  # noqa: B023


def test_chunks_are_the_examples_in_order_as_before():
    """The full pass (unchanged) is the data cut at ``i·size``: chunk ``i`` is rows ``[i·size, (i+1)·size)``."""
    x, y = _data(23)
    for data in (Counted(x, y), DataLoader(CountedItems(x, y), batch_size=5), [(x[:4], y[:4]), (x[4:], y[4:])]):
        chunks = list(DataSource(data).chunks(6))
        assert len(chunks) == 4
        for i, chunk in enumerate(chunks):
            assert _same(chunk, (x[6 * i : 6 * i + 6], y[6 * i : 6 * i + 6])), i


def test_a_loader_with_workers_loads_the_same_chunks_in_them():
    x, y = _data(30)
    loader = DataLoader(CountedItems(x, y), batch_size=4, num_workers=2)
    full = list(DataSource(loader).chunks(7))
    got = list(read_chunks(DataSource(loader), 7, lambda i: i % 2 == 1))
    assert all(_same(g, f) if i % 2 else isinstance(g, UnreadChunk) for i, (g, f) in enumerate(zip(got, full)))
    assert len(got) == len(full) == 5 and not loader.dataset.loads  # pyright: ignore[reportAttributeAccessIssue]


def test_iterable_data_is_walked_whole_and_others_are_left_unread():
    x, y = _data(10)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    got = list(read_chunks(DataSource(DataLoader(Stream(), batch_size=3)), 4, lambda i: i == 1))
    assert isinstance(got[0], UnreadChunk) and isinstance(got[2], UnreadChunk) and got[2].size == 2
    assert _same(got[1], (x[4:8], y[4:8]))


def test_an_unread_chunk_has_a_size_and_no_data_to_hash():
    assert batch_size(UnreadChunk(3)) == 3
    with pytest.raises(TypeError, match="another worker's chunk was not read here"):
        tensor_leaves(UnreadChunk(3))  # what a store would hash


def test_a_getitems_returning_other_counts_is_refused():
    x, y = _data(10)

    class Short(CountedItems):
        def __getitems__(self, indices):
            return super().__getitems__(indices)[:-1]

    with pytest.raises(ValueError, match=r"examples \[0, 4\) of the data set came as a batch of 3"):
        list(read_chunks(DataSource(Short(x, y), name="train"), 4, lambda i: i == 0))


def test_reading_by_index_leaves_the_global_rng_alone():
    x, y = _data(12)
    before = torch.get_rng_state()
    list(read_chunks(DataSource(DataLoader(CountedItems(x, y), batch_size=5)), 4, lambda i: i != 1))
    assert torch.equal(torch.get_rng_state(), before)


# --- two ranks ------------------------------------------------------------------------------------------------


def workload(out_dir) -> dict:
    """attribute over a Dataset, a store written then resumed (own collate), build_index over a DataLoader:
    ``{case: (result, loads)}`` with the example indices this process loaded per call."""
    model, params, loss, (x, y) = mlp_problem(seed=3, sizes=(3, 6, 5), n=N)
    query = (x[:4] + 0.5, y[:4])
    ident = ifunc.ihvp_identity(params, model=model, damping=0.1)
    res = {}
    data = Counted(x, y)
    res["attribute"] = (ifunc.attribute(loss, params, ident, data, query, chunk_size=50, progress=False), data.loads)
    data = CountedItems(x, y)
    store = os.path.join(out_dir, "scores.h5")
    own = DataLoader(data, batch_size=16, collate_fn=stacked)
    ifunc.attribute(loss, params, ident, own, query, chunk_size=30, out=store, overwrite=True, progress=False)
    res["store"] = (torch.from_numpy(ifunc.load_scores(store)), data.loads)
    data.loads = []
    ifunc.attribute(loss, params, ident, own, query, chunk_size=30, out=store, progress=False)  # complete: only checked
    res["resumed"] = (torch.from_numpy(ifunc.load_scores(store)), data.loads)
    data = CountedItems(x, y)
    index = os.path.join(out_dir, "index.h5")
    loader = DataLoader(data, batch_size=32)
    built = build_index(
        loss, params, loader, index, model=model, modules=["2"], layer_size=2, dense_size=6, chunk_size=40,
        overwrite=True, progress=False,
    )  # fmt: skip
    res["index"] = (built.matrix(), data.loads)
    return res


def _expected_loads(case: str, rank: int, count: int) -> Counter:
    """What rank ``rank`` of ``count`` loads: its chunks, plus the first batch that every rank's data check reads
    (one process: every example once, the chunks of a finished store too, to check their fingerprints)."""
    if count == 1:
        return Counter(range(N))
    if case == "attribute":
        return Counter(_owned(N, 50, rank, count)) + Counter(range(FIRST))
    if case == "index":
        return Counter(_owned(N, 40, rank, count)) + Counter(range(32))
    owned = set(_owned(N, 30, rank, count))  # own collate: its batches of 16 that meet the owned chunks
    meeting = [k for k in range(-(-N // 16)) if owned & set(range(16 * k, 16 * k + 16))]
    return Counter(j for k in meeting for j in range(16 * k, min(16 * k + 16, N))) + Counter(range(16))


@pytest.mark.slow
def test_two_ranks_load_only_their_chunks_and_score_bit_for_bit(tmp_path):
    from .test_distributed import _torchrun

    run = _torchrun("-m", "tests.test_rank_reading", tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    (tmp_path / "one").mkdir()
    one = workload(tmp_path / "one")
    assert set(one) == {"attribute", "store", "resumed", "index"}
    for case, (expected, loads) in one.items():
        assert Counter(j for call in loads for j in call) == _expected_loads(case, 0, 1), case
        for r, res in enumerate(ranks):
            got, rank_loads = res[case]
            assert got.dtype == expected.dtype and torch.equal(got, expected), (case, r)
            assert Counter(j for call in rank_loads for j in call) == _expected_loads(case, r, 2), (case, r)


if __name__ == "__main__":  # torchrun -m tests.test_rank_reading OUT: each rank saves OUT/rank{r}.pt
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as the test process (tests/conftest.py)
    torch.distributed.init_process_group("gloo")
    try:
        results = workload(sys.argv[1])
        torch.save(results, os.path.join(sys.argv[1], f"rank{torch.distributed.get_rank()}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


class Texts(Dataset):
    """``(x[j], f"text {j}")``: torch's ``default_collate`` makes the text field a list of strings."""

    def __init__(self, n: int):
        self.x = _data(n)[0]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, j: int):
        return self.x[j], f"text {j}"


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_a_field_of_strings_is_cut_and_joined_with_its_examples(size):
    n = 11
    make = lambda: DataSource(DataLoader(Texts(n), batch_size=5))  # noqa: E731
    full = list(make().chunks(size))
    for i, (x, texts) in enumerate(full):
        assert list(texts) == [f"text {j}" for j in range(i * size, min((i + 1) * size, n))]
        assert len(x) == len(texts)
    for rank in range(2):  # a rank reading its chunks by index gets the same chunks
        got = list(iter_chunks(make(), size, partition=Partition(rank, 2), skip_others=True))
        for c, (x, texts) in zip(got, full):
            if c.mine:
                assert torch.equal(c.batch[0], x) and c.batch[1] == texts


def test_batches_whose_plain_field_differs_cannot_be_joined():
    a, b = (torch.zeros(2, 1), {"split": "train"}), (torch.ones(2, 1), {"split": "test"})
    with pytest.raises(TypeError, match="neither a tensor nor a list of one value per example"):
        concat_batches([a, b])
    joined = concat_batches([a, (torch.ones(1, 1), {"split": "train"})])
    assert joined[1] == {"split": "train"} and joined[0].shape == (3, 1)
