"""The dimension of a tracked layer's input that indexes the examples, from its call shapes.

The examples may lie along any dimension of a layer's input but the features' (``[batch, ..., in]``, or
sequence-first ``[T, batch, in]``, e.g. ``nn.TransformerEncoderLayer(batch_first=False)``; the layer kind says which
dimensions may, :meth:`~ifunc.ihvp.kronecker.layers.LayerKind.example_dims`). :func:`example_dim` finds it from the
call shapes on one example and on two: the one dimension of size 1 for one example and 2 for two, the same in every
call. An input without one (examples flattened with positions, ``x.reshape(b * T, d)``, or shared by the batch) is
refused with :class:`~ifunc.ihvp.kronecker.layers.ExampleDimError`. :func:`settled_dim` reads the found dimension
back when a call is captured (any dimension of size 1 while only one example has been seen).
"""

from __future__ import annotations

import torch

from .layers import ExampleDimError, LayerSpec, kind_of

__all__ = ["example_dim", "settled_dim"]


def settled_dim(spec: LayerSpec, x: torch.Tensor, examples: int | None) -> int:
    """The example dimension of a call's input (or output) ``x``: the spec's, or while it is undecided (one example
    seen so far) the first dimension of size 1 that may index the examples, which is as good as any for one example.

    Raises:
      ExampleDimError: the dimension is undecided and the batch holds two or more examples.
    """
    if spec.batch_dim is not None:
        return spec.batch_dim
    if examples is not None and examples > 1:
        raise ExampleDimError(
            f"layer capture: the example dimension of {spec.name!r} is undecided (found on one example only) and the "
            f"batch holds {examples}; probe the layers on two examples first"
        )
    return next((d for d in kind_of(spec).example_dims(x.dim()) if x.shape[d] == 1), 0)


def example_dim(spec: LayerSpec, one: list, two: list | None) -> int | None:
    """The dimension of the layer's input that indexes the examples, from its call shapes on one and two examples.

    With one example only (``two=None``) it stays undecided (None) once a dimension of size 1 exists.
    """
    kind = kind_of(spec)
    fix = (
        "keep a [batch, ...] (or sequence-first [T, batch, ...]) shape up to this layer (e.g. x.reshape(b, T, d), "
        "not x.reshape(b * T, d)), or leave the layer out of the Kronecker blocks with modules= (its parameters then "
        "get a diagonal block) or exclude= it"
    )
    seen = f"input shapes per call {one} with 1 example" + ("" if two is None else f" and {two} with 2 examples")
    if two is not None and len(one) != len(two):
        raise ExampleDimError(
            f"layer capture: {spec.name!r} is called {len(one)} times for 1 example and {len(two)} "
            f"for 2 ({seen}); the calls of a tracked layer must not depend on the batch size; {fix}"
        )
    dims = set()
    for c, s1 in enumerate(one):
        allowed = kind.example_dims(len(s1))
        if two is None:  # one example only: a dimension of size 1 (0 first)
            found = [d for d in allowed if s1[d] == 1][:1]
        else:
            s2 = two[c]
            changed = [d for d in range(len(s1)) if len(s1) != len(s2) or s1[d] != s2[d]]
            found = (
                changed
                if len(changed) == 1 and changed[0] in allowed and (s1[changed[0]], s2[changed[0]]) == (1, 2)
                else []
            )
        if not found:
            raise ExampleDimError(
                f"layer capture: the input of {spec.name!r} has no dimension of the examples ({seen}: no dimension has "
                "size 1 for one example and 2 for two, so the examples are flattened together with positions, or the "
                f"input is shared by the whole batch); {fix}"
            )
        dims.add(found[0])
    if len(dims) != 1:
        raise ExampleDimError(
            f"layer capture: the calls of {spec.name!r} index the examples along different dimensions {sorted(dims)} "
            f"({seen}); {fix}"
        )
    return None if two is None else dims.pop()
