"""The Kronecker family: K-FAC, EK-FAC, diagonal and identity closures built from captured layer statistics.

``layers`` (one adapter per layer kind) → ``capture`` (the one hook system) → ``fit`` (factors, stored by
``factors``) → ``closure`` (:class:`KroneckerIHVP`) → ``score`` / ``tokens`` (pairwise, per-module, self and
per-token contractions used by :func:`ifunc.attribute`); ``_kernels`` holds the dense linear algebra.
"""

from .blocks import layout
from .capture import capture_layer_grads
from .closure import KroneckerIHVP, ihvp_diagonal, ihvp_ekfac, ihvp_identity, ihvp_kfac
from .factors import KroneckerFactors, LayerFactors, load_factors, save_factors
from .fit import fit_kronecker_factors
from .layers import LayerSpec, find_layers

__all__ = [
    "ihvp_ekfac",
    "ihvp_kfac",
    "ihvp_diagonal",
    "ihvp_identity",
    "KroneckerIHVP",
    "fit_kronecker_factors",
    "KroneckerFactors",
    "LayerFactors",
    "LayerSpec",
    "load_factors",
    "save_factors",
    "capture_layer_grads",
    "find_layers",
    "layout",
]
