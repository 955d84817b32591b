"""iHVP methods: one file per method, each returning an :class:`IHVP` closure that brings its own scorer.

Besides the methods, the scoring layer takes from here what a closure offers it: the scorer protocol
(:class:`Scorer`, :class:`ScoreOptions`, :func:`scorer_for`) and the process group's share of the data
(:func:`rank_partition`, :func:`check_same_data`), and the damping rule of a block of curvature
(:func:`block_damping`, :func:`check_conditioning`).
"""

from ._base import IHVP, ConvergenceError, describe_closure
from ._damping import block_damping, check_conditioning
from ._operator import check_same_data, rank_partition
from ._scorer import GenericScorer, ScoreOptions, Scorer, scorer_for, solve_dtype
from .adam import ihvp_adam
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
from .lissa import LissaDivergenceError, ihvp_lissa
from .nystrom import ihvp_nystrom, nystrom_sketch
from .preconditioners import jacobi_preconditioner, nystrom_preconditioner

__all__ = [
    "IHVP",
    "describe_closure",
    "Scorer",
    "ScoreOptions",
    "GenericScorer",
    "scorer_for",
    "solve_dtype",
    "rank_partition",
    "check_same_data",
    "block_damping",
    "check_conditioning",
    "ConvergenceError",
    "ihvp_explicit",
    "ihvp_from_matrix",
    "ihvp_cg",
    "cg_solve",
    "CGResult",
    "ihvp_lissa",
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
    "ihvp_adam",
    "fit_kronecker_factors",
    "KroneckerFactors",
    "LayerFactors",
    "KroneckerIHVP",
    "capture_layer_grads",
    "load_factors",
    "save_factors",
]
