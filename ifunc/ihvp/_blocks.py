"""Block-diagonal mode shared by the iHVP methods: group parameters, restrict operators, join solves.

With blocks ``B_1, …, B_m`` (disjoint sets of flat indices covering all ``d`` parameters) the curvature is
replaced by its block diagonal ``D = Σ_b P_b H P_b`` (``P_b`` the coordinate projection on ``B_b``): the
cross-block curvature is dropped and ``(D + λI)^{-1} v`` is solved block by block,
``[(D + λI)^{-1} v]_b = (H_bb + λI)^{-1} v_b``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Callable, NamedTuple, Union

import torch

from ..functional import Unflatten, parameter_names
from ._base import IHVP
from ._damping import RuleDamping, check_conditioning, check_damping
from ._eigen import eigen_solve

__all__ = ["Block", "blocks_info", "resolve_blocks", "restrict", "block_diagonal", "join", "eigen_blocks_ihvp"]

MatVec = Callable[[torch.Tensor], torch.Tensor]

#: ``blocks=`` of the operator methods: ``"full"``, ``"layer"``, or a mapping parameter name -> group
Blocks = Union[str, Mapping[str, Hashable]]


class Block(NamedTuple):
    """One group of parameters: its name, its flat indices ``[d_b]`` (ascending) and its parameters."""

    name: str
    index: torch.Tensor
    params: tuple[str, ...] = ()


def blocks_info(method: str, blocks: list[Block]) -> dict[str, tuple[str, str]]:
    """``info["blocks"]`` of every method: parameter name -> ``(method, block name)``."""
    return {p: (method, block.name) for block in blocks for p in block.params}


def _layer_of(name: str) -> str:
    return name.rpartition(".")[0]


def resolve_blocks(
    blocks: str | Mapping[str, Hashable], unflatten: Unflatten, *, device=None, who: str = "blocks"
) -> list[Block]:
    """Turn ``blocks="full" | "layer" | {name: group}`` into a list of :class:`Block` (one for ``"full"``).

    ``"layer"`` groups parameters by module prefix, the name up to its last ``"."`` (``"fc1.weight"`` and
    ``"fc1.bias"`` form the block ``"fc1"``). A mapping must give a group to every parameter name.

    Raises:
      ValueError: an unknown string, or a mapping that misses or invents parameter names.
      TypeError: ``blocks`` is neither a string nor a mapping.
    """
    names = parameter_names(unflatten)
    if isinstance(blocks, str):
        if blocks == "full":
            return [Block("full", torch.arange(unflatten.dim, device=device), tuple(names))]
        if blocks != "layer":
            raise ValueError(f'{who}={blocks!r}: use "full", "layer" or a mapping parameter name -> group')
        groups = {name: _layer_of(name) for name in names}
    elif isinstance(blocks, Mapping):
        missing = [name for name in names if name not in blocks]
        unknown = sorted(str(key) for key in blocks if key not in set(names))
        if missing or unknown:
            raise ValueError(
                f"{who}: the mapping must give a group to every parameter and only to parameters; missing "
                f"{missing}, unknown {unknown}; the parameter names are {names}"
            )
        groups = {name: blocks[name] for name in names}
    else:
        raise TypeError(f'{who} must be "full", "layer" or a mapping name -> group, got {type(blocks).__name__}')
    members: dict[Hashable, list[torch.Tensor]] = {}
    owners: dict[Hashable, list[str]] = {}
    offset = 0
    for name, size in zip(names, unflatten.sizes):
        members.setdefault(groups[name], []).append(torch.arange(offset, offset + size, device=device))
        owners.setdefault(groups[name], []).append(name)
        offset += size
    return [Block(str(group), torch.cat(parts), tuple(owners[group])) for group, parts in members.items()]


def is_full(blocks: list[Block]) -> bool:
    return len(blocks) == 1


def restrict(matvec: MatVec, index: torch.Tensor, d: int) -> MatVec:
    """``V_b [k, d_b] -> H_bb V_b``: embed in ``[k, d]`` with zeros, multiply, keep the block's rows."""
    if index.numel() == d:
        return matvec

    def restricted(Vb: torch.Tensor) -> torch.Tensor:
        V = Vb.new_zeros(Vb.shape[0], d)
        V[:, index] = Vb
        return matvec(V)[:, index]

    return restricted


def block_diagonal(matvec: MatVec, blocks: list[Block], d: int) -> MatVec:
    """``V [k, d] -> D V = Σ_b P_b H P_b V`` in one batched product with ``m·k`` vectors."""
    if is_full(blocks):
        return matvec
    masks = torch.zeros(len(blocks), d, dtype=torch.bool, device=blocks[0].index.device)
    for b, block in enumerate(blocks):
        masks[b, block.index] = True

    def diagonal(V: torch.Tensor) -> torch.Tensor:
        m = masks.to(V.device)
        stacked = (V[None] * m[:, None]).reshape(-1, V.shape[1])  # [m k, d], each row inside one block
        out = matvec(stacked).reshape(len(blocks), V.shape[0], V.shape[1])
        return (out * m[:, None]).sum(0)

    return diagonal


def join(solves: list[MatVec], blocks: list[Block]) -> MatVec:
    """``V [k, d] -> X`` with ``X[:, B_b] = solve_b(V[:, B_b])`` for every block."""
    if is_full(blocks):
        return solves[0]

    def joined(V: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(V)
        for solve, block in zip(solves, blocks):
            out[:, block.index] = solve(V[:, block.index])
        return out

    return joined


class EigenFactor(NamedTuple):
    """``H_bb ≈ Q diag(w) Qᵀ``; ``complement``: ``Q`` has fewer columns than the block (rest sees 1/λ)."""

    Q: torch.Tensor
    w: torch.Tensor
    complement: bool


def eigen_blocks_ihvp(
    factors: list[EigenFactor],
    blocks: list[Block],
    damping: float,
    *,
    name: str,
    unflatten: Unflatten,
    like: torch.Tensor,
    info: dict | None = None,
    rule: RuleDamping | None = None,
) -> IHVP:
    """The :class:`IHVP` of per-block eigen-factorisations; ``with_damping`` reuses the factors.

    ``rule``: how ``damping`` was chosen when the caller passed ``damping=None`` (its entries go to ``info``
    of this closure, not of the re-damped ones).
    """
    low_rank = any(f.complement for f in factors)
    eigenvalues = factors[0].w if len(factors) == 1 else torch.cat([f.w for f in factors])

    def build(lam: float, rule: RuleDamping | None = None) -> IHVP:
        lam = check_damping(lam, allow_zero=not low_rank)
        check_conditioning(eigenvalues, lam, like.dtype, who=f"ihvp_{name}")
        solves = [(lambda V, f=f: eigen_solve(f.Q, f.w, lam, V, complement=f.complement)) for f in factors]
        return IHVP.make(
            join(solves, blocks),
            name=name,
            damping=lam,
            unflatten=unflatten,
            like=like,
            rebuild=build,
            info={"eigenvalues": eigenvalues, "blocks": blocks_info(name, blocks), **(info or {})},
            rule=rule,
        )

    return build(damping, rule)
