"""Per-rank reading under torchrun: every rank reading every chunk (before) against each rank reading its own.

Data: ``benchmarks/million.py``'s ``Synthetic`` data set (example ``i`` is row ``i mod 1024`` of a block drawn from a
generator seeded with the block, read a block at a time by ``__getitems__``), through its DataLoader of 1,024.
Each rank times (1) one pass of the chunk loop alone (``iter_chunks`` over chunks of 2,048, every chunk read, or
only this rank's: ``skip_others``) and (2) ``build_index`` of the 784-512-512-10 MLP (``layer_size=16``,
``dense_size=256``) into a fresh file, with the loop reading every chunk (patched, as before) or its own. Printed
per variant: the slowest rank's wall time, examples each rank loaded, and the load average before and after.

Usage:
  python benchmarks/rank_reading.py                     # 2 ranks × 200,000 examples, ~2 min on an idle machine
  python benchmarks/rank_reading.py --examples 1000000 --ranks 4 --no-index   # the reading pass alone
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from ekfac import mlp  # noqa: E402
from million import CHUNK, SIZES, loader  # noqa: E402

import ifunc  # noqa: E402
from ifunc import _score_loop  # noqa: E402
from ifunc._chunks import iter_chunks  # noqa: E402
from ifunc._data import DataSource  # noqa: E402
from ifunc.ihvp import rank_partition  # noqa: E402
from ifunc.index import build_index  # noqa: E402


def counted(n: int):
    """The Synthetic DataLoader of ``n`` examples and ``[examples loaded]``."""
    loaded = [0]

    def on_batch(k: int) -> None:
        loaded[0] += k

    return loader(n, on_batch=on_batch), loaded


def read_pass(n: int, own: bool) -> tuple[float, int]:
    """Seconds and examples loaded by one pass of the chunk loop on this rank."""
    data, loaded = counted(n)
    source = DataSource(data, name="train", ordered=True)
    t0 = time.perf_counter()
    for _ in iter_chunks(source, CHUNK, partition=rank_partition(), skip_others=own):
        pass
    return time.perf_counter() - t0, loaded[0]


def index_run(n: int, own: bool, out: str) -> tuple[float, int]:
    """Seconds and examples loaded by ``build_index`` on this rank (``own=False``: the loop reads every chunk)."""
    torch.manual_seed(0)
    model = mlp(SIZES)
    params = ifunc.params_of(model)

    def loss(p, b):
        return F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")

    def every_chunk(*args, **kwargs):  # the loop as it was: every rank reads every chunk
        return iter_chunks(*args, **{**kwargs, "skip_others": False})

    data, loaded = counted(n)
    original = _score_loop.iter_chunks
    _score_loop.iter_chunks = original if own else every_chunk  # pyright: ignore[reportAttributeAccessIssue]
    try:
        t0 = time.perf_counter()
        build_index(loss, params, data, out, model=model, chunk_size=CHUNK, overwrite=True, progress=False)
        return time.perf_counter() - t0, loaded[0]
    finally:
        _score_loop.iter_chunks = original  # pyright: ignore[reportAttributeAccessIssue]


def report(name: str, seconds: float, loaded: int) -> None:
    """Rank 0 prints the slowest rank's time and every rank's examples loaded."""
    times: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(times, (seconds, loaded))
    if torch.distributed.get_rank() == 0:
        slowest = max(t for t, _ in times)
        each = ", ".join(f"{k:,}" for _, k in times)
        print(f"{name:<34} slowest rank {slowest:7.2f} s   loaded per rank [{each}]   load {os.getloadavg()[0]:.2f}")


def ranks(args) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        if torch.distributed.get_rank() == 0:
            print(f"{torch.distributed.get_world_size()} ranks x {args.n:,} examples, chunk {CHUNK}; "
                  f"load {os.getloadavg()}", flush=True)  # fmt: skip
        for _ in range(args.repeats):
            for own in (False, True):
                report(f"read pass, {'own chunks' if own else 'every chunk'}", *read_pass(args.n, own))
        if args.index:
            tmp = tempfile.mkdtemp(prefix="rank-reading-") if torch.distributed.get_rank() == 0 else None
            box = [tmp]
            torch.distributed.broadcast_object_list(box)
            for own in (False, True):
                out = os.path.join(str(box[0]), f"index_{own}.h5")
                report(f"build_index, {'own chunks' if own else 'every chunk'}", *index_run(args.n, own, out))
        if torch.distributed.get_rank() == 0:
            print(f"load at the end {os.getloadavg()}", flush=True)
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", dest="n", type=int, default=200_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="read passes of each kind, alternated")
    parser.add_argument("--no-index", dest="index", action="store_false", help="time the reading pass only")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        ranks(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "--max-restarts=0", __file__, *sys.argv[1:]]  # fmt: skip
    sys.exit(subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode)


if __name__ == "__main__":
    main()
