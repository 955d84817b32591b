"""``ihvp_adam``: the diagonal curvature a training run's Adam / AdamW optimizer already holds.

Adam keeps, per parameter entry, ``v = exp_avg_sq`` (an exponential average of squared mini-batch gradients)
and steps along ``m̂ / (√v̂ + ε)`` with the bias-corrected ``v̂ = v / (1 − β₂^t)``. The closure inverts the
diagonal ``D = (√v̂ + ε)^{2p}``: ``p = 1`` (default) is ``(√v̂ + ε)²`` — ``v̂``, the running estimate of the
(mini-batch) Fisher diagonal — which is what TrackStar and bergson score with (each side divided by ``√v̂ + ε``);
``p = 1/2`` is Adam's own denominator, so ``D⁻¹ g`` is Adam's step direction for the gradient ``g``. Nothing is
fitted: the closure reads the state once, at build, and is then a :class:`~ifunc.ihvp.kronecker.KroneckerIHVP`
with identity bases, like :func:`ifunc.ihvp_diagonal` (same damping rule, conditioning check, ``with_damping``,
``describe`` and, with ``model=``, the fast Kronecker scorer).

Skeleton: validate (optimizer, options) → operator (the optimizer's state, matched to ``params``) → blocks
(layers of ``model``, else one diagonal block per parameter) → factorise (the diagonal, nothing else) → ``build(λ)``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import optree
import torch
from torch import nn

from .._types import Params
from ..functional import parameter_names, structure
from ._base import IHVP
from .kronecker.blocks import DiagBlock, KronBlock, gather
from .kronecker.closure import build_closure
from .kronecker.layers import find_layers

__all__ = ["ihvp_adam"]

_MISSING = ("error", "identity", "exclude")


def _check_optimizer(optimizer) -> None:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    kind = type(optimizer).__name__
    why = (
        "SGD keeps no second moment: use ifunc.ihvp_identity for plain gradient dot products, or ifunc.ihvp_diagonal "
        "for a diagonal fitted from data"
        if isinstance(optimizer, torch.optim.SGD)
        else "its state is not Adam's (exp_avg_sq with Adam's bias correction and denominator √v̂ + ε)"
        if isinstance(optimizer, torch.optim.Optimizer)
        else "it is not a torch.optim.Optimizer"
    )
    raise TypeError(f"ihvp_adam: optimizer must be a torch.optim.Adam or AdamW, got {kind}; {why}")


def _check_power(power) -> float:
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
        raise ValueError(
            f"ihvp_adam: power must be a finite number > 0 (0.5: Adam's √v̂ + ε; 1: (√v̂ + ε)², TrackStar), got {power!r}"
        )
    return float(power)


def _storage_key(t: torch.Tensor) -> tuple:
    """Where ``t``'s values live: a detached view (``ifunc.params_of``) has the key of its parameter."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _owners(params: dict[str, torch.Tensor], optimizer, model: nn.Module | None) -> tuple[dict, list[str]]:
    """``({name: (parameter, group)}, unmatched names)``: each leaf's optimizer parameter, by storage, else by
    name through ``model`` (for copies of the module's parameters)."""
    groups = {id(p): (p, g) for g in optimizer.param_groups for p in g["params"]}
    by_storage = {_storage_key(p): groups[id(p)] for p, _ in groups.values()}
    by_name = {} if model is None else dict(model.named_parameters())
    found, unmatched = {}, []
    for name, leaf in params.items():
        owner = by_storage.get(_storage_key(leaf))
        if owner is None and name in by_name and id(by_name[name]) in groups:
            owner = groups[id(by_name[name])]
        if owner is None:
            unmatched.append(name)
        else:
            found[name] = owner
    return found, unmatched


