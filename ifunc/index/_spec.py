"""What a gradient-index projection is: its layers, its dense parameters and sizes, and its JSON description.

The maths and the row order are in :mod:`ifunc.index.projection`, which builds and applies these values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["DEFAULT_BLOCK", "ProjectedLayer", "Projection"]

KIND, VERSION = "gaussian layers, sign-hash dense", 2  #: what :meth:`Projection.describe` records

DEFAULT_BLOCK = 2**22  #: the dense sign hash draws its codes in blocks of this many coordinates


class ProjectedLayer(NamedTuple):
    """One layer of a projection: its module, kind, parameter names, weight-matrix sizes and ``(k_o, k_a)``."""

    name: str  #: qualified module name
    kind: str  #: layer kind (``ifunc.ihvp.kronecker.layers.KINDS``)
    weight: str
    bias: str | None  #: the tracked bias (the last column of the matrix), or None
    out_features: int
    in_features: int  #: weight-matrix columns without the bias
    k_o: int
    k_a: int

    @property
    def in_eff(self) -> int:
        """Matrix columns: ``in_features + 1`` with a tracked bias."""
        return self.in_features + (self.bias is not None)


class Projection(NamedTuple):
    """A projection ``ℝ^d -> ℝ^dim`` defined by its seed and sizes (maths: :mod:`ifunc.index.projection`)."""

    seed: int
    layers: tuple[ProjectedLayer, ...]
    dense: tuple[tuple[str, int], ...]  #: ``(parameter name, numel)`` in ``ifunc.functional.parameter_names`` order
    k_dense: int  #: rows of the dense sign hash ``S`` (0 when no parameter is dense)
    block: int = DEFAULT_BLOCK  #: ``S`` is drawn in blocks of this many coordinates per parameter (part of the map)
    excluded: tuple[str, ...] = ()  #: tracked parameters left out (they contribute nothing)

    @property
    def dim(self) -> int:
        """``Σ_layers k_o·k_a + k_dense``: the length of a projected vector."""
        return sum(L.k_o * L.k_a for L in self.layers) + self.k_dense

    def layer(self, name: str) -> ProjectedLayer:
        """The layer of module ``name``."""
        for L in self.layers:
            if L.name == name:
                return L
        raise ValueError(f"projection: no layer {name!r}; its layers are {[L.name for L in self.layers]}")

    def describe(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_description` turns back into this projection (what an index records)."""
        return {
            "kind": KIND,
            "version": VERSION,
            "seed": self.seed,
            "block": self.block,
            "layers": [L._asdict() for L in self.layers],
            "dense": [[n, k] for n, k in self.dense],
            "k_dense": self.k_dense,
            "excluded": list(self.excluded),
            "dim": self.dim,
        }

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> Projection:
        """The projection :meth:`describe` wrote. Raises ValueError for anything else."""
        if not isinstance(d, Mapping) or d.get("kind") != KIND or d.get("version") != VERSION:
            found = (d.get("kind"), d.get("version")) if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(
                f"not a projection description of this ifunc (expected kind {KIND!r}, version {VERSION}, got "
                f"{found}); an index made by another version must be rebuilt"
            )
        try:
            layers = tuple(ProjectedLayer(**L) for L in d["layers"])
            out = cls(int(d["seed"]), layers, tuple((str(n), int(k)) for n, k in d["dense"]), int(d["k_dense"]))
            excluded = d["excluded"]
            if not isinstance(excluded, list) or not all(isinstance(e, str) for e in excluded):
                raise TypeError(f"excluded must be a list of parameter names, got {excluded!r}")
            out = out._replace(block=int(d["block"]), excluded=tuple(excluded))
        except (KeyError, TypeError) as e:
            raise ValueError(f"projection description is incomplete or malformed: {e}") from None
        if out.dim != d.get("dim"):
            raise ValueError(f"projection description: dim {d.get('dim')} does not match its sizes ({out.dim})")
        if out.seed < 0 or out.block < 1 or any(min(L.k_o, L.k_a) < 1 for L in layers):
            raise ValueError(f"projection description has a negative seed, block or size: {dict(d)}")
        if out.describe() != dict(d):
            raise ValueError("projection description does not read back as written (a field was edited)")
        return out
