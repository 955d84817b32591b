"""Peak memory of streaming attribution to an HDF5 store as the training set grows 10×.

    python benchmarks/memory.py                 # n_train = 2,000 and 20,000
    python benchmarks/memory.py --sizes 1000 10000

Each size runs in a fresh process (peak RSS from getrusage). The training set is a Dataset that makes
each example on demand and streams through a DataLoader, the 100 query gradients are preconditioned once
by CG, and scores go to disk chunk by chunk; the target is < 20 % growth of peak RSS for 10× the data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(n_train: int, out: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    import ifunc

    torch.set_num_threads(2)

    class Synthetic(Dataset):
        """Example i is drawn from a generator seeded with i: nothing is held in memory."""

        def __len__(self):
            return n_train

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randn(100, generator=g), torch.randint(0, 10, (), generator=g)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(100, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
    )
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda o, b: F.cross_entropy(o, b[1], reduction="sum")
    )
    fit = DataLoader(Synthetic(), batch_size=250)
    fit_subset = [batch for _, batch in zip(range(1), fit)]  # curvature from 250 examples
    gen = torch.Generator().manual_seed(10**6)
    query = (torch.randn(100, 100, generator=gen), torch.randint(0, 10, (100,), generator=gen))
    ihvp = ifunc.ihvp_cg(loss, params, fit_subset, damping=1e-2, tol=1e-2)
    start = time.perf_counter()
    ifunc.attribute(
        loss,
        params,
        ihvp,
        DataLoader(Synthetic(), batch_size=256),
        query,
        out=out,
        overwrite=True,
        progress=False,
        chunk_size=512,
    )
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"n_train": n_train, "peak_rss_mb": peak_mb, "seconds": seconds, "store_mb": os.path.getsize(out) / 2**20}
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--child", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            res = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--out", f"{tmp}/s{n}.h5"],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("MLP 100-256-256-10 (94k parameters), 100 queries, CG (damping 1e-2, tol 1e-2), scores streamed to HDF5")
    print(f"{'n_train':>8s} {'peak RSS MB':>12s} {'time s':>8s} {'store MB':>9s}")
    for r in rows:
        print(f"{r['n_train']:8d} {r['peak_rss_mb']:12.0f} {r['seconds']:8.1f} {r['store_mb']:9.1f}")
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    print(
        f"peak RSS growth for {rows[-1]['n_train'] // rows[0]['n_train']}x the data: {100 * growth:+.1f} %"
        f" (target < +20 %)"
    )


if __name__ == "__main__":
    main()
