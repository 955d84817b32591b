"""ifunc: influence functions for PyTorch as pure, composable transforms on torch.func.

Module map, bottom layer first (a module imports only from its own layer or below; ``tests/test_layering.py``
checks it):

0 base        ``functional`` params_of / call / flatten (optree) · ``_types`` type aliases · ``_data`` data sources,
              the one chunk loop ``iter_chunks`` and ``fingerprint`` · ``_errors`` readable torch.func errors ·
              ``_progress`` progress bars · ``_memory`` the byte budget (one example measured) ·
              ``_version``
0 ranks       ``distributed`` collectives (world, all-reduce, broadcast, gather); a leaf, no-ops on one process
1 store       ``store/`` HDF5 I/O only: ``scores`` (resumable, fingerprinted, checksummed score stores), ``merge``
              (per-rank stores), ``reading`` (load_scores, top_k), ``_hdf5`` (locks, atomic creation, tensor files)
2 grads       ``grads`` the one per-example gradient primitive ``batch_grads`` (vmap(grad), NaN/inf guard)
3 curvature   ``likelihood`` output/loss split and the one label-sampler registry · ``curvature`` curvature
              operators (Hessian, GGN, Fisher, empirical Fisher) and dense matrices
4 solvers     ``ihvp/`` one file per method: ``explicit``, ``cg``, ``lissa``, ``arnoldi``, ``nystrom``,
              ``datainf``, ``preconditioners``; ``_base`` the IHVP closure, ``_operator`` the data operator
              sharded over ranks, ``_blocks``/``_eigen`` block-diagonal and eigen solves;
              ``ihvp/kronecker/``: ``layers`` (one adapter per layer kind), ``uses`` (per-token splits of
              diagonal-block parameters), ``capture`` (the one hook system), ``budget`` (chunks from the byte
              budget), ``fit`` (factors; ``cotangents`` the output
              directions of each curvature), ``factors`` (their type and files), ``blocks``, ``closure``
              (KroneckerIHVP), ``methods`` (ekfac/kfac/diagonal/identity), ``score`` (pairwise, per-module,
              self), ``tokens`` (per-token), ``_kernels`` (contractions)
5 scoring     ``attribute`` attribute / self_influence: one loop of scorer × sink · ``_scorers`` generic and
              Kronecker scorers · ``_sinks`` memory, store, gathered, per-rank store · ``ensemble`` · ``quality``
5 models      ``language`` LM losses and module choice · ``measurements`` query measurements · ``testing``
              test problems and helpers
6 face        ``__init__`` re-exports · ``__main__`` ``python -m ifunc demo``
"""

from . import language, measurements
from ._sinks import MemorySink, ScorePlan, Sink
from ._version import __version__
from .attribute import attribute, self_influence
from .curvature import CurvatureOperator, curvature_operator, ggn, ggn_vp, hessian, hvp
from .ensemble import attribute_ensemble
from .functional import call, flatten, flatten_func, params_of
from .grads import iter_per_sample_grads, per_sample_grads
from .ihvp import (
    IHVP,
    CGResult,
    ConvergenceError,
    KroneckerFactors,
    KroneckerIHVP,
    LayerFactors,
    LissaDivergenceError,
    ScoreOptions,
    Scorer,
    capture_layer_grads,
    cg_solve,
    fit_kronecker_factors,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_datainf,
    ihvp_diagonal,
    ihvp_ekfac,
    ihvp_explicit,
    ihvp_from_matrix,
    ihvp_identity,
    ihvp_kfac,
    ihvp_lissa,
    ihvp_nystrom,
    jacobi_preconditioner,
    lanczos,
    load_factors,
    nystrom_preconditioner,
    nystrom_sketch,
    save_factors,
)
from .likelihood import OutputLoss, output_loss
from .quality import IHVPError, ihvp_error
from .store import load_scores, top_k

__all__ = [
    "__version__",
    "params_of",
    "call",
    "flatten",
    "flatten_func",
    "output_loss",
    "OutputLoss",
    "curvature_operator",
    "CurvatureOperator",
    "hvp",
    "ggn_vp",
    "hessian",
    "ggn",
    "IHVP",
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
    "ihvp_error",
    "IHVPError",
    "ihvp_ekfac",
    "ihvp_kfac",
    "ihvp_diagonal",
    "ihvp_identity",
    "fit_kronecker_factors",
    "KroneckerFactors",
    "LayerFactors",
    "KroneckerIHVP",
    "capture_layer_grads",
    "per_sample_grads",
    "iter_per_sample_grads",
    "attribute",
    "self_influence",
    "Scorer",
    "ScoreOptions",
    "Sink",
    "ScorePlan",
    "MemorySink",
    "attribute_ensemble",
    "load_scores",
    "top_k",
    "save_factors",
    "load_factors",
    "language",
    "measurements",
]
