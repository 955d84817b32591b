"""Workload of the kill-and-resume test: EK-FAC scores to a store under torchrun, on default settings, in float32.

``torchrun --nproc-per-node=2 tests/distributed_killed.py STORE LOG kill|resume``: with ``kill`` rank 1 dies
(SIGKILL) while computing its third chunk; ``resume`` runs the same call to the end. The call leaves the chunk
size, ``max_memory`` and the dtypes at their defaults (torch's float32, a float32 model), as a user's script does.
Each rank logs ifunc's messages to ``LOG.rank{r}``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

import ifunc
from ifunc._memory import MAX_CHUNK
from ifunc.testing import mlp_problem

N = 6 * MAX_CHUNK + 100  # at most MAX_CHUNK examples per default chunk: 7 chunks, so rank 1 holds three (1, 3, 5)


def problem():
    """A float32 4-6-3 MLP, ``N`` examples in batches of 100 and 4 queries."""
    model, params, loss, (x, y) = mlp_problem(seed=3, sizes=(4, 6, 3), n=N, dtype=torch.float32)
    train = [(x[i : i + 100], y[i : i + 100]) for i in range(0, N, 100)]
    return model, params, loss, train, (x[:4] + 0.5, y[:4])


def main(out: str, log: str, mode: str) -> None:
    rank = torch.distributed.get_rank()
    logging.basicConfig(filename=f"{log}.rank{rank}", level=logging.INFO, format="%(message)s")
    model, params, loss, train, query = problem()
    # the store records a hash of the loss (code, closure, globals): the kill switch lives in the environment, read
    # at call time, so the killed and the resumed runs pass the same loss, as a real crash would
    os.environ.update(KILL_RANK="1" if mode == "kill" else "none", CHUNKS_WRITTEN="0")

    class Count(logging.Handler):
        def emit(self, record):
            if "written" in record.getMessage():
                os.environ["CHUNKS_WRITTEN"] = str(int(os.environ["CHUNKS_WRITTEN"]) + 1)

    def train_loss(p, batch):  # on the first run rank 1 dies computing its third chunk
        if os.environ["KILL_RANK"] == os.environ["RANK"] and os.environ["CHUNKS_WRITTEN"] == "2":
            os.kill(os.getpid(), signal.SIGKILL)
        return loss(p, batch)

    logging.getLogger("ifunc").addHandler(Count())
    ihvp = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=0.1)
    ifunc.attribute(train_loss, params, ihvp, train, query, measurement=loss, out=out, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        main(*sys.argv[1:4])
        torch.distributed.barrier()  # both ranks done before either tears the group down
    finally:
        torch.distributed.destroy_process_group()
