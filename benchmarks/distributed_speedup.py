"""Speed-up of ``torchrun --nproc-per-node=2`` over one rank: EK-FAC fitting, EK-FAC scores, CG scores.

    python benchmarks/distributed_speedup.py            # launches 1 and 2 gloo ranks (~1-2 min on 2 cores)
    python benchmarks/distributed_speedup.py --quick    # smaller problem

The script relaunches itself with ``python -m torch.distributed.run --nproc-per-node=W`` for W = 1, 2 (one
thread per rank, ``OMP_NUM_THREADS=1``), and every rank times, after a barrier, the same calls a user would
write for one process:

1. ``fit_kronecker_factors`` (EK-FAC: two passes over the data, eigendecompositions split by layer);
2. ``attribute`` with the EK-FAC closure (train chunks sharded, columns all-gathered on every rank);
3. ``attribute`` with ``ihvp_cg`` (damping 0.1, tol 1e-4; every curvature product sharded) — solving for
   the queries is the cost here, scoring itself is one product per chunk.

Reported: the slowest rank's wall-clock time, and its CPU time (less sensitive to other work on a shared
machine: the work each rank does, communication waits excluded). A rank is a process with one thread,
so two ranks on two cores is the ideal ×2; the redundant per-rank work (query gradients, the small
eigendecompositions and solves every rank repeats), the all-reduce / all-gather traffic and other load on
the machine eat into it. Reference figures are in the README ("Past one machine").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import ifunc


def problem(n: int, width: int, n_query: int):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    )
    x = torch.randn(n + n_query, 64, generator=gen)
    y = torch.randint(0, 10, (n + n_query,), generator=gen)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    train = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]
    return model, ifunc.params_of(model), loss, train, (x[n:], y[n:])


def worker(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, params, loss, train, query = problem(args.n_train, args.width, args.queries)
    times = {}

    def timed(name, fn):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        value = fn()
        cpu = time.process_time() - cpu
        dist.barrier()
        wall = [None] * dist.get_world_size()
        dist.all_gather_object(wall, (time.perf_counter() - start, cpu))
        times[name] = (max(w for w, _ in wall), max(c for _, c in wall))  # the slowest rank
        return value

    factors = timed("fit EK-FAC", lambda: ifunc.fit_kronecker_factors(loss, params, train, model=model))
    ekfac = ifunc.ihvp_ekfac(loss, params, factors, model=model, damping=1e-3)
    timed("scores EK-FAC", lambda: ifunc.attribute(loss, params, ekfac, train, query, progress=False))
    cg = ifunc.ihvp_cg(loss, params, train, damping=0.1, tol=1e-4)
    timed("scores CG", lambda: ifunc.attribute(loss, params, cg, train, query, progress=False))
    if dist.get_rank() == 0:
        with open(args.worker, "w") as f:
            json.dump(times, f)
    dist.barrier()  # every rank done before any tears the group down
    dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "times.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0",
            __file__,
            "--worker",
            result,
            *argv,
        ]
        subprocess.run(cmd, check=True, env=env)
        with open(result) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-train", type=int, default=None, help="training examples")
    parser.add_argument("--width", type=int, default=None, help="hidden width of the 3-layer tanh MLP")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n_train = args.n_train or (2048 if args.quick else 8192)
    args.width = args.width or (128 if args.quick else 256)
    if args.worker:
        return worker(args)
    argv = ["--n-train", str(args.n_train), "--width", str(args.width), "--queries", str(args.queries)]
    one, two = launch(1, argv), launch(2, argv)
    print(
        f"MLP 64-{args.width}-{args.width}-10, {args.n_train} training examples, {args.queries} queries, gloo, "
        f"one thread per rank"
    )
    print(f"{'step':<16}{'1 rank (s)':>12}{'2 ranks (s)':>13}{'speed-up':>10}   {'CPU s per rank, 1 / 2 ranks':>28}")
    for name in one:
        (w1, c1), (w2, c2) = one[name], two[name]
        print(f"{name:<16}{w1:>12.2f}{w2:>13.2f}{w1 / w2:>9.2f}x   {c1:>12.2f} / {c2:.2f} ({c1 / c2:.2f}x)")


if __name__ == "__main__":
    main()
