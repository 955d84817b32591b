"""The gradient index: every training gradient compressed once by a seeded random projection, queried many times.

``projection`` defines the map (seeded Gaussian ``P_o ⊗ P_a`` per layer, one seeded sign hash ``S`` for the other
parameters) on captured layer inputs/output-gradients, on matrices and on flat vectors; it holds no state and does
no I/O.
``build`` projects every training gradient once into a resumable score store (:func:`build_index`); ``handle``
reopens it read-only and reads its rows chunk by chunk (:func:`open_index`, :class:`GradientIndex`); ``query``
lets an index stand where the training data stood in :func:`ifunc.attribute` (the closure's preconditioned queries,
projected, against the stored rows); ``curvature`` fits the curvature of the index's own coordinates
(:func:`ihvp_projected`, block-diagonal over its layers), which needs no parameter-space solve and gives self-influence
from the index alone.
"""

from .build import build_index
from .curvature import ProjectedIHVP, ProjectedScorer, ihvp_projected, projected_blocks
from .handle import GradientIndex, open_index
from .projection import (
    ProjectedLayer,
    Projection,
    layer_matrices,
    make_projection,
    project_captured,
    project_dense,
    project_flat,
    project_layer,
    project_matrix,
)
from .query import IndexScorer, check_index_params, index_source

__all__ = [
    "ProjectedLayer",
    "Projection",
    "make_projection",
    "layer_matrices",
    "project_layer",
    "project_matrix",
    "project_dense",
    "project_captured",
    "project_flat",
    "build_index",
    "open_index",
    "GradientIndex",
    "IndexScorer",
    "index_source",
    "check_index_params",
    "ihvp_projected",
    "ProjectedIHVP",
    "ProjectedScorer",
    "projected_blocks",
]
