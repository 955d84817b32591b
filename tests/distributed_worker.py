"""Workload of tests/test_distributed.py: run under ``torchrun`` (a process group) or imported (one process).

``python -m torch.distributed.run --nproc-per-node=2 tests/distributed_worker.py OUT_DIR`` saves every
rank's results to ``OUT_DIR/rank{r}.pt``; the test computes the same with :func:`compute_all` in one process.
One launch covers every method in float32 and float64: the default dtype stays torch's own (float32), as in a
user's script, so a float64 model here is a ``.double()`` model in a float32 process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch

import ifunc
from ifunc import distributed
from ifunc._topk_sink import HelpfulHarmful
from ifunc.index import build_index
from ifunc.testing import mlp_problem

DTYPES = {"float32": torch.float32, "float64": torch.float64}
KRONECKER = ("ekfac", "kfac", "diagonal", "identity")
METHODS = (*KRONECKER, "ekfac_heuristic", "cg", "explicit", "arnoldi", "nystrom", "lissa", "datainf")
SELF = (*KRONECKER, "cg")  # self-influence: the Kronecker contractions and the generic rounds of block solves
FACTOR_FIELDS = ("A", "S", "eig_A", "eig_S", "Q_A", "Q_S", "diag", "ekfac")


def problem(dtype: torch.dtype = torch.float64):
    """A 4-6-3 MLP in ``dtype`` with 30 examples in 5 uneven batches (7, 7, 7, 7, 2) and 4 queries."""
    model, params, loss, (x, y) = mlp_problem(seed=3, sizes=(4, 6, 3), n=30, dtype=dtype)
    train = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 30, 7)]
    query = (x[:4] + 0.5, y[:4])
    return model, params, loss, train, query


class Branches(torch.nn.Module):
    """Two layers reading the same input (as an attention block's query, key and value projections do) and a head:
    their input covariances are equal bit for bit, so the fit decomposes that ``A`` once for both."""

    def __init__(self, dtype: torch.dtype, seed: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.left, self.right, self.head = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / p.shape[-1] ** 0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.left(x)) * torch.tanh(self.right(x)))


def branches_problem(dtype: torch.dtype = torch.float64):
    """``(model, params, loss, train)``: :class:`Branches` on the data of :func:`problem`."""
    _, _, _, train, _ = problem(dtype)
    model = Branches(dtype)
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]),
        lambda out, b: torch.nn.functional.cross_entropy(out, b[1], reduction="sum"),
    )
    return model, params, loss, train


def closures(model, params, loss, train) -> dict:
    """Every Kronecker method and the operator-based ones, each fitted from the data (under torchrun: sharded)."""
    dtype = next(iter(params.values())).dtype
    kron = {"model": model, "damping": 0.1, "chunk_size": 4}
    full = (torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]))
    cg = ifunc.ihvp_cg(loss, params, train, damping=0.1, tol=1e-12 if dtype == torch.float64 else 1e-6)
    # a name for the data its curvature is built on: a store of its scores then resumes checked, without a warning
    cg.identity = f"cg on distributed_worker.problem({dtype})"  # pyright: ignore[reportAttributeAccessIssue]
    return {
        "ekfac": ifunc.ihvp_ekfac(loss, params, train, **kron),
        "kfac": ifunc.ihvp_kfac(loss, params, train, **kron),
        "diagonal": ifunc.ihvp_diagonal(loss, params, train, **kron),
        "identity": ifunc.ihvp_identity(params, model=model, damping=0.1),
        "ekfac_heuristic": ifunc.ihvp_ekfac(loss, params, train, model=model, chunk_size=4),  # damping=None
        "cg": cg,
        "explicit": ifunc.ihvp_explicit(loss, params, train, damping=0.1),
        "arnoldi": ifunc.ihvp_arnoldi(loss, params, train, damping=0.1, rank=10),
        "nystrom": ifunc.ihvp_nystrom(loss, params, train, damping=0.1, rank=10),
        "lissa": ifunc.ihvp_lissa(loss, params, full, damping=0.1, depth=30, batch_size=8, tol=None),  # unchecked
        "datainf": ifunc.ihvp_datainf(loss, params, train, damping=0.1),
    }


@contextlib.contextmanager
def chunks_written():
    """``[count]`` of the score chunks ifunc logs as written (to any store or rank part) inside the block."""
    count = [0]

    class Count(logging.Handler):
        def emit(self, record):
            count[0] += "written" in record.getMessage()

    logger, handler = logging.getLogger("ifunc"), Count()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield count
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def beside_sorted(ends, full: torch.Tensor) -> dict:
    """A top-k sink's answer (``helpful_values``, ...) beside the first ``k`` columns of a stable sort of the full
    matrix (``sorted_helpful_values``, ...): what it must equal, ties broken by the lower index."""
    out = {}
    for end, descending in (("helpful", True), ("harmful", False)):
        got, order = getattr(ends, end), torch.sort(full, dim=1, descending=descending, stable=True)
        k = got.values.shape[1]
        out |= {f"{end}_values": got.values, f"{end}_indices": got.indices}
        out |= {f"sorted_{end}_values": order.values[:, :k], f"sorted_{end}_indices": order.indices[:, :k]}
    return out


def compute(out_dir, dtype: torch.dtype) -> dict:
    """Factors (GGN and sampled Fisher), pairwise scores of every method, self-influence, per-module and
    low-rank-query scores, and score stores, for the problem in ``dtype``."""
    model, params, loss, train, query = problem(dtype)
    res: dict = {}
    for name, kw in {"ggn": {}, "fisher": {"sample": "categorical"}}.items():
        f = ifunc.fit_kronecker_factors(
            loss, params, train, model=model, chunk_size=4, generator=torch.Generator().manual_seed(1), **kw
        )
        res[f"n_{name}"] = f.n
        for layer, lf in f.factors.items():
            for field in FACTOR_FIELDS:
                res[f"{name}/{layer}/{field}"] = getattr(lf, field)
    branches, bparams, bloss, btrain = branches_problem(dtype)  # shared input covariances: decomposed once
    shared = ifunc.fit_kronecker_factors(bloss, bparams, btrain, model=branches, chunk_size=4)
    for layer, lf in shared.factors.items():
        for field in FACTOR_FIELDS:
            res[f"shared/{layer}/{field}"] = getattr(lf, field)
    scoring = {"chunk_size": 4, "progress": False}
    for name, ihvp in closures(model, params, loss, train).items():
        res[f"scores/{name}"] = ifunc.attribute(loss, params, ihvp, train, query, **scoring)
        if name in SELF:
            res[f"self/{name}"] = ifunc.self_influence(loss, params, ihvp, train, **scoring)
        if name == "ekfac":
            res["modules/ekfac"] = ifunc.attribute(loss, params, ihvp, train, query, per_module=True, **scoring)
            res["lowrank/ekfac"] = ifunc.attribute(loss, params, ihvp, train, query, query_rank=2, **scoring)
        if name in ("ekfac", "cg") and dtype == torch.float32:  # the documented low-precision contraction
            low = ifunc.attribute(loss, params, ihvp, train, query, dtype=torch.bfloat16, **scoring)
            res[f"bf16/{name}"] = low
        if name in ("ekfac", "cg"):
            path = os.path.join(out_dir, f"scores_{name}_{str(dtype)[6:]}.h5")
            with chunks_written() as written:
                ifunc.attribute(loss, params, ihvp, train, query, out=path, overwrite=True, **scoring)
            res[f"written/{name}"] = written[0]
            with chunks_written() as written:  # the store is complete: a rerun computes and copies nothing
                ifunc.attribute(loss, params, ihvp, train, query, out=path, **scoring)
            res[f"rewritten/{name}"] = written[0]
            res[f"store/{name}"] = torch.from_numpy(ifunc.load_scores(path))
            ends = ifunc.attribute(loss, params, ihvp, train, query, sink=HelpfulHarmful(5), **scoring)  # per-rank best
            res[f"topk/{name}"] = beside_sorted(ends, res[f"scores/{name}"])
    index = os.path.join(out_dir, f"index_{str(dtype)[6:]}.h5")  # a gradient index: one layer captured, one dense
    sizes = {"layer_size": 2, "dense_size": 6, "chunk_size": 4, "overwrite": True, "progress": False}
    built = build_index(loss, params, train, index, model=model, modules=["2"], **sizes)
    res["store/index"] = built.matrix()
    ihvp = ifunc.ihvp_identity(params, damping=1.0)  # every rank reads the index, scores its own chunks
    ends = ifunc.attribute(loss, params, ihvp, built, query, sink=HelpfulHarmful(5), progress=False)
    res["topk/index"] = beside_sorted(ends, ifunc.attribute(loss, params, ihvp, built, query, progress=False))
    return res


def compute_all(out_dir) -> dict:
    """:func:`compute` for every dtype, keys prefixed ``float32/`` and ``float64/``."""
    return {f"{d}/{k}": v for d, dtype in DTYPES.items() for k, v in compute(out_dir, dtype).items()}


def _caught(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def collectives() -> dict:
    """The collectives' own promises, with ranks that disagree on purpose (the errors must reach every rank)."""
    rank = torch.distributed.get_rank()
    f32, f64 = torch.float32, torch.float64
    return {
        # the owner's result sets the dtype: placeholders in another dtype are cast (the float32 EK-FAC crash)
        "owner_map": distributed.owner_map(
            ["a", "b"],
            lambda x: (torch.full((3,), 1.5, dtype=f64), torch.full((2, 2), 2.5, dtype=f32)),
            lambda x: (torch.zeros(3, dtype=f32), torch.zeros(2, 2, dtype=f64)),
            [0, 1],
        ),
        "owner_map_shape": _caught(
            lambda: distributed.owner_map(["layer0"], lambda x: (torch.ones(3),), lambda x: (torch.zeros(4),), [0])
        ),
        "reduce_sum": _caught(
            lambda: distributed.reduce_sum([torch.ones(3, dtype=f32 if rank == 0 else f64)], ["layer '0' statistic A"])
        ),
        "gather_columns": _caught(lambda: distributed.gather_columns([torch.ones(2 + rank, 4)], [4, 4], [0, 1])),
        "broadcast": _caught(lambda: distributed.broadcast_from_rank0({"Q": torch.ones(4 + rank, 3)})),
        # a round with fewer blocks than ranks: rank 1 holds none, its rows come in rank 0's dtype (float64 here)
        "gather_rows": distributed.gather_rows(torch.ones(2, 3, dtype=f64) if rank == 0 else None, [2], 3),
    }


def split_by_hand() -> str:
    """What a rank holding only its own batches (as a DistributedSampler would hand them) is told."""
    _, params, loss, train, _ = problem()
    mine = train[torch.distributed.get_rank() :: 2]
    return _caught(lambda: ifunc.ihvp_cg(loss, params, mine, damping=0.1))


def params_by_rank() -> dict[str, str]:
    """What ranks holding other parameter values, or the same ones in another dtype, are told (each builder and
    attribute)."""
    _, params, loss, train, query = problem()
    rank = torch.distributed.get_rank()
    moved = {k: v + 1e-2 * rank for k, v in params.items()}  # rank 1 loaded another checkpoint
    other = {torch.float32: torch.float64, torch.float64: torch.float32}
    cast = {k: v.to(other[v.dtype]) if rank else v for k, v in params.items()}  # rank 1 cast its model
    ident = ifunc.ihvp_identity(params, damping=1.0)
    return {
        "values/cg": _caught(lambda: ifunc.ihvp_cg(loss, moved, train, damping=0.1)),
        "values/attribute": _caught(lambda: ifunc.attribute(loss, moved, ident, train, query, progress=False)),
        "dtype/cg": _caught(lambda: ifunc.ihvp_cg(loss, cast, train, damping=0.1)),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        results = compute_all(sys.argv[1])
        results["refused"] = split_by_hand()
        results["params_refused"] = params_by_rank()
        results["collectives"] = collectives()
        torch.save(results, os.path.join(sys.argv[1], f"rank{torch.distributed.get_rank()}.pt"))
        torch.distributed.barrier()  # both ranks done before either tears the group down
    finally:
        torch.distributed.destroy_process_group()
