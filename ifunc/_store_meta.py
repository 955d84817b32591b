"""What defines the scores of a score store, and how far resuming one can be trusted."""

from __future__ import annotations

import torch

from ._batches import tensor_leaves
from ._data import as_source, fingerprint, params_fingerprint
from ._identity import run_identity
from ._version import __version__
from .ihvp import describe_closure

__all__ = ["store_meta"]


def store_meta(
    loss, params, ihvp, query, measurement, query_rank, dtype, identity: str | None = None, normalize: str | None = None
) -> tuple[dict, dict]:
    """``(meta, resume)`` of a score store.

    ``meta`` holds the closure's own description (``ihvp.describe()``: method, damping per block, settings,
    a summary ``[numel, Σ|x|, Σx²]`` of each curvature tensor, its ``identity``), the measurement, query rank,
    score dtype, the normalisation (``"normalize"``: ``"cosine"`` or ``"relatif"``; absent for raw scores, as in
    every store written before normalised scores existed, so those still resume) and fingerprints of the parameters
    and queries; a store is resumed only under equal meta, so another normalisation is refused. ``defined_by``
    holds content hashes of the loss,
    the measurement and the model (a Kronecker closure's), or the user's ``identity``
    (:func:`ifunc._identity.run_identity`). Training data is fingerprinted chunk by chunk by the store sinks.
    ``resume`` (for :class:`ifunc.store.ScoreWriter`): ``refuse_resume`` for a callable that is not an ifunc
    closure and carries no ``identity`` (nothing tells two apart); ``warn_resume`` for a closure whose curvature
    data it does not record (CG and LiSSA record a fingerprint of it; DataInf does not).
    """
    described = describe_closure(ihvp)
    model = getattr(ihvp, "model", None)
    query_leaves = [t for b in as_source(query, name="query") for t in tensor_leaves(b)]
    meta = {
        "method": described["method"],
        "damping": described["damping"],
        "method_info": described["method_info"],
        "curvature": described["curvature"],
        "identity": described["identity"],
        "measurement": getattr(measurement or loss, "__qualname__", type(measurement or loss).__name__),
        "defined_by": run_identity(
            loss,
            measurement,
            model if isinstance(model, torch.nn.Module) else None,
            identity,
            tracked=params if isinstance(params, dict) else None,
        ),
        "query_rank": query_rank,
        "score_dtype": None if dtype is None else str(dtype),
        "params": params_fingerprint(params),
        "query": fingerprint(query_leaves),
        "versions": {"ifunc": __version__, "torch": torch.__version__},
    }
    if normalize is not None:
        meta["normalize"] = normalize
    resume = {}
    if described["data_recorded"] is None and described["identity"] is None:
        resume["refuse_resume"] = (
            f"ihvp is a custom callable ({meta['method']}), which ifunc cannot tell apart from another one, so its "
            "stored scores cannot be trusted to be this closure's. To make such a store resumable, set "
            "ihvp.identity = '<a name that changes whenever the closure does>' before the first run"
        )
    elif described["data_recorded"] is False:
        resume["warn_resume"] = (
            f"the file records this {meta['method']} closure's method, damping and settings but not the data its "
            "curvature was built on, so a change of that data cannot be detected; make sure it is the same (set "
            "ihvp.identity = '<a name for that data>' before the first run to have it checked)"
        )
    return meta, resume
