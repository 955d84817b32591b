"""Influence scores on several processes with torch.distributed: one script for ``python`` and ``torchrun``.

    python examples/distributed_scores.py                              # one process
    torchrun --nproc-per-node=2 examples/distributed_scores.py         # two ranks (gloo on CPU)
    torchrun --nproc-per-node=2 examples/distributed_scores.py --out scores.h5   # columns to an HDF5 store

(needs scikit-learn for the digits: ``pip install -e ".[examples]"``). The only distributed line is
``init_process_group``: once a default process group exists, ifunc splits the EK-FAC statistics and the
training chunks across the ranks by itself and every rank gets the single-process result. With ``--out``
each rank writes its own chunks to ``scores.h5.rank{r}of{W}`` (resumable: kill a rank, relaunch the same
command, and only unfinished chunks are computed), and rank 0 merges them into ``scores.h5``.

The model is float32, torch's default (a ``.double()`` one works alike). Every rank must hold the same parameters
in the same dtype and the same data in the same order (no DistributedSampler):
here the model is trained identically on every rank and its parameters are broadcast from rank 0 anyway,
as one would after any training run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ifunc


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return x[:1200], torch.tensor(y[:1200]), x[1200:], torch.tensor(y[1200:])


def train(x, y, *, epochs=200, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def influence(model, train_data, query, *, out=None):
    """EK-FAC scores ``[n_query, n_train]`` of the training images on the queries (on every rank), or the path
    of the HDF5 store ``out`` holding them."""
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    ihvp = ifunc.ihvp_ekfac(loss, params, train_data, model=model, damping=1e-3)  # statistics all-reduced
    return ifunc.attribute(loss, params, ihvp, train_data, query, out=out, progress=False)


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--out", default=None, help="HDF5 score store (default: scores returned in memory)")
    parser.add_argument("--queries", type=int, default=8)
    args, _ = parser.parse_known_args()

    launched = "WORLD_SIZE" in os.environ and not dist.is_initialized()  # set by torchrun
    if launched:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        x, y, xq, yq = digits()
        model = train(x, y)
        if world > 1:
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        train_data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]  # any DataLoader works too
        query = (xq[: args.queries], yq[: args.queries])

        start = time.perf_counter()
        scores = influence(model, train_data, query, out=args.out)
        if args.out is not None:  # the merged store, once every rank is done
            scores = torch.from_numpy(ifunc.load_scores(scores))
        done = time.perf_counter()

        if rank == 0:
            print(f"{world} rank(s): scores {tuple(scores.shape)}")
            for q in range(min(3, scores.shape[0])):
                top = scores[q].topk(3).indices.tolist()
                print(f"  query {q} (label {int(yq[q])}): most helpful training images {top}, labels {y[top].tolist()}")
            print(f"EK-FAC fit and scores in {done - start:.2f} s")
        if launched:
            dist.barrier()  # every rank done before any tears the group down (gloo can abort a rank still talking)
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
