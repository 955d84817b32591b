"""Workload of tests/test_distributed.py: run under ``torchrun`` (a process group) or imported (one process).

``python -m torch.distributed.run --nproc-per-node=2 tests/distributed_worker.py OUT_DIR`` saves every
rank's results to ``OUT_DIR/rank{r}.pt``; the test computes the same with :func:`compute` in one process.
"""

import os
import sys

import torch

import ifunc
from ifunc.testing import mlp_problem


def problem():
    model, params, loss, (x, y) = mlp_problem(seed=3, sizes=(4, 6, 3), n=30)
    train = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 30, 7)]  # 5 batches of uneven size
    query = (x[:4] + 0.5, y[:4])
    return model, params, loss, train, query


def compute(out_dir) -> dict:
    """Factors (GGN and sampled Fisher), EK-FAC and CG scores, self-influence, and a score store."""
    model, params, loss, train, query = problem()
    res = {}
    for name, kw in {"ggn": {}, "fisher": {"sample": "categorical"}}.items():
        f = ifunc.fit_kronecker_factors(
            loss, params, train, model=model, chunk_size=4, generator=torch.Generator().manual_seed(1), **kw
        )
        res[f"n_{name}"] = f.n
        for layer, lf in f.factors.items():
            for field in ("A", "S", "eig_A", "eig_S", "diag", "ekfac"):
                res[f"{name}/{layer}/{field}"] = getattr(lf, field)
    ekfac = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1, chunk_size=4)
    cg = ifunc.ihvp_cg(loss, params, train, damping=0.1, tol=1e-12)
    for name, ihvp in (("ekfac", ekfac), ("cg", cg)):
        res[f"scores/{name}"] = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=4, progress=False)
        res[f"self/{name}"] = ifunc.self_influence(loss, params, ihvp, train, chunk_size=4, progress=False)
    others = {  # every other operator-based method goes through the same sharded curvature products
        "explicit": ifunc.ihvp_explicit(loss, params, train, damping=0.1),
        "arnoldi": ifunc.ihvp_arnoldi(loss, params, train, damping=0.1, rank=10),
        "nystrom": ifunc.ihvp_nystrom(loss, params, train, damping=0.1, rank=10),
        "lissa": ifunc.ihvp_lissa(
            loss,
            params,
            (torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])),
            damping=0.1,
            depth=30,
            batch_size=8,
        ),
    }
    for name, ihvp in others.items():
        res[f"scores/{name}"] = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=4, progress=False)
    path = os.path.join(out_dir, "scores.h5")
    ifunc.attribute(loss, params, cg, train, query, chunk_size=4, out=path, overwrite=True, progress=False)
    res["store/cg"] = torch.from_numpy(ifunc.load_scores(path))
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group("gloo")
    try:
        results = compute(sys.argv[1])
        torch.save(results, os.path.join(sys.argv[1], f"rank{torch.distributed.get_rank()}.pt"))
    finally:
        torch.distributed.destroy_process_group()
