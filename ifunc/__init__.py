"""ifunc: influence functions for PyTorch as pure, composable transforms on torch.func."""
from .attribute import attribute, self_influence
from .ensemble import attribute_ensemble
from .curvature import CurvatureOperator, curvature_operator, ggn, ggn_vp, hessian, hvp
from .likelihood import OutputLoss, output_loss
from .functional import call, flatten, flatten_func, params_of
from .grads import iter_per_sample_grads, per_sample_grads
from .ihvp import (IHVP, CGResult, ConvergenceError, LissaDivergenceWarning, cg_solve, ihvp_arnoldi, ihvp_cg,
                   ihvp_explicit, ihvp_from_matrix, ihvp_lissa, ihvp_datainf, ihvp_nystrom, jacobi_preconditioner,
                   lanczos, nystrom_preconditioner, nystrom_sketch)
from .ihvp import (KroneckerFactors, KroneckerIHVP, LayerFactors, capture_layer_grads, fit_kronecker_factors,
                   ihvp_diagonal, ihvp_ekfac, ihvp_identity, ihvp_kfac, load_factors, save_factors)
from . import language, measurements
from .quality import IHVPError, ihvp_error
from .store import load_scores, top_k

from ._version import __version__

__all__ = [
    "params_of", "call", "flatten", "flatten_func",
    "output_loss", "OutputLoss", "curvature_operator", "CurvatureOperator", "hvp", "ggn_vp", "hessian", "ggn",
    "IHVP", "ConvergenceError", "ihvp_explicit", "ihvp_from_matrix", "ihvp_cg", "cg_solve", "CGResult",
    "ihvp_lissa", "LissaDivergenceWarning", "ihvp_arnoldi", "lanczos",
    "ihvp_nystrom", "nystrom_sketch", "jacobi_preconditioner", "nystrom_preconditioner",
    "ihvp_datainf", "ihvp_error", "IHVPError",
    "ihvp_ekfac", "ihvp_kfac", "ihvp_diagonal", "ihvp_identity", "fit_kronecker_factors", "KroneckerFactors",
    "LayerFactors", "KroneckerIHVP", "capture_layer_grads",
    "per_sample_grads", "iter_per_sample_grads",
    "attribute", "self_influence", "attribute_ensemble",
    "load_scores", "top_k", "save_factors", "load_factors",
    "language", "measurements",
]
