"""Hypothesis strategies: draw seeds and sizes, build problems from them (never tensors element-wise)."""

from hypothesis import strategies as st
from torch import nn

from ifunc.testing import mlp_problem

seeds = st.integers(0, 2**16)
dampings = st.floats(1e-2, 1.0)
activations = st.sampled_from([None, nn.Tanh])  # None: a deep linear network
tasks = st.sampled_from(["classification", "regression"])


@st.composite
def mlp_problems(draw, max_hidden: int = 4, max_n: int = 10):
    """``(model, params, loss, data)`` for a random linear / tanh MLP with random data."""
    d_in = draw(st.integers(1, 3))
    hidden = draw(st.integers(1, max_hidden))
    d_out = draw(st.integers(2, 3))
    n = draw(st.integers(1, max_n))
    return mlp_problem(
        seed=draw(seeds), sizes=(d_in, hidden, d_out), n=n, activation=draw(activations), task=draw(tasks)
    )


@st.composite
def problem_specs(draw, max_hidden: int = 3, max_n: int = 6):
    """Arguments of ``tests.methods.make_problem``: a tiny MLP (``d <= 24``) and its data, as seeds and sizes."""
    return {
        "seed": draw(seeds),
        "sizes": (draw(st.integers(1, 3)), draw(st.integers(1, max_hidden)), draw(st.integers(2, 3))),
        "n": draw(st.integers(1, max_n)),
        "activation": draw(activations),
        "task": draw(tasks),
    }
