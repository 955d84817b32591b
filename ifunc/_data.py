"""Data normalisation: every public function accepts a batch, a list of batches, a Dataset or a DataLoader.

A *batch* is a tensor, or a tuple / list / dict of tensors whose leading dimensions are the examples.
A *list of batches* is a Python ``list`` whose items are batches (tuples, dicts or tensors).

:meth:`DataSource.chunks` cuts the data into chunks of exactly ``size`` examples (the loop over them, and which
worker computes which, is :mod:`ifunc._chunks`); given the chunks a worker wants, it reads only those when the data
is indexed by example (an :class:`UnreadChunk`, the example count alone, stands for each of the others).
:func:`fingerprint` is the one content hash (data sets, parameters, query sets); :func:`params_fingerprint` hashes a
pytree of parameters as their flat vector without copying them.

Two guards of :mod:`ifunc._order` hold where user data enters: an *ordered* source (score columns, sampled
labels) refuses a DataLoader whose order is not fixed, and iterating user data never moves the global RNG.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import optree
import torch
from torch.utils.data import DataLoader, Dataset

from ._batches import Batch, UnreadChunk, batch_size, concat_batches, slice_batch
from ._order import order_problem, own_rng_stream
from .functional import structure


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 (first 32 hex digits) of the exact bytes, shapes and dtypes of a sequence of tensors."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")  # bytes in place (0-d too)
    return h.hexdigest()[:32]


def params_fingerprint(params) -> str:
    """``fingerprint([flatten(params)[0]])`` without forming the flat vector: the leaves' bytes hashed in place.

    The digest is that of the one concatenated ``[d]`` tensor (its shape and dtype, then every leaf's bytes in the
    order of :func:`~ifunc.functional.flatten`), so it equals the fingerprints stores and indexes already hold; on a
    124M-parameter model it saves the 0.5 GB copy (0.7 s of a 1 s check).
    """
    unflatten = structure(params)
    h = hashlib.sha256()
    h.update(f"{(unflatten.dim,)}{unflatten.dtypes[0]}".encode())
    for leaf in optree.tree_leaves(params, namespace="ifunc"):
        t = leaf.detach().cpu().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def _is_batch(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (tuple, dict)):
        leaves = optree.tree_leaves(obj, namespace="ifunc")  # pyright: ignore[reportArgumentType]  # any container
        return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)
    return False


def as_source(data: Any, *, name: str = "data", ordered: bool = False) -> DataSource:
    """``data`` itself when it is already a :class:`DataSource` with the guards asked for (built once per call and
    passed down: its example count, once known, is not counted again), else a new one."""
    if isinstance(data, DataSource) and (data.ordered or not ordered):
        return data
    return DataSource(data, name=name, ordered=ordered)


class _Normalised(list):
    """The batches of data held in memory, already checked (a list of batches)."""


class DataSource:
    """A re-iterable view of user data as batches, with the total number of examples."""

    def __init__(
        self,
        data: Any,
        *,
        name: str = "data",
        batch_size_hint: int = 256,
        ordered: bool = False,
        known_count: int | None = None,
    ):
        self.name, self.ordered = name, ordered
        if isinstance(data, DataSource):  # a view of a view: the user's data again, with this view's guards
            data = data._batches
        self._batches: Iterable[Batch]
        if isinstance(data, _Normalised):
            self._batches = data
        elif _is_batch(data):
            self._batches = _Normalised([data])
        elif isinstance(data, list):
            if data and all(isinstance(b, torch.Tensor) for b in data):
                raise TypeError(
                    f"{name}: a list of tensors is ambiguous; pass one batch as a tuple, e.g. (x, y), "
                    "or several batches as a list of tuples, e.g. [(x1, y1), (x2, y2)]"
                )
            data = [tuple(b) if isinstance(b, list) else b for b in data]  # collated [x, y] batches
            if not data or not all(_is_batch(b) for b in data):
                raise TypeError(
                    f"{name}: a list must hold batches (tensors, tuples or dicts of tensors); "
                    "pass one batch as a tuple, e.g. (x, y)"
                )
            self._batches = _Normalised(data)
        elif isinstance(data, DataLoader):
            if ordered and data.drop_last and data.batch_size is not None:
                raise ValueError(
                    f"{name}: the DataLoader has drop_last=True, so the examples of its last, incomplete batch would "
                    "get no column (and no share of the curvature); pass drop_last=False"
                )
            problem = order_problem(data) if ordered else None
            if problem is not None:
                raise ValueError(
                    f"{name}: the DataLoader shuffles: {problem}, so example i would not be the i-th example of the "
                    "data (the scores' columns, or the labels sampled per example, would be in a random order); "
                    "pass a DataLoader with shuffle=False (or sampler=SequentialSampler(dataset)), or the data set "
                    "itself"
                )
            self._batches = data
        elif isinstance(data, Dataset) or _map_style(data):
            # a map-style data set (a torch Dataset, or any object indexed by example such as a Hugging Face
            # datasets.Dataset in torch format): read in order, collated into batches
            self._batches = DataLoader(data, batch_size=batch_size_hint, shuffle=False)
        elif isinstance(data, Iterator):
            raise TypeError(
                f"{name}: got a one-shot iterator/generator; ifunc may pass over the data several times. "
                "Pass a list of batches or a DataLoader instead"
            )
        elif isinstance(data, Iterable):
            self._batches = data
        else:
            raise TypeError(
                f"{name}: expected a batch (tensor / tuple / dict of tensors), a list of batches, a Dataset "
                f"or a DataLoader; got {type(data).__name__}"
            )
        self._n: int | None = known_count  # the example count when the caller knows it (no counting pass)
        self._passes = 0

    def __iter__(self) -> Iterator[Batch]:
        empty = True
        for batch in self._batches if isinstance(self._batches, list) else own_rng_stream(self._batches):
            empty = False
            yield batch
        if empty and self._passes:
            raise ValueError(
                f"{self.name} yielded no examples on a second pass; ifunc passes over the data several times: pass "
                "a list of batches, a Dataset or a DataLoader instead of a one-shot iterable"
            )
        self._passes += 1

    def __len__(self) -> int:
        if self._n is None:
            self._n = sum(batch_size(b) for b in self)
            if self._n == 0:
                raise ValueError(f"{self.name} holds no examples")
        return self._n

    def count(self) -> int:
        """Number of examples (one pass over the data unless it can be read off cheaply)."""
        cheap = self.cheap_count()
        return cheap if cheap is not None else len(self)

    def cheap_count(self) -> int | None:
        """Number of examples when known without loading data (in memory, or a plain DataLoader), else None."""
        if self._n is not None:
            return self._n
        if isinstance(self._batches, list):
            return len(self)
        loader = self._batches
        if isinstance(loader, DataLoader) and loader.batch_size is not None and not loader.drop_last:
            try:
                return len(loader.sampler)  # pyright: ignore[reportArgumentType]  # no __len__: TypeError below
            except TypeError:
                return None
        return None

    def chunks(self, size: int, wanted: Callable[[int], bool] | None = None) -> Iterator[Batch]:
        """Yield batches of exactly ``size`` examples (the last may be smaller), in order.

        Batches are split and joined across the data's own batch boundaries, so chunk ``i`` always holds
        examples ``[i·size, (i+1)·size)`` whatever the DataLoader's batch size. With ``wanted``, chunk ``i`` is
        cut and joined only when ``wanted(i)``; the others are :class:`UnreadChunk` of their example count (the
        data is still read whole: :func:`ifunc._chunks.read_chunks` loads only the wanted examples when it can).

        Raises:
          ValueError / TypeError: ``size`` is not a positive int (:func:`chunk_width`).
        """
        size = chunk_width(size)
        pending: list[Batch] = []
        held = index = 0
        keep = wanted is None or wanted(0)
        for b in self:
            b = tuple(b) if isinstance(b, list) else b  # a DataLoader collates (x, y) into [x, y]
            n = batch_size(b)
            start = 0
            while start < n:
                take = min(size - held, n - start)
                if keep:
                    pending.append(b if (start == 0 and take == n) else slice_batch(b, start, start + take))
                held += take
                start += take
                if held == size:
                    yield _joined(pending) if keep else UnreadChunk(held)
                    pending, held, index = [], 0, index + 1
                    keep = wanted is None or wanted(index)
        if held:
            yield _joined(pending) if keep else UnreadChunk(held)

    @property
    def loader(self) -> DataLoader | None:
        """The DataLoader the data is read through (the user's, or ifunc's own over a Dataset), else None."""
        return self._batches if isinstance(self._batches, DataLoader) else None

    def pieces(self, count: int) -> Iterable[Batch]:
        """The data as at least ``count`` batches when it is in memory in fewer (views, re-iterable), else itself.

        One in-memory batch would leave all but one of ``count`` workers idle; the cut does not change a sum
        over examples (up to rounding).
        """
        if count > 1 and isinstance(self._batches, list) and len(self._batches) < count:
            return list(self.chunks(-(-len(self) // count)))
        return self

    def first(self) -> Batch:
        """The first batch of the data (one batch is loaded)."""
        for batch in self:
            return batch
        raise ValueError(f"{self.name} holds no examples")

    def head(self, count: int) -> Batch:
        """The first ``count`` examples as one batch, across batch boundaries (fewer when it holds fewer)."""
        for chunk in self.chunks(count):
            return chunk
        raise ValueError(f"{self.name} holds no examples")

    def in_memory(self) -> Batch | None:
        """All examples as one batch when the data is already in memory (a batch or a list), else None."""
        if isinstance(self._batches, list):
            return self._batches[0] if len(self._batches) == 1 else concat_batches(self._batches)
        return None


def _joined(pieces: list[Batch]) -> Batch:
    return pieces[0] if len(pieces) == 1 else concat_batches(pieces)


def _map_style(data) -> bool:
    """An object indexed by example with a length (not a list or tensor): e.g. a Hugging Face ``datasets.Dataset``."""
    return (
        not isinstance(data, (list, tuple, dict, str, bytes, torch.Tensor))
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and hasattr(data, "column_names")  # a table of examples: its rows, not its items, are the examples
    )


def chunk_width(size, *, name: str = "chunk_size") -> int:
    """``size`` as a positive ``int`` (examples per chunk); TypeError / ValueError naming ``name`` and the fix."""
    fix = f"pass a positive int such as {name}=64 (examples per chunk)"
    if size is not None:
        fix += f", or {name}=None to size the chunks from the memory budget (max_memory=)"
    if isinstance(size, bool) or (isinstance(size, torch.Tensor) and size.dtype == torch.bool):
        raise TypeError(f"{name} must be a positive int, got the bool {size!r}; {fix}")
    try:
        number = operator.index(size)  # pyright: ignore[reportArgumentType]  # int, NumPy or 0-d torch integer
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {size!r} ({type(size).__name__}); {fix}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {number}; {fix}")
    return number
