"""The two extension points of the scoring loop: a closure brings its scorer, a caller brings a sink.

``attribute`` and ``self_influence`` know no method and no destination: a new closure type plugs in by its
``scorer`` method, a new destination by the sink protocol, and neither needs a change to ``attribute``.
"""

from __future__ import annotations

import pytest
import torch

import ifunc
from ifunc.ihvp import GenericScorer, ScoreOptions
from ifunc.testing import mlp_problem


def _problem():
    model, params, loss, (x, y) = mlp_problem(seed=3, sizes=(4, 6, 3), n=23)
    return model, params, loss, (x, y), (x[:4] + 0.1, y[:4])


class TopK:
    """A sink that keeps, per query, the k highest scores seen so far (never the whole matrix)."""

    def __init__(self, k: int):
        self.k, self.opened, self.closed = k, None, False
        self.best: torch.Tensor | None = None
        self.where: torch.Tensor | None = None

    def chunk_size(self):
        return None

    def open(self, plan):
        self.opened = plan

    def seen(self, index, batch):
        pass

    def wants(self, index):
        return True

    def put(self, index, block):
        offset = index * self.opened.chunk
        cols = torch.arange(offset, offset + block.shape[-1]).expand_as(block)
        values = block if self.best is None else torch.cat([self.best, block], dim=1)
        where = cols if self.where is None else torch.cat([self.where, cols], dim=1)
        top = values.topk(min(self.k, values.shape[1]), dim=1)
        self.best, self.where = top.values, where.gather(1, top.indices)

    def result(self):
        return self.best, self.where

    def close(self):
        self.closed = True


def test_a_sink_of_ones_own_receives_every_chunk_and_its_result_is_returned():
    _, params, loss, train, query = _problem()
    ihvp = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    full = ifunc.attribute(loss, params, ihvp, train, query)
    sink = TopK(5)
    best, where = ifunc.attribute(loss, params, ihvp, train, query, sink=sink, chunk_size=4)
    expected = full.topk(5, dim=1)
    torch.testing.assert_close(best, expected.values)
    assert torch.equal(where, expected.indices)
    assert sink.opened.n_query == 4 and sink.opened.chunk == 4 and sink.closed
    with pytest.raises(ValueError, match="either out= .* or sink="):
        ifunc.attribute(loss, params, ihvp, train, query, sink=TopK(1), out="scores.h5")


def test_a_sink_is_closed_when_the_scorer_fails():
    _, params, loss, train, query = _problem()
    ihvp = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    sink = TopK(2)
    bad = [(train[0][:8], train[1][:8]), (train[0][:3] * float("nan"), train[1][:3])]
    with pytest.raises(ValueError, match="NaN|inf|finite"):
        ifunc.attribute(loss, params, ihvp, bad, query, sink=sink, chunk_size=8)
    assert sink.closed


class Counting(ifunc.IHVP):
    """A closure type of one's own: the explicit closure, with a scorer that counts the chunks it scores."""

    def __init__(self, inner: ifunc.IHVP):
        super().__init__(
            inner.solve, name="counting", damping=inner.damping, unflatten=inner.unflatten, like=torch.zeros(())
        )
        self.chunks = 0

    def scorer(self, loss, params, options: ScoreOptions):
        closure = self
        generic = GenericScorer(self.solve, self.dim, loss, params, options)

        class Scorer:
            splits_examples = generic.splits_examples
            prepare, chunk_size = generic.prepare, generic.chunk_size

            def chunk(self, batch, offset):
                closure.chunks += 1
                return generic.chunk(batch, offset)

            def self_terms(self, batch, offset):
                closure.chunks += 1
                return generic.self_terms(batch, offset)

        return Scorer()


def test_a_closure_of_ones_own_scores_through_its_own_scorer():
    _, params, loss, train, query = _problem()
    inner = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    own = Counting(inner)
    torch.testing.assert_close(
        ifunc.attribute(loss, params, own, train, query, chunk_size=5),
        ifunc.attribute(loss, params, inner, train, query),
    )
    assert own.chunks == 5  # 23 examples in chunks of 5
    torch.testing.assert_close(
        ifunc.self_influence(loss, params, own, train, chunk_size=10), ifunc.self_influence(loss, params, inner, train)
    )
    assert own.chunks == 5 + 3


def test_a_plain_callable_scores_like_the_closure_it_wraps():
    _, params, loss, train, query = _problem()
    ihvp = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    torch.testing.assert_close(
        ifunc.attribute(loss, params, lambda V: ihvp(V), train, query),
        ifunc.attribute(loss, params, ihvp, train, query),
    )
    torch.testing.assert_close(
        ifunc.self_influence(loss, params, lambda V: ihvp(V), train), ifunc.self_influence(loss, params, ihvp, train)
    )
    with pytest.raises(TypeError, match="must be a callable"):
        ifunc.attribute(loss, params, "not a closure", train, query)


def test_options_only_the_kronecker_scorer_has_are_refused_by_the_generic_one():
    _, params, loss, train, query = _problem()
    ihvp = ifunc.ihvp_explicit(loss, params, train, damping=0.1)
    for option in ({"per_module": True}, {"query_rank": 2}, {"per_token": True}):
        with pytest.raises(ValueError, match="Kronecker-family closure built with model="):
            ifunc.attribute(loss, params, ihvp, train, query, **option)
