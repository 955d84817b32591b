"""The Kronecker family: K-FAC, EK-FAC, diagonal and identity closures built from captured layer statistics.

``layers`` (one adapter per layer kind; ``example_dims`` which dimension holds the examples; ``uses`` for
per-token splits of diagonal blocks) → ``hooks`` (the one
hook system) → ``capture`` (the probe: each layer's example dimension, weights used only by their module, rows
that are their example's own; ``budget`` sizes the chunks) → ``fit`` (factors, stored by ``factors``;
eigendecompositions in ``eigenbases``) → ``closure``
(:class:`KroneckerIHVP`, built by ``methods``: ekfac / kfac / diagonal / identity) → ``scorer`` (the closure's
scorer, driven by :func:`ifunc.attribute` like any other) → ``score`` / ``tokens`` (pairwise, per-module, self and
per-token contractions); ``_kernels`` holds the dense linear algebra. Nothing outside the solvers imports this
package's modules: the scoring loop reaches them only through ``ihvp.scorer``.
"""

from .blocks import layout
from .capture import capture_layer_grads
from .closure import KroneckerIHVP
from .factors import KroneckerFactors, LayerFactors, load_factors, save_factors
from .fit import fit_kronecker_factors
from .layers import LayerSpec, find_layers
from .methods import ihvp_diagonal, ihvp_ekfac, ihvp_identity, ihvp_kfac

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
