"""Query speed of a large gradient index: 100 queries, exact top-10, against 1,000,000 stored examples.

Workload: the index the million-example MLP 784-512-512-10 (``benchmarks/million.py``) would have with
``build_index(model=...)`` and the default ``layer_size=16``: ``dim = 16·16 + 16·16 + 10·16 = 672`` coordinates
(checked with :func:`ifunc.index.make_projection` on that model). Its rows are random: the file is written by
:func:`ifunc.index.build_index` (the real writer: a valid, checksummed index) on a model whose per-example gradient
is its input, ``loss(w, x) = Σ_i x_i·w``, with an identity dense projection of ``dim`` coordinates, so row ``i`` is
example ``i``, drawn from a generator seeded with its block. The creation is timed on its own (a child process).

The query, in a fresh process after one warm-up call of torch.func (its first call imports ``torch._dynamo``,
seconds of one-time cost, printed apart): ``attribute(loss, params, ihvp_identity, index, query, sink=TopK(10))``; the
closure's preconditioned queries ``[100, dim]`` are multiplied with every stored chunk of rows and each chunk's
scores merged into the running top-10 (flat memory: one block of rows and ``[100, chunk]`` scores at a time).
Printed: seconds, rows/s, bytes read/s, peak RSS, load average before and after, and the floors of this machine:
bytes ÷ the file's measured sequential read rate (page cache when the file is cached), FLOPs ÷ the measured
``[100, dim] × [dim, chunk]`` matmul rate; then a profile of one pass split into HDF5 reads + checksums, matmul
and top-k merge.

Usage:
  python benchmarks/index_query.py                       # builds /tmp/index_query.h5 once (~3 GB), then queries
  python benchmarks/index_query.py --n 100000 --out /tmp/small.h5 --rebuild
  python benchmarks/index_query.py --threads 1           # a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import ifunc  # noqa: E402
from ifunc._chunks import Partition  # noqa: E402
from ifunc._data import DataSource  # noqa: E402
from ifunc._sinks import ScorePlan  # noqa: E402
from ifunc._topk_sink import TopK  # noqa: E402  (to be ifunc.TopK)
from ifunc.index import build_index, make_projection, open_index  # noqa: E402
from ifunc.store.reading import read_blocks  # noqa: E402

BLOCK, N_QUERY, K, SIZES = 4096, 100, 10, (784, 512, 512, 10)


def million_dim(layer_size: int = 16) -> int:
    """Coordinates per example of ``build_index(model=MLP 784-512-512-10, layer_size=16)`` (no dense part)."""
    from ekfac import mlp

    model = mlp(SIZES)
    params = ifunc.params_of(model)
    closure = ifunc.ihvp_identity(params, model=model)
    spec = [blk.spec for blk in closure.blocks]  # pyright: ignore[reportAttributeAccessIssue]
    return make_projection(params, spec, seed=0, layer_size=layer_size, dense_size=256).dim


class Rows(Dataset):
    """Example ``i`` is row ``i mod BLOCK`` of block ``i // BLOCK``, standard normal from a generator seeded by it."""

    def __init__(self, n: int, dim: int):
        self.n, self.dim = n, dim

    def __len__(self) -> int:
        return self.n

    def block(self, k: int) -> torch.Tensor:
        return torch.randn(BLOCK, self.dim, generator=torch.Generator().manual_seed(k))

    def __getitems__(self, idx: list[int]) -> torch.Tensor:
        first = idx[0] // BLOCK
        rows = torch.cat([self.block(k) for k in range(first, idx[-1] // BLOCK + 1)])
        return rows[idx[0] - first * BLOCK : idx[-1] - first * BLOCK + 1]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.block(i // BLOCK)[i % BLOCK]


def linear_loss(p, x):
    """``Σ_i x_i·w``: the per-example gradient of example ``x_i`` is ``x_i`` itself."""
    return (x @ p["w"]).sum()


def problem(dim: int):
    """Parameters ``w [dim]`` (float32), the loss, the identity closure and 100 seeded queries ``[100, dim]``."""
    params = {"w": torch.zeros(dim)}
    query = torch.randn(N_QUERY, dim, generator=torch.Generator().manual_seed(-1 % 2**63))
    return params, linear_loss, ifunc.ihvp_identity(params, damping=1.0), query


def build(args) -> None:
    """Write the index of ``args.n`` random rows (resumes an unfinished one); prints JSON with the seconds."""
    params, loss, _, _ = problem(args.dim)
    data = DataLoader(Rows(args.n, args.dim), batch_size=BLOCK, shuffle=False, collate_fn=lambda b: b)
    t0 = time.perf_counter()
    index = build_index(
        loss,
        params,
        data,
        args.out,
        dense_size=args.dim,
        chunk_size=args.chunk,
        identity="benchmarks/index_query.py: rows are the examples",
        overwrite=args.rebuild,
        progress=False,
    )
    print(json.dumps({"build_s": time.perf_counter() - t0, "n": index.n, "dim": index.dim, "chunk": index.chunk}))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def query(args) -> dict:
    """``attribute(..., index, query, sink=TopK(10))`` timed; the answer's shape and order checked."""
    index = open_index(args.out)
    params, loss, ihvp, queries = problem(index.dim)
    t0 = time.perf_counter()
    ifunc.per_sample_grads(loss, params, queries[:2])  # the first torch.func call imports torch._dynamo (seconds)
    warm_up, rss_before = time.perf_counter() - t0, peak_rss_mb()
    t0 = time.perf_counter()
    best = ifunc.attribute(loss, params, ihvp, index, queries, sink=TopK(K), progress=False)
    seconds = time.perf_counter() - t0
    assert best.values.shape == (N_QUERY, K) and bool((best.values[:, :-1] >= best.values[:, 1:]).all())
    return {
        "query_s": seconds,
        "warm_up_s": warm_up,
        "rss_before_mb": rss_before,
        "n": index.n,
        "dim": index.dim,
        "chunk": index.chunk,
    }


def read_rate(path: str) -> float:
    """Bytes/s of a plain sequential read of the file into one reused 64 MiB buffer (page cache when cached)."""
    buf = bytearray(1 << 26)
    total, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            total += got
    return total / (time.perf_counter() - t0)


def matmul_rate(dim: int, chunk: int, repeats: int = 20) -> float:
    """FLOP/s of the query's product ``[100, dim] × [dim, chunk]`` (float32), median of ``repeats``."""
    q, rows = torch.randn(N_QUERY, dim), torch.randn(dim, chunk)
    torch.mm(q, rows)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(q, rows)
        times.append(time.perf_counter() - t)
    return 2 * N_QUERY * dim * chunk / sorted(times)[repeats // 2]


def profile(args) -> dict:
    """One pass split by stage: HDF5 reads alone, reads + CRC-32 checks, the matmuls, the top-k merges."""
    index = open_index(args.out)
    out: dict = {}
    for name, verify in (("read_s", False), ("read_and_crc_s", True)):
        t0 = time.perf_counter()
        for _ in read_blocks(args.out, verify=verify, block=None if verify else index.chunk * 3):
            pass
        out[name] = time.perf_counter() - t0
    q, rows = torch.randn(N_QUERY, index.dim), torch.randn(index.dim, index.chunk)
    n_chunks = -(-index.n // index.chunk)
    t0 = time.perf_counter()
    for _ in range(n_chunks):
        torch.mm(q, rows)
    out["matmul_s"] = time.perf_counter() - t0
    sink, gen, merging = TopK(K), torch.Generator().manual_seed(0), 0.0
    sink.open(ScorePlan(N_QUERY, index.chunk, Partition(), DataSource(torch.zeros(index.n, 0))))
    for i in range(n_chunks):  # fresh exchangeable scores per chunk, drawn outside the timer
        block = torch.randn(N_QUERY, index.chunk, generator=gen)
        sink.seen(i, torch.zeros(index.chunk, 0))
        t0 = time.perf_counter()
        sink.put(i, block)
        merging += time.perf_counter() - t0
    out["topk_s"] = merging
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", default="/tmp/index_query.h5")
    parser.add_argument("--chunk", type=int, default=8192, help="examples per stored chunk of a new index")
    parser.add_argument("--rebuild", action="store_true", help="write the index again even if it exists")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--mode", choices=["main", "build"], default="main", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dim = million_dim()
    if args.mode == "build":
        return build(args)
    print(f"load average at start {os.getloadavg()}, {torch.get_num_threads()} threads, dim {args.dim}")
    made = None
    if args.rebuild or not os.path.exists(args.out):  # in a child: its memory is not this process's peak
        cmd = [sys.executable, __file__, "--mode", "build", "--n", str(args.n), "--out", args.out]
        cmd += ["--chunk", str(args.chunk)] + (["--rebuild"] if args.rebuild else [])
        made = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"index written in {made['build_s']:.1f} s ({made['n'] / made['build_s']:,.0f} rows/s)")
    res = query(args)
    nbytes = os.path.getsize(args.out)
    s = res["query_s"]
    flops = 2 * N_QUERY * res["dim"] * res["n"]
    disk, mm = read_rate(args.out), matmul_rate(res["dim"], res["chunk"])
    print(
        f"{N_QUERY} queries, exact top-{K}, {res['n']:,} rows × {res['dim']} (chunks of {res['chunk']}): {s:.2f} s, "
        f"{res['n'] / s:,.0f} rows/s, {nbytes / s / 1e9:.2f} GB/s read; peak RSS {peak_rss_mb():.0f} MB "
        f"({res['rss_before_mb']:.0f} MB before the query; load average {os.getloadavg()})"
    )
    print(f"(not counted: the process's first torch.func call, {res['warm_up_s']:.2f} s of imports)")
    print(
        f"floors: read {nbytes / 1e9:.2f} GB at {disk / 1e9:.2f} GB/s = {nbytes / disk:.2f} s; "
        f"{flops / 1e9:.0f} GFLOP at {mm / 1e9:.1f} GFLOP/s = {flops / mm:.2f} s"
    )
    if not args.no_profile:
        p = profile(args)
        print(
            "profile of one pass: "
            + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in p.items())
            + f" (load average {os.getloadavg()})"
        )


if __name__ == "__main__":
    main()
