"""Kronecker factors as plain tensors (``KroneckerFactors``), and their HDF5 files.

A factor file records the parameter names, shapes and a fingerprint of the parameters the factors were
fitted on, so :func:`load_factors` refuses factors from another model. The file is written under a
temporary name and renamed into place (:mod:`ifunc.store` does the disk I/O).
"""

from __future__ import annotations

from typing import NamedTuple

import optree
import torch

from ... import store
from ..._data import params_fingerprint
from .._scorer import solve_dtype
from .layers import LayerSpec, kind_of

__all__ = ["LayerFactors", "KroneckerFactors", "save_factors", "load_factors", "dtype_name"]

FORMAT = "ifunc-factors"
_LAYER_FIELDS = ("A", "S", "eig_A", "Q_A", "eig_S", "Q_S", "diag", "ekfac")
#: always saved (``Q_A`` only for kinds whose input factor has an eigenbasis); ``A``, ``S`` (``keep_covariances=
#: False``), ``diag`` and ``ekfac`` (not fitted) may be absent
_REQUIRED_FIELDS = ("eig_A", "Q_A", "eig_S", "Q_S")


class LayerFactors(NamedTuple):
    """Factors of one layer, weight matrix layout ``[out, in(+1)]`` (bias as the last column).

    An ``nn.Embedding`` (one-hot inputs, ``in = vocab``) has a diagonal input factor: ``A`` and ``eig_A`` are the
    token frequencies ``[vocab]`` and ``Q_A`` is None (the identity), never a ``vocab × vocab`` matrix.
    """

    A: torch.Tensor | None  #: ``[in(+1), in(+1)]`` input covariance (None: fitted with ``keep_covariances=False``)
    S: torch.Tensor | None  #: ``[out, out]`` output-gradient covariance (None: as ``A``)
    eig_A: torch.Tensor  #: ``[in(+1)]`` eigenvalues of A (clamped at 0)
    Q_A: torch.Tensor | None  #: ``[in(+1), in(+1)]`` eigenvectors of A (None: the identity, a diagonal ``A``)
    eig_S: torch.Tensor  #: ``[out]``
    Q_S: torch.Tensor  #: ``[out, out]``
    diag: torch.Tensor | None  #: ``[out, in(+1)]`` ``E[DW²]``, the diagonal of the layer block (None: not fitted)
    ekfac: torch.Tensor | None  #: ``[out, in(+1)]`` ``E[(Q_Sᵀ DW Q_A)²]``, or None if not fitted


class KroneckerFactors(NamedTuple):
    """Everything :func:`ifunc.ihvp_ekfac` and friends need; plain tensors, strings and ints (storable)."""

    layers: tuple[LayerSpec, ...]
    factors: dict[str, LayerFactors]  #: module name -> factors
    fallback: dict[str, torch.Tensor]  #: parameter name -> ``E[(∂ℓ/∂θ)²]`` (parameter's shape)
    excluded: tuple[str, ...]  #: parameter names excluded by the user
    n: int  #: number of examples averaged over
    curvature: str
    #: dtype the eigendecompositions ran in (``"float32"`` / ``"float64"``); None: not recorded (a file saved by a
    #: release that did not record it, whose default was float64, or factors built by hand)
    eigen_dtype: str | None = None

    def __repr__(self) -> str:
        """Shapes, not values: ``KroneckerFactors(curvature='ggn', n=100, layers={'fc1': 'A [5, 5], S [16, 16]'})``."""

        def shape(t) -> str:
            return "[" + ", ".join(str(int(d)) for d in t.shape) + "]"

        layers = {}
        for spec in self.layers:
            f = self.factors.get(spec.name)
            if f is None:  # ihvp_identity's factors carry layer specs only
                layers[spec.name] = f"{spec.kind} [{spec.out_features}, {spec.in_features + (spec.bias is not None)}]"
                continue
            covariances = (("A", f.A), ("S", f.S)) if f.A is not None else (("Q_A", f.Q_A), ("Q_S", f.Q_S))
            named = (*covariances, ("diag", f.diag), ("ekfac", f.ekfac))
            parts = [f"{what} {shape(t)}" for what, t in named if t is not None]
            layers[spec.name] = ", ".join(parts)
        fallback = {k: shape(v) for k, v in self.fallback.items()}
        eig = "" if self.eigen_dtype is None else f", eigen_dtype={self.eigen_dtype!r}"
        return (
            f"KroneckerFactors(curvature={self.curvature!r}, n={self.n}, layers={layers}, fallback={fallback}, "
            f"excluded={self.excluded!r}{eig})"
        )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how factor files and metadata name a dtype."""
    return str(dtype).removeprefix("torch.")


def _param_signature(params) -> tuple[str, dict]:
    paths, leaves, _ = optree.tree_flatten_with_path(params, namespace="ifunc")
    shapes = {".".join(map(str, p)): list(leaf.shape) for p, leaf in zip(paths, leaves)}
    return params_fingerprint(params), shapes


def save_factors(path, factors: KroneckerFactors, params, *, overwrite: bool = False) -> None:
    """Save Kronecker factors (from :func:`ifunc.fit_kronecker_factors`) to HDF5.

    The file records the parameter names, shapes and a fingerprint of ``params`` (the model the factors
    were fitted on), so :func:`load_factors` can refuse factors from another model. The file is written
    under a temporary name and renamed into place: an existing file is never half-overwritten.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    digest, shapes = _param_signature(params)
    meta = {
        "params": digest,
        "shapes": shapes,
        "n": int(factors.n),
        "curvature": factors.curvature,
        "excluded": list(factors.excluded),
        "layers": [list(spec) for spec in factors.layers],
        "eigen_dtype": factors.eigen_dtype,
    }
    groups = {
        f"layers/{name}": {field: getattr(lf, field) for field in _LAYER_FIELDS} for name, lf in factors.factors.items()
    }
    groups["fallback"] = dict(factors.fallback)
    store.write_tensor_groups(path, FORMAT, meta, groups, overwrite=overwrite)