def _second_moment(name: str, leaf: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """Bias-corrected ``v̂`` of one parameter ``[*shape]`` in float64, checked against ``leaf``."""
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    v = state.get(key)
    if not isinstance(v, torch.Tensor):
        raise ValueError(
            f"ihvp_adam: the state of parameter {name!r} has no {key}"
            + (" (amsgrad=True keeps max_exp_avg_sq)" if key == "max_exp_avg_sq" else "")
            + f"; it holds {sorted(state)}: was it saved by another optimizer?"
        )
    if tuple(v.shape) != tuple(leaf.shape):
        raise ValueError(
            f"ihvp_adam: {key} of parameter {name!r} has shape {tuple(v.shape)} but the parameter has "
            f"{tuple(leaf.shape)}: the optimizer state belongs to another model (load the matching state_dict)"
        )
    if v.device != leaf.device:
        raise ValueError(
            f"ihvp_adam: {key} of parameter {name!r} is on {v.device} but params are on {leaf.device}; move the "
            "optimizer state (or params) to one device"
        )
    if not v.is_floating_point():
        raise TypeError(f"ihvp_adam: {key} of parameter {name!r} has dtype {v.dtype}; a second moment is floating")
    step = float(state.get("step", 0))
    if not step >= 1:
        raise ValueError(f"ihvp_adam: parameter {name!r} has Adam step {step:g}; its state is from no step")
    beta2 = float(group["betas"][1])
    v = v.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError(
            f"ihvp_adam: {key} of parameter {name!r} has non-finite or negative entries (training diverged?)"
        )
    return v / (1 - beta2**step)


def _diagonals(params: dict, optimizer, model, power: float, missing: str) -> tuple[dict, dict, tuple[str, ...]]:
    """``({name: D [*shape] (float64)}, {name: step}, names left out)`` with ``D = (√v̂ + ε)^{2p}``."""
    if not any(optimizer.state.values()):
        raise ValueError(
            "ihvp_adam: the optimizer has no state yet: take at least one optimizer.step() (or "
            "optimizer.load_state_dict(checkpoint)) before building the closure"
        )
    owners, unmatched = _owners(params, optimizer, model)
    stateless = [name for name, (p, _) in owners.items() if not optimizer.state.get(p)]
    if (unmatched or stateless) and missing == "error":
        problems = []
        if unmatched:
            how = "share storage with them (ifunc.params_of(model) does)" + (
                ", or pass model= to match copies by name" if model is None else " or be named as in model="
            )
            problems.append(f"{unmatched} are not among the optimizer's parameters (params must {how})")
        if stateless:
            problems.append(f"{stateless} have no optimizer state (they never received a gradient)")
        raise ValueError(
            f"ihvp_adam: parameters {' and '.join(problems)}; pass missing='identity' (curvature 1 there) or "
            "missing='exclude' (no influence through them), or add them to the optimizer"
        )
    diagonals, steps = {}, {}
    for name, leaf in params.items():
        if name in unmatched or name in stateless:
            if missing == "identity":
                diagonals[name] = torch.ones(leaf.shape, dtype=torch.float64, device=leaf.device)
            continue
        p, group = owners[name]
        state = optimizer.state[p]
        v_hat = _second_moment(name, leaf, state, group)
        diagonals[name] = (v_hat.sqrt() + float(group["eps"])) ** (2 * power)
        steps[name] = int(float(state["step"]))
    left_out = tuple(n for n in params if n not in diagonals)
    return diagonals, steps, left_out


def ihvp_adam(
    params: Params,
    optimizer: torch.optim.Optimizer,
    *,
    damping: float | None = None,
    power: float = 1.0,
    model: nn.Module | None = None,
    modules=None,
    missing: str = "error",
) -> IHVP:
    """Adam's second moments as a diagonal curvature: ``v -> (D + λI)^{-1} v`` with ``D = (√v̂ + ε)^{2p}``.

    Per parameter entry, ``v̂ = v / (1 − β₂^t)`` is the optimizer's bias-corrected second moment (``v =
    exp_avg_sq``, or ``max_exp_avg_sq`` for a group with ``amsgrad=True``, as Adam's own step uses), with the
    ``betas``, ``eps`` and ``step`` of that parameter's group and state. ``power = 1`` (default) gives ``D = (√v̂ +
    ε)² ≈ v̂``, the running estimate of the (mini-batch) Fisher diagonal: the scores of TrackStar (Chang et al. 2024)
    and bergson, which divide both gradients by ``√v̂ + ε``. ``power = 1/2`` makes ``D`` Adam's denominator ``√v̂ +
    ε``: at ``λ = 0``, ``D⁻¹ g`` is the direction Adam steps along for a gradient ``g`` (its preconditioner, read
    as a curvature). Scale: ``v̂`` averages squared *mini-batch mean* gradients, so ``D`` is not normalised like the
    other methods' curvature of the mean loss (it changes with the batch size of training); compare dampings
    across methods through the rule, not as numbers. Weight decay (Adam's or AdamW's) does not enter ``D``.

    The state is read once, at build: later optimizer steps do not change the closure. A flat ``v [d]`` gives
    ``[d]``, a stack ``[k, d]`` gives ``[k, d]``, a pytree like ``params`` the same pytree; each costs ``O(k d)``.

    Args:
      params: what you score with: a pytree of tensors, matched to the optimizer's parameters by storage (the
        detached views of :func:`ifunc.params_of` share it); with ``model=``, leaves that are copies (another dtype,
        moved values) are matched by their name in ``model.named_parameters()`` instead (needs a dict).
      optimizer: a ``torch.optim.Adam`` or ``AdamW`` after at least one step (or a loaded ``state_dict``).
      damping: λ >= 0 for every block, or ``None``: ``λ_b = 0.1 × mean(D_b)`` per block (a layer of ``model``, else
        each parameter), the rule of :func:`ifunc.ihvp_diagonal`. ``ε > 0`` keeps ``D > 0``, so 0 is allowed.
      power: ``p > 0`` in ``D = (√v̂ + ε)^{2p}``: 1 (default: TrackStar's ``v̂``), 0.5 (Adam's step).
      model: the ``nn.Module`` the loss calls: its supported layers become blocks (as in
        :func:`ifunc.ihvp_identity`; ``modules=`` chooses them), which enables the fast Kronecker scoring and
        ``per_module=True`` in :func:`ifunc.attribute`; also matches copied parameters by name.
      modules: with ``model``, the layers to track (names or a predicate); default every supported layer but
        ``nn.Embedding`` (tracked when named).
      missing: a leaf the optimizer does not hold, or holds without state (it never got a gradient):
        ``"error"`` (default), ``"identity"`` (``D = 1`` there) or ``"exclude"`` (a zero block: no influence).

    Returns:
      :class:`IHVP` (a :class:`~ifunc.ihvp.kronecker.KroneckerIHVP`) named ``"adam"``: ``info["blocks"]`` maps each
      parameter to ``("adam" | "identity" | "excluded", block)``, ``info["damping"]`` the λ of each block,
      ``info["steps"]`` each parameter's Adam step ``t``, ``info["power"]`` the power; ``with_damping(λ)`` is free.

    Raises:
      TypeError: ``optimizer`` is not an Adam / AdamW (SGD, RMSprop, ... are named), a state that is not floating.
      ValueError: no optimizer state yet; a parameter the optimizer does not hold or holds without state (with
        ``missing="error"``; named); a state of another shape or on another device than the parameter; a
        non-finite or negative second moment; a step < 1; a bad ``power``, ``missing`` or ``damping``.

    Example:
      >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
      >>> ...                                             # train: loss.backward(); opt.step()
      >>> params = ifunc.params_of(model)
      >>> ihvp = ifunc.ihvp_adam(params, opt, model=model)    # D = (√v̂ + ε)², λ by the damping rule
      >>> scores = ifunc.attribute(loss, params, ihvp, train, query)

    References:
      Kingma & Ba (2015), "Adam: a method for stochastic optimization";
      Chang et al. (2024), "Scalable influence and fact tracing for large language model pretraining" (TrackStar).
    """
    _check_optimizer(optimizer)
    power = _check_power(power)
    if missing not in _MISSING:
        raise ValueError(f"ihvp_adam: missing must be one of {list(_MISSING)}, got {missing!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"ihvp_adam: model= must be the nn.Module the loss calls, got {type(model).__name__}")
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "ihvp_adam: params is one tensor (a flat vector?), which cannot be matched to the optimizer's "
            "parameters; pass the pytree you score with, ifunc.params_of(model) (the closure still takes flat "
            "vectors [d] and stacks [k, d])"
        )
    unflatten = structure(params)  # checks the pytree (tensors, one dtype and device)
    names = parameter_names(unflatten)
    leaves = optree.tree_leaves(params, namespace="ifunc")
    named = dict(zip(names, leaves))
    diagonals, steps, left_out = _diagonals(named, optimizer, model, power, missing)

    flat = torch.cat([diagonals.get(n, leaf.new_zeros(leaf.shape, dtype=torch.float64)).reshape(-1)
                      for n, leaf in named.items()])  # fmt: skip
    offsets = dict(zip(names, itertools.accumulate(unflatten.sizes, initial=0)))
    if model is None:
        if modules is not None:
            raise ValueError("ihvp_adam: modules= chooses layers of model=; pass model= too, or drop modules=")
        layers, uncovered = [], [n for n in names if n not in left_out]
    else:
        kept = {n: leaf for n, leaf in named.items() if n not in left_out}
        layers, uncovered = find_layers(model, kept, modules=modules)

    def piece(name: str) -> slice:
        return slice(offsets[name], offsets[name] + named[name].numel())

    blocks = []
    for s in layers:
        blk = KronBlock(s, piece(s.weight), piece(s.bias) if s.bias else None, None, None, flat[:0])
        blocks.append(blk._replace(eigenvalues=gather(flat[None], blk)[0]))
    diags = [DiagBlock(n, n.rpartition(".")[0], piece(n), flat[piece(n)]) for n in uncovered]
    owner = {n: s.name for s in layers for n in (s.weight, s.bias) if n}
    owner.update({d.name: d.group for d in diags})
    kinds = {n: "adam" if n in steps else "identity" for n in diagonals}
    info: dict[str, Any] = {
        "blocks": {n: (kinds[n], owner[n]) if n in kinds else ("excluded", None) for n in names},
        "curvature": "adam",
        "power": power,
        "steps": steps,
        "optimizer": type(optimizer).__name__,
    }
    return build_closure("adam", params, blocks, diags, model if layers else None, damping, info)
