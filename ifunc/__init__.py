"""ifunc: influence functions for PyTorch as pure, composable transforms on torch.func.

Module map, bottom layer first (a module imports only from its own layer or below; ``tests/test_layering.py``
checks it):

0 base        ``functional`` params_of / call / flatten (optree) · ``_types`` type aliases · ``_data`` data sources,
              the one chunk loop ``iter_chunks``, the ``Partition`` of chunks over ranks and ``fingerprint`` ·
              ``_order`` data-order guards · ``_identity`` content hashes of a run (``_hash_walk`` the walk of code,
              closures and globals) · ``_errors`` readable torch.func errors · ``_progress`` progress bars ·
              ``_memory`` the byte budget and the one chunk cap · ``_version``
0 ranks       ``distributed`` collectives (world, all-reduce, broadcast, gather; ``_ranks`` the world and the
              shape/dtype handshakes); a leaf, no-ops on one process
1 store       ``store/`` HDF5 I/O only: ``scores`` (resumable, fingerprinted, checksummed score stores; ``_trust``
              their format, metadata, fingerprint and checksum checks), ``merge`` (per-rank stores), ``reading``
              (load_scores, top_k), ``_hdf5`` (locks, atomic creation, tensor files)
2 grads       ``grads`` the one per-example gradient primitive ``batch_grads`` (vmap(grad), NaN/inf guard)
2 loop        ``_score_loop`` the one loop of chunks × scorer × sink · ``_sinks`` the sink protocol, memory and
              gathered sinks · ``_store_sinks`` store and per-rank store sinks
3 curvature   ``likelihood`` output/loss split and the one label-sampler registry · ``curvature`` curvature
              operators (Hessian, GGN, Fisher, empirical Fisher) and dense matrices
4 solvers     ``ihvp/`` one file per method: ``explicit``, ``cg`` (``_cg_loop``), ``lissa`` (``_lissa_schedule``,
              ``_lissa_steps``), ``arnoldi``, ``nystrom``, ``datainf``, ``adam``, ``preconditioners``; ``_base``
              the IHVP closure (one constructor ``IHVP.make``, ``describe``, ``scorer``), ``_damping`` the one
              damping rule and conditioning check, ``_scorer`` the scorer protocol and the generic scorer,
              ``_operator`` the data operator sharded over ranks, ``_blocks``/``_eigen`` block-diagonal and eigen
              solves
4 kronecker   ``ihvp/kronecker/``: ``layers`` (one adapter per layer kind; ``example_dims`` each layer's example
              dimension from its call shapes), ``uses`` (per-token splits of diagonal-block parameters), ``hooks``
              (the one hook system), ``capture`` (the probe of each layer's example dimension and weight use),
              ``budget`` (chunks from the byte budget), ``fit`` (factors; ``cotangents`` the output directions of
              each curvature; ``eigenbases`` the eigendecompositions), ``factors`` (their type and files),
              ``blocks``, ``closure`` (KroneckerIHVP), ``methods`` (ekfac/kfac/diagonal/identity), ``scorer`` (the
              closure's scorer) over ``score`` (pairwise, per-module, self) and ``tokens`` (per-token),
              ``_kernels`` (contractions)
5 index       ``index/`` the gradient index: ``projection`` (seeded factored and dense projections), ``build``
              (build_index through the one loop into a score store), ``handle`` (open_index), ``query`` (an index
              where the training data stood)
5 scoring     ``attribute`` attribute / self_influence · ``_store_meta`` what a store records · ``ensemble`` ·
              ``quality`` · ``evaluate/`` measuring attribution against retraining (``metrics``: random subsets,
              LDS, leave-one-out, mislabel AUC; ``retraining``: the resumable retraining driver)
5 models      ``language`` LM losses and module choice · ``measurements`` query measurements · ``testing`` test
              problems, tiny language models and helpers
6 face        ``__init__`` re-exports · ``__main__`` ``python -m ifunc demo``
"""

from . import evaluate, language, measurements
from ._batches import UnreadChunk
from ._errors import CostWarning
from ._sinks import MemorySink, ScorePlan, Sink
from ._topk_sink import Extremes, HelpfulHarmful, Ranked, TopK
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
    ihvp_adam,
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
from .index import GradientIndex, ProjectedIHVP, build_index, ihvp_projected, open_index
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
    "ihvp_adam",
    "fit_kronecker_factors",
    "KroneckerFactors",
    "LayerFactors",
    "KroneckerIHVP",
    "capture_layer_grads",
    "per_sample_grads",
    "iter_per_sample_grads",
    "attribute",
    "self_influence",
    "build_index",
    "open_index",
    "GradientIndex",
    "ihvp_projected",
    "ProjectedIHVP",
    "Scorer",
    "ScoreOptions",
    "Sink",
    "ScorePlan",
    "MemorySink",
    "UnreadChunk",
    "TopK",
    "HelpfulHarmful",
    "Ranked",
    "Extremes",
    "attribute_ensemble",
    "load_scores",
    "top_k",
    "save_factors",
    "load_factors",
    "language",
    "evaluate",
    "CostWarning",
    "measurements",
]