def load_factors(path, params, *, check_params: bool = True) -> KroneckerFactors:
    """Load Kronecker factors saved by :func:`save_factors`, validated against ``params``.

    Args:
      path: the ``.h5`` file.
      params: the parameters the factors will be used with (their dtype/device are used for the tensors; float32
        for half-precision parameters, as :func:`fit_kronecker_factors` returns them).
      check_params: also require the parameter *values* to match (fingerprint); names and shapes are
        always checked.

    Returns:
      :class:`KroneckerFactors`, usable as ``ifunc.ihvp_ekfac(loss, params, factors, model=...)``.

    Raises:
      ValueError: not a factor file, unreadable, or from another model (the message says what differs).
    """
    meta, groups = store.read_tensor_groups(path, FORMAT, "factor file")
    digest, shapes = _param_signature(params)
    if meta["shapes"] != shapes:
        missing = sorted(set(meta["shapes"]) ^ set(shapes))
        wrong = sorted(k for k in set(meta["shapes"]) & set(shapes) if meta["shapes"][k] != shapes[k])
        raise ValueError(
            f"{path} holds factors of another model: parameters only on one side {missing[:5]}, "
            f"shapes differ for {wrong[:5]}"
        )
    if check_params and meta["params"] != digest:
        raise ValueError(
            f"{path} was fitted on different parameter values (fingerprint {meta['params']} vs "
            f"{digest}); refit, or pass check_params=False to use them anyway"
        )
    like = optree.tree_leaves(params, namespace="ifunc")[0]  # dtype and device of the loaded tensors

    def to(a):
        return torch.from_numpy(a).to(device=like.device, dtype=solve_dtype(like.dtype))  # half params: float32

    layers = tuple(LayerSpec(*spec) for spec in meta["layers"])
    factors = {}
    for spec in layers:
        g = groups.get(f"layers/{spec.name}", {})
        basis = kind_of(spec).input_basis
        lacking = [k for k in _REQUIRED_FIELDS if k not in g and (basis or k != "Q_A")]
        if lacking:
            raise ValueError(f"{path} is damaged: the factors of layer {spec.name!r} lack {lacking}; refit them")
        factors[spec.name] = LayerFactors(
            A=to(g["A"]) if "A" in g else None,
            S=to(g["S"]) if "S" in g else None,
            eig_A=to(g["eig_A"]),
            Q_A=to(g["Q_A"]) if basis else None,
            eig_S=to(g["eig_S"]),
            Q_S=to(g["Q_S"]),
            diag=to(g["diag"]) if "diag" in g else None,
            ekfac=to(g["ekfac"]) if "ekfac" in g else None,
        )
    fallback = {name: to(a) for name, a in groups.get("fallback", {}).items()}
    excluded = tuple(meta["excluded"])
    return KroneckerFactors(layers, factors, fallback, excluded, meta["n"], meta["curvature"], meta.get("eigen_dtype"))
