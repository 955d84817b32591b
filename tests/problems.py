"""The problems the method table runs on, and the dense references its exact rows are checked against.

Problems are ``ifunc.testing.mlp_problem`` networks evaluated at parameters moved away from the module's own
(:func:`make_problem`), so a method that reads the module instead of ``params`` gets the wrong answer. A
reference is ``problem -> C [d, d]``, an undamped curvature in float64 built from ``ifunc.ggn`` /
``ifunc.per_sample_grads``; :func:`blocks_of` and :func:`diagonal_of` cut one down to the blocks a method keeps.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Callable, NamedTuple, Union

import torch
from torch import nn

import ifunc
from ifunc.testing import mlp_problem

#: a ``blocks=`` argument: ``"full"``, ``"layer"``, a mapping name -> group, or a function name -> group
Blocks = Union[str, Mapping[str, Hashable], Callable[[str], Hashable]]


class Problem(NamedTuple):
    """``(model, params, loss, data)``; ``params`` are the module's parameters plus a seeded offset."""

    model: nn.Module
    params: dict[str, torch.Tensor]
    loss: ifunc.OutputLoss
    data: tuple[torch.Tensor, torch.Tensor]


def make_problem(*, seed: int, sizes: tuple[int, ...], n: int, activation, task: str) -> Problem:
    """An ``mlp_problem`` with ``params = module parameters + 0.1 · N(0, 1)`` (seeded by ``seed``)."""
    model, params, loss, data = mlp_problem(seed=seed, sizes=sizes, n=n, activation=activation, task=task)
    gen = torch.Generator().manual_seed(seed + 1)
    away = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    return Problem(model, away, loss, data)


def dim(problem: Problem) -> int:
    return sum(t.numel() for t in problem.params.values())


def scaled(problem: Problem, c: float) -> Problem:
    """The same problem with the loss multiplied by ``c`` (likelihood kept)."""
    loss = problem.loss
    on_outputs = lambda out, b: c * loss.loss_on_outputs(out, b)  # noqa: E731
    return problem._replace(loss=ifunc.output_loss(loss.outputs, on_outputs, likelihood=loss.likelihood))


def categorical(problem: Problem) -> Problem:
    """The same problem with ``likelihood="categorical"`` (labels sampled from the model: the true Fisher)."""
    loss = problem.loss
    return problem._replace(loss=ifunc.output_loss(loss.outputs, loss.loss_on_outputs, likelihood="categorical"))


# ---------------------------------------------------------------- dense references (undamped curvature C)


def ggn(problem: Problem) -> torch.Tensor:
    """The GGN of the mean loss, ``[d, d]`` (the default curvature of an ``output_loss``)."""
    return ifunc.ggn(problem.loss, problem.params, problem.data)


def empirical_fisher(problem: Problem) -> torch.Tensor:
    """``(1/n) Σ_i g_i g_iᵀ`` with the per-example gradients at the data's labels."""
    G = ifunc.per_sample_grads(problem.loss, problem.params, problem.data)
    return G.T @ G / G.shape[0]


def sampled_fisher(problem: Problem) -> torch.Tensor:
    """``(1/n) Σ_i g̃_i g̃_iᵀ`` at labels sampled from the model with the default generator (seed 0).

    Read back from ``ihvp_explicit(curvature="fisher")`` at λ = 1: ``C = f(I)^{-1} − I``.
    """
    p = categorical(problem)
    f = ifunc.ihvp_explicit(p.loss, p.params, p.data, damping=1.0, curvature="fisher")
    eye = torch.eye(dim(problem))
    return torch.linalg.inv(f(eye)) - eye


def layer(name: str) -> str:
    """The module of a parameter name (``"0.weight" -> "0"``): what ``blocks="layer"`` groups by."""
    return name.rpartition(".")[0]


def kind(name: str) -> str:
    """``"weight"`` or ``"bias"``: a custom grouping that cuts across the layers."""
    return name.rpartition(".")[2]


def group_of(blocks: Blocks) -> Callable[[str], Hashable]:
    """``name -> group`` of a ``blocks=`` argument (``"full"``, ``"layer"``, a mapping or a function)."""
    if isinstance(blocks, Mapping):
        return blocks.__getitem__
    if isinstance(blocks, str):
        return layer if blocks == "layer" else lambda name: blocks
    return blocks


def block_masks(problem: Problem, blocks: Blocks = "layer") -> torch.Tensor:
    """``[m, d]`` boolean masks of the blocks of ``blocks=`` (``"full"``, ``"layer"``, mapping or function)."""
    group = group_of(blocks)
    return torch.stack(
        [
            ifunc.flatten({k: torch.full_like(v, float(group(k) == g)) for k, v in problem.params.items()})[0]
            for g in sorted({group(k) for k in problem.params}, key=str)
        ]
    ).bool()


def blocks_of(matrix: Callable[[Problem], torch.Tensor], blocks: Blocks = "layer") -> Callable[[Problem], torch.Tensor]:
    """``problem -> Σ_b P_b C P_b``: the block diagonal of ``matrix(problem)`` (cross-block terms zero)."""

    def reference(problem: Problem) -> torch.Tensor:
        m = block_masks(problem, blocks).double()
        return matrix(problem) * (m.T @ m)

    reference.__name__ = f"blocks_of({matrix.__name__}, {getattr(blocks, '__name__', blocks)})"
    return reference


def diagonal_of(matrix: Callable[[Problem], torch.Tensor]) -> Callable[[Problem], torch.Tensor]:
    def reference(problem: Problem) -> torch.Tensor:
        return torch.diag(matrix(problem).diagonal())

    reference.__name__ = f"diagonal_of({matrix.__name__})"
    return reference


def zero(problem: Problem) -> torch.Tensor:
    """No curvature: the damped matrix is ``λI``."""
    d = dim(problem)
    return torch.zeros(d, d)
