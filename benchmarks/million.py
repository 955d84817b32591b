"""EK-FAC scores of 100 queries against 1,000,000 training examples, streamed to a resumable HDF5 store.

Workload: the peers' speed MLP 784-512-512-10 with ReLU of ``benchmarks/ekfac.py``, briefly trained on seeded
random data; EK-FAC (empirical Fisher, damping 1e-3) fitted on the first ``--fit`` training examples; 100
queries, ``query_rank=32``. The training set is a map-style Dataset that makes block ``k`` of 1,024 examples
from a generator seeded with ``k`` (so example ``i`` is always the same, as resuming requires, and nothing is
held in memory); the DataLoader reads whole blocks (``__getitems__``). Printed: load average at start and end,
fit and scoring wall time, throughput, peak RSS, the floor of this machine (a 2048² GEMM rate, the FLOPs of one
example, data generation timed alone) and a projection to 10⁸ examples on 64 ``torchrun`` ranks (per-rank
throughput × 64 plus a merge of the per-rank stores timed here on 2 parts).

Usage:
  python benchmarks/million.py --overwrite              # 1,000,000 examples -> /tmp/million.h5, ~2.5 min idle
  python benchmarks/million.py --n 200000 --out s.h5    # the same command again after a kill resumes the store
  python benchmarks/million.py --kill-test              # 20,000 examples: SIGKILL mid-run, rerun, compare (PASS/FAIL)
  python benchmarks/million.py --memory-check --sizes 100000 1000000   # peak RSS, a fresh process per size
  python benchmarks/million.py --threads 1              # a busy machine: 2 OpenMP threads on shared cores stall
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from ekfac import DAMPING, QUERY_RANK, mlp  # noqa: E402
from floors import gemm_rate  # noqa: E402

import ifunc  # noqa: E402

BLOCK, CHUNK, N_QUERY, SIZES = 1024, 2048, 100, (784, 512, 512, 10)


class Synthetic(Dataset):
    """Example ``i`` is row ``i mod 1024`` of block ``i // 1024``, drawn from a generator seeded with the block."""

    def __init__(self, n: int, seed: int = 0, on_batch=None):
        self.n, self.seed, self.on_batch = n, seed, on_batch

    def __len__(self) -> int:
        return self.n

    def block(self, k: int):
        gen = torch.Generator().manual_seed(self.seed * 10**9 + k)
        return torch.randn(BLOCK, SIZES[0], generator=gen), torch.randint(0, SIZES[-1], (BLOCK,), generator=gen)

    def __getitems__(self, idx: list[int]):
        first = min(idx) // BLOCK
        x, y = (torch.cat(t) for t in zip(*(self.block(k) for k in range(first, max(idx) // BLOCK + 1))))
        start = idx[0] - first * BLOCK
        run = idx == list(range(idx[0], idx[0] + len(idx)))  # consecutive, as the DataLoader asks: a view
        rows = slice(start, start + len(idx)) if run else torch.as_tensor(idx) - first * BLOCK
        if self.on_batch is not None:
            self.on_batch(len(idx))
        return x[rows], y[rows]

    def __getitem__(self, i: int):
        x, y = self.block(i // BLOCK)
        return x[i % BLOCK], y[i % BLOCK]


def loader(n: int, seed: int = 0, on_batch=None) -> DataLoader:  # __getitems__ returns the batch: no collation
    return DataLoader(Synthetic(n, seed, on_batch), batch_size=BLOCK, shuffle=False, collate_fn=lambda b: b)


def trained_mlp():
    """The MLP 784-512-512-10 after 100 seeded Adam steps on Synthetic data (eval mode), and its summed loss."""
    torch.manual_seed(0)
    model = mlp(SIZES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = Synthetic(8 * BLOCK, seed=1).__getitems__(list(range(8 * BLOCK)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()

    def loss(p, b):
        return F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")

    return model, loss


def setup(n_fit: int):
    """The trained model, loss, params, EK-FAC closure (fit on the first ``n_fit`` examples), queries, fit time."""
    model, loss = trained_mlp()
    params = ifunc.params_of(model)

    t0 = time.perf_counter()
    ihvp = ifunc.ihvp_ekfac(
        loss, params, loader(n_fit), model=model, damping=DAMPING, curvature="empirical_fisher", progress=False
    )
    query = Synthetic(N_QUERY, seed=2).__getitems__(list(range(N_QUERY)))
    return loss, params, ihvp, query, time.perf_counter() - t0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunks_done(path: str) -> int:
    import h5py

    if not os.path.exists(path):
        return 0
    with h5py.File(path, "r") as f:
        return int(f["done"][...].sum())


def score(args) -> dict:
    """Fit, then score ``--n`` examples into ``--out`` (resuming it if unfinished); the measured numbers."""
    from tqdm import tqdm

    loss, params, ihvp, query, fit_s = setup(args.fit)
    print("SCORING", flush=True)  # the kill test waits for this line
    skipped = min(args.n, chunks_done(args.out) * args.chunk)  # resumed: these are only read and fingerprinted
    bar = tqdm(total=args.n, unit="ex", unit_scale=True, desc="scores", disable=args.quiet, mininterval=1)
    first: list[float] = []  # time and peak RSS at the first train batch (after fit and query preparation)

    def on_batch(k: int) -> None:
        first[:] = first or [time.perf_counter(), peak_rss_mb()]
        bar.update(k)

    t0, c0 = time.perf_counter(), time.process_time()
    ifunc.attribute(
        loss, params, ihvp, loader(args.n, on_batch=on_batch), query, query_rank=QUERY_RANK, out=args.out,
        chunk_size=args.chunk, progress=False,
    )  # fmt: skip
    bar.close()
    end, computed = time.perf_counter(), args.n - skipped
    return {"n": args.n, "skipped": skipped, "fit_s": fit_s, "prep_s": first[0] - t0, "score_s": end - t0,
            "score_cpu_s": time.process_time() - c0, "rate": computed / (end - first[0]) if computed else 0.0,
            "rss_mb": peak_rss_mb(), "rss_before_mb": first[1]}  # fmt: skip


def child(args, quiet: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--n", str(args.n), "--out", args.out, "--threads", str(args.threads)]
    cmd += ["--fit", str(args.fit), "--chunk", str(args.chunk)] + (["--quiet"] if quiet else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def kill_test(args) -> None:
    """Uninterrupted run, then a run SIGKILLed at a random point of its scoring and rerun: the stores must agree."""
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="million-kill-")
    ref_path, args.out = os.path.join(tmp, "ref.h5"), os.path.join(tmp, "killed.h5")
    ref = result(child(argparse.Namespace(**{**vars(args), "out": ref_path})))
    proc = child(args)
    while proc.stdout.readline().strip() != "SCORING":  # pyright: ignore[reportOptionalMemberAccess]
        pass
    delay = random.uniform(0.05, 0.95) * ref["score_s"]
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done, total = chunks_done(args.out), -(-args.n // args.chunk)
    print(f"SIGKILL after {delay:.2f} s of {ref['score_s']:.2f} s scoring: {done} of {total} chunks done")
    rerun = result(child(args))
    a, b = ifunc.load_scores(ref_path), ifunc.load_scores(args.out)
    same, diff = bool(np.array_equal(a, b)), float(np.abs(a - b).max())
    print(
        f"rerun: {rerun['skipped']:,} examples kept, the rest scored in {rerun['score_s']:.2f} s; max |diff| vs "
        f"uninterrupted {diff:.3g}, bitwise equal {same}\nkill test: {'PASS' if same else 'FAIL'}"
    )
    shutil.rmtree(tmp)


def memory_check(args) -> None:
    rows, tmp = [], tempfile.mkdtemp(prefix="million-mem-")
    for n in args.sizes:
        rows.append(r := result(child(argparse.Namespace(**{**vars(args), "n": n, "out": f"{tmp}/{n}.h5"}))))
        print(
            f"n={n:>9,}  peak RSS {r['rss_mb']:6.0f} MB ({r['rss_before_mb']:.0f} MB before the first train chunk)  "
            f"scoring {r['score_s']:6.1f} s  {r['rate']:6.0f} ex/s",
            flush=True,
        )
    shutil.rmtree(tmp)
    growth = 100 * (rows[-1]["rss_mb"] / rows[0]["rss_mb"] - 1)
    print(f"peak RSS growth {rows[0]['n']:,} -> {rows[-1]['n']:,} examples: {growth:+.1f} % (target within 10 %)")


def floor(args) -> dict:
    """GEMM rates, FLOPs of one example (the contractions ifunc chooses) and data generation alone, per example."""
    try:  # oneDNN's fp32 kernels (torch's MKL sgemm takes an AVX2 path on AMD CPUs)
        dnn = 1e9 * gemm_rate(mm=lambda a, b: torch._C._nn.mkldnn_linear(a.to_mkldnn(), b.to_mkldnn(), None).to_dense())
    except (AttributeError, RuntimeError):
        dnn = float("nan")
    layers = list(zip(SIZES[1:], (i + 1 for i in SIZES[:-1])))  # (out, in + bias column)
    forward = sum(o * (i - 1) for o, i in layers)
    capture = 2 * forward + 2 * sum(o * (i - 1) for o, i in layers[1:])  # forward + backward to the layer outputs
    contraction = sum(min(2 * N_QUERY * QUERY_RANK * (o + i), 2 * (o * i + N_QUERY * o * i)) for o, i in layers)
    m, t0 = min(args.n, 100_000), time.perf_counter()
    for _ in loader(m):
        pass
    data = (time.perf_counter() - t0) / m
    return {
        "gemm": 1e9 * gemm_rate(mm=torch.matmul),
        "dnn": dnn,
        "capture": capture,
        "contraction": contraction,
        "data": data,
    }


def merge_cost(args, n: int = 200_000, size: int = 2) -> float:
    """Seconds per stored score of ``ifunc.store.merge_parts`` on ``size`` per-rank stores of ``n`` columns in all."""
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="million-merge-")
    out, meta = os.path.join(tmp, "m.h5"), {"method": "merge benchmark"}
    widths = [min(args.chunk, n - s) for s in range(0, n, args.chunk)]
    final = dict(n_query=N_QUERY, n_train=n, chunk_size=args.chunk, meta=meta)

    def part_args(r):
        local = sum(w for j, w in enumerate(widths) if j % size == r)
        return dict(final, n_train=local, meta=dict(meta, part=[r, size], n_train_total=n))

    cols = np.random.default_rng(0).standard_normal((N_QUERY, args.chunk), dtype=np.float32)
    for r in range(size):
        with ifunc.store.ScoreWriter(ifunc.store.part_path(out, r, size), **part_args(r)) as w:
            for j, k in enumerate(range(r, len(widths), size)):
                w.write(j, cols[:, : widths[k]], "0" * 32)
    t0 = time.perf_counter()
    ifunc.store.merge_parts(out, size, final, part_args, lambda r: list(range(r, len(widths), size)))
    seconds = time.perf_counter() - t0
    shutil.rmtree(tmp)
    return seconds / (N_QUERY * n)


def report(args, res: dict, fl: dict, merge_s: float) -> None:
    floor_s = (fl["capture"] + fl["contraction"]) / fl["gemm"] + fl["data"]  # seconds per example
    per_m = 1e6 / res["rate"] / 60 if res["rate"] else float("nan")
    print(
        f"\nMLP 784-512-512-10 (669,706 params), EK-FAC (empirical Fisher, damping {DAMPING:g}) fitted on the first "
        f"{args.fit:,} examples, {N_QUERY} queries, query_rank={QUERY_RANK}, chunks of {args.chunk}, "
        f"{args.threads} threads, torch {torch.__version__}\n"
        f"  fit {res['fit_s']:.1f} s + scoring {res['score_s']:.1f} s = {res['fit_s'] + res['score_s']:.1f} s wall "
        f"(scoring {res['score_cpu_s']:.1f} s CPU): queries prepared in {res['prep_s']:.1f} s, then "
        f"{res['n'] - res['skipped']:,} examples scored ({res['skipped']:,} already in the store) at "
        f"{res['rate']:,.0f} examples/s = {per_m:.2f} min per million\n"
        f"  peak RSS {res['rss_mb']:.0f} MB ({res['rss_before_mb']:.0f} MB before the first train chunk); store "
        f"{args.out} {os.path.getsize(args.out) / 2**20:,.0f} MB\n"
        f"  floor: GEMM 2048² {fl['gemm'] / 1e9:.0f} GFLOP/s (torch.matmul; oneDNN fp32 {fl['dnn'] / 1e9:.0f}); "
        f"per example capture {fl['capture'] / 1e6:.1f} MFLOP (forward, backward to the layer outputs) + contraction "
        f"{fl['contraction'] / 1e6:.1f} MFLOP (rank {QUERY_RANK}; the 10-output layer by its per-example gradient) "
        f"+ data {fl['data'] * 1e6:.1f} us (the loader alone) = {floor_s * 1e6 / 60:.2f} min per million; "
        f"measured at {100 * res['rate'] * floor_s:.0f} % of it"
    )
    if not res["rate"]:
        return  # the store was complete: nothing was scored
    n, w = 10**8, 64
    compute, data, merge = n / w / res["rate"], n / w * fl["data"], n * N_QUERY * merge_s
    fixed = res["fit_s"] + res["prep_s"]
    print(
        f"projection to 10^8 examples on {w} torchrun ranks, each like this process (out=: per-rank stores merged by "
        f"rank 0):\n  scoring 10^8/{w} examples at {res['rate']:,.0f}/s  {compute:,.0f} s\n"
        f"  + each rank loads its 10^8/{w} examples (only its own chunks of a map-style Dataset)  {data:,.0f} s\n"
        f"  + fit and query preparation {fixed:.0f} s + rank 0 merges {n * N_QUERY * 4 / 1e9:.0f} GB at "
        f"{4 / merge_s / 2**20:,.0f} MB/s (merge_parts timed on 2 parts here, page cache)  {merge:,.0f} s\n"
        f"  = {(compute + data + fixed + merge) / 60:.1f} min ({(compute + data + fixed) / 60:.1f} min if the merge "
        "were free)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, help="training examples (default 1,000,000; 20,000 with --kill-test)")
    ap.add_argument("--fit", type=int, default=50_000, help="EK-FAC fitted on the first FIT examples")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "million.h5"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="examples per chunk (the unit a store resumes)")
    ap.add_argument("--overwrite", action="store_true", help="start the store over instead of resuming it")
    ap.add_argument("--kill-test", action="store_true")
    ap.add_argument("--memory-check", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.n = args.n or (20_000 if args.kill_test else 1_000_000)
    torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(score(args)), flush=True)
        return
    print(f"load average at start {os.getloadavg()[0]:.2f}; {args.threads} threads, torch {torch.__version__}")
    if args.kill_test:
        kill_test(args)
    elif args.memory_check:
        memory_check(args)
    else:
        if args.overwrite and os.path.exists(args.out):
            ifunc.store.remove_store(args.out)
        fl, merge_s = floor(args), merge_cost(args)
        report(args, result(child(args, quiet=False)), fl, merge_s)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
