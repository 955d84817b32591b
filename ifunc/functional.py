"""Functional parameters: read a module's parameters as a pytree, call it with others, flatten.

Everything here is pure: nothing reads parameters from the module when a pytree is given, and nothing
writes to the module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import optree
import torch
from torch import nn

from ._types import Params

__all__ = [
    "params_of",
    "call",
    "flatten",
    "structure",
    "flatten_func",
    "parameter_names",
    "check_eval_mode",
    "check_deterministic",
]


def params_of(
    model: nn.Module,
    *,
    trainable_only: bool = True,
    modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Detached copy-free view of a module's parameters as a ``dict`` name -> tensor.

    Args:
      model: any ``nn.Module``.
      trainable_only: keep only parameters with ``requires_grad=True`` (default).
      modules: restrict to the parameters of some sub-modules, given by their qualified names
        (``["fc1", "head"]``) or a predicate ``(name, module) -> bool``. A name selects the module and
        everything below it.

    Returns:
      ``{qualified_name: tensor}`` with tensors detached from autograd (they share storage with the
      module; ifunc never writes to them).

    Raises:
      ValueError: a requested module name does not exist, or nothing was selected.

    Example:
      >>> params = params_of(torch.nn.Linear(3, 2))
      >>> sorted(params)
      ['bias', 'weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"params_of expects an nn.Module, got {type(model).__name__}")
    selected: dict[str, torch.Tensor] = {}
    if modules is None:
        prefixes = None
    elif callable(modules):
        prefixes = [n for n, m in model.named_modules() if modules(n, m)]
    else:
        prefixes = list(modules)
        known = dict(model.named_modules())
        missing = [p for p in prefixes if p not in known]
        if missing:
            raise ValueError(f"params_of: no sub-module named {missing}; available: {sorted(k for k in known if k)}")
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if prefixes is not None and not any(pre == "" or name == pre or name.startswith(pre + ".") for pre in prefixes):
            continue
        selected[name] = p.detach()
    if not selected:
        raise ValueError("params_of: no parameters selected (check `modules` and `trainable_only`)")
    return selected


_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.RReLU)


def check_eval_mode(model: nn.Module, where: str = "ifunc.call") -> None:
    """Raise unless every sub-module that behaves differently in training is in eval mode.

    A BatchNorm in train mode would update its running statistics (the module would change) and mix the
    examples of a batch; Dropout / RReLU in train mode make every evaluation random, so two identical
    influence calls would differ. The curvature and gradients of a trained model are taken in eval mode.
    """
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase) or (isinstance(m, _STOCHASTIC) and getattr(m, "p", 1) > 0):
            raise ValueError(
                f"{where}: module {name or type(model).__name__!r} ({type(m).__name__}) is in train mode, so "
                "evaluating the model would change it or make the result random; call model.eval() before "
                "computing influence (nothing of the model was changed)"
            )


def call(model: nn.Module, params: dict[str, torch.Tensor], *args, **kwargs):
    """Run ``model(*args, **kwargs)`` with ``params`` in place of its parameters.

    A thin wrapper over ``torch.func.functional_call``: parameters not in ``params`` (and buffers) are
    taken from the module. The module itself is never modified: a model with BatchNorm, Dropout or RReLU
    in train mode is refused before the forward pass (:func:`check_eval_mode`). The forward must be
    deterministic: one that draws from the global RNG (``F.dropout(x, training=self.training)``, an attention
    dropout such as Llama's ``attention_dropout`` in train mode, any random op) is refused after it ran, with the
    global RNG put back where it was (:func:`check_deterministic`). Every ifunc loss runs its model here, so
    the generic methods and the Kronecker family get the same guard.

    Raises:
      TypeError: ``params`` is not a dict. ValueError: a train-mode module, or a random forward (call
        ``model.eval()``).
    """
    check_eval_mode(model)
    if not isinstance(params, dict):
        raise TypeError(
            "call(model, params, ...) needs params as a dict name -> tensor (from ifunc.params_of); "
            f"got {type(params).__name__}. For a flat vector use the `unflatten` from ifunc.flatten first."
        )
    before = _rng_states()
    out = torch.func.functional_call(model, params, args, kwargs, strict=False)
    check_deterministic(before, type(model).__name__)
    return out


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global CPU generator's state, and every CUDA device's once CUDA is in use."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


def check_deterministic(before: tuple[torch.Tensor, list[torch.Tensor]], what: str) -> None:
    """Raise ``ValueError`` when the global RNG moved since ``before`` (:func:`_rng_states`), after restoring it.

    ``call`` takes the states before the forward and checks them after it: two copies of the CPU generator's 5 KB
    state and a comparison, about 10 µs per forward — per chunk, not per example, since ``vmap`` runs the forward
    once for a whole chunk (under ``vmap`` a random op already raises, with ``randomness="error"``, before
    anything is drawn). Works under every torch.func transform (the states are compared as tensors).
    """
    cpu, cuda = before
    after_cuda = torch.cuda.get_rng_state_all() if cuda else []
    if torch.equal(torch.get_rng_state(), cpu) and all(torch.equal(a, b) for a, b in zip(after_cuda, cuda)):
        return
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    raise ValueError(
        f"ifunc.call: the forward pass of {what} drew random numbers from the global RNG, so every evaluation "
        "would differ (gradients, curvature and scores would not be reproducible): dropout in train mode outside "
        "a Dropout module (F.dropout(x, training=self.training), an attention dropout such as a Hugging Face "
        "model's attention_dropout) or another random operation. Call model.eval(), or make the forward "
        "deterministic (the global RNG was restored)"
    )


class Unflatten:
    """Inverse of :func:`flatten`: ``[d] -> pytree`` and ``[k, d] -> pytree of [k, *shape]``."""

    def __init__(self, treespec, shapes: list[torch.Size], dtypes: list[torch.dtype]):
        self.treespec = treespec
        self.shapes = shapes
        self.dtypes = dtypes
        self.sizes = [s.numel() for s in shapes]
        self.dim = sum(self.sizes)

    def __call__(self, vector: torch.Tensor) -> Params:
        if not isinstance(vector, torch.Tensor) or vector.dim() not in (1, 2) or vector.shape[-1] != self.dim:
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(f"unflatten: expected a vector [{self.dim}] or a stack [k, {self.dim}], got {shape}")
        lead = vector.shape[:-1]
        pieces = torch.split(vector, self.sizes, dim=-1)
        leaves = [p.reshape(tuple(lead) + tuple(s)) for p, s in zip(pieces, self.shapes)]
        return optree.tree_unflatten(self.treespec, leaves)

    def flatten_like(self, tree: Params, *, batched: bool | None = None) -> tuple[torch.Tensor, bool]:
        """Flatten a pytree with this structure to ``[d]`` or ``[k, d]``; returns ``(flat, batched)``."""
        leaves, spec = optree.tree_flatten(tree, namespace="ifunc")
        if spec != self.treespec:
            raise ValueError(
                f"pytree structure {spec} does not match the parameters' structure {self.treespec}; "
                "pass a tree with the same keys as params, or a flat vector"
            )
        if batched is None:
            batched = tuple(leaves[0].shape) != tuple(self.shapes[0])
        for leaf, shape in zip(leaves, self.shapes):
            want = shape if not batched else (leaves[0].shape[0], *shape)
            if tuple(leaf.shape) != tuple(want):
                raise ValueError(f"pytree leaf of shape {tuple(leaf.shape)} where {tuple(want)} was expected")
        if batched:
            flat = torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)
        else:
            flat = torch.cat([leaf.reshape(-1) for leaf in leaves])
        return flat, batched


def structure(params: Params) -> Unflatten:
    """The :class:`Unflatten` of ``params`` without copying them: what :func:`flatten` returns besides the vector.

    ``structure(params).dim`` is ``d``; ``.dtypes[0]`` the (one) dtype. Raises as :func:`flatten` does.
    """
    leaves, treespec = optree.tree_flatten(params, namespace="ifunc")
    if not leaves:
        raise ValueError("flatten: params is an empty pytree")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"flatten: every leaf must be a tensor, found {type(leaf).__name__}")
    dtypes = {leaf.dtype for leaf in leaves}
    devices = {leaf.device for leaf in leaves}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"flatten: parameters mix dtypes {sorted(map(str, dtypes))} / devices {sorted(map(str, devices))}; "
            "cast them to one (e.g. model.double()) first"
        )
    if devices == {torch.device("meta")}:
        raise ValueError(
            "flatten: the parameters are on the meta device (shapes without values); load or initialise the "
            "weights first (e.g. model.to_empty(device='cpu') and a state dict)"
        )
    return Unflatten(treespec, [leaf.shape for leaf in leaves], [leaf.dtype for leaf in leaves])


def flatten(params: Params) -> tuple[torch.Tensor, Unflatten]:
    """Flatten a pytree of tensors to one vector.

    Returns:
      ``(vector [d], unflatten)``: ``unflatten(vector)`` gives back the pytree, and
      ``unflatten(stack [k, d])`` gives a pytree whose leaves carry a leading ``k`` dimension.

    Raises:
      TypeError: a leaf is not a tensor; ValueError: leaves differ in dtype or device, or hold no values
        (meta device).

    Example:
      >>> flat, unflatten = flatten({"w": torch.ones(2, 3), "b": torch.zeros(2)})
      >>> flat.shape, unflatten(flat)["w"].shape
      (torch.Size([8]), torch.Size([2, 3]))
    """
    unflatten = structure(params)
    leaves = optree.tree_leaves(params, namespace="ifunc")
    return torch.cat([leaf.detach().reshape(-1) for leaf in leaves]), unflatten


def flatten_func(f: Callable, unflatten: Callable[[torch.Tensor], Params]) -> Callable:
    """``f(params, *args) -> f_flat(vector, *args)``, with ``vector`` the output of :func:`flatten`."""

    def f_flat(vector: torch.Tensor, *args, **kwargs):
        return f(unflatten(vector), *args, **kwargs)

    return f_flat


def parameter_names(tree) -> list[str]:
    """Dotted name of every leaf of a parameter pytree (or its :class:`Unflatten`), in :func:`flatten` order.

    ``""`` for a bare tensor; dict keys are sorted as optree sorts them.
    """
    if isinstance(tree, Unflatten):
        paths = optree.treespec_paths(tree.treespec)
    else:
        paths = optree.tree_paths(tree, namespace="ifunc")
    return [".".join(str(key) for key in path) for path in paths]
