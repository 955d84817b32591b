"""iHVP methods: one file per method, each returning an :class:`IHVP` closure."""

from ._base import IHVP, ConvergenceError
from .arnoldi import ihvp_arnoldi, lanczos
from .cg import CGResult, cg_solve, ihvp_cg
from .datainf import ihvp_datainf
from .explicit import ihvp_explicit, ihvp_from_matrix
from .kronecker import (
    KroneckerFactors,
    KroneckerIHVP,
    LayerFactors,
    capture_layer_grads,
    fit_kronecker_factors,
    ihvp_diagonal,
    ihvp_ekfac,
    ihvp_identity,
    ihvp_kfac,
    load_factors,
    save_factors,
)
from .lissa import LissaDivergenceError, LissaDivergenceWarning, ihvp_lissa
from .nystrom import ihvp_nystrom, nystrom_sketch
from .preconditioners import jacobi_preconditioner, nystrom_preconditioner

__all__ = [
    "IHVP",
    "ConvergenceError",
    "ihvp_explicit",
    "ihvp_from_matrix",
    "ihvp_cg",
    "cg_solve",
    "CGResult",
    "ihvp_lissa",
    "LissaDivergenceWarning",
    "LissaDivergenceError",
    "ihvp_arnoldi",
    "lanczos",
    "ihvp_nystrom",
    "nystrom_sketch",
    "jacobi_preconditioner",
    "nystrom_preconditioner",
    "ihvp_datainf",
    "ihvp_ekfac",
    "ihvp_kfac",
    "ihvp_diagonal",
    "ihvp_identity",
    "fit_kronecker_factors",
    "KroneckerFactors",
    "LayerFactors",
    "KroneckerIHVP",
    "capture_layer_grads",
    "load_factors",
    "save_factors",
]
