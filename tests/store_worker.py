"""A second process for tests/test_store_trust.py: ``python store_worker.py MODE STORE [READY GO]``.

Modes:
  hold      write STORE with ``attribute(..., out=STORE)``; after two chunks touch READY and wait for GO
  read      open STORE with ``load_scores(lazy=True)``, touch READY, wait for GO, close it
  readonly  import everything, become the unprivileged user ``nobody``, prove STORE and its directory are
            not writable, then read STORE and re-run the call that wrote it; print the results as JSON
  default   ``python store_worker.py default STORE AVAILABLE KILL_AFTER``: ``attribute(..., out=STORE)`` on
            default settings, as if AVAILABLE bytes of memory were free (the default chunk size follows it);
            SIGKILL itself in the middle of the chunk after chunk number KILL_AFTER is written (0: never)

The problem is the one of ``problem()`` in the test file: ``mlp_problem(seed=1, sizes=(3, 5, 3), n=15)``,
``ihvp_explicit(damping=0.1)``, queries ``(x[:2], y[:2])``, ``chunk_size=3``.
"""

import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import h5py  # noqa: F401  (ifunc.store imports it lazily; import it before dropping privileges)
import torch

import ifunc
from ifunc.testing import mlp_problem


def problem():
    torch.set_default_dtype(torch.float64)
    _, params, loss, (x, y) = mlp_problem(seed=1, sizes=(3, 5, 3), n=15)
    return params, loss, ifunc.ihvp_explicit(loss, params, (x, y), damping=0.1), (x, y), (x[:2], y[:2])


def wait_for(path: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.02)


def hold(store, ready: Path, go: Path) -> None:
    params, loss, ihvp, train, query = problem()
    written = [0]

    class Count(logging.Handler):
        def emit(self, record):
            written[0] += "written" in record.getMessage()

    logging.getLogger("ifunc").addHandler(Count())
    logging.getLogger("ifunc").setLevel(logging.INFO)

    def train_loss(p, b):
        if written[0] == 2 and not ready.exists():
            ready.touch()
            wait_for(go)
        return loss(p, b)

    ifunc.attribute(train_loss, params, ihvp, train, query, measurement=loss, out=store, chunk_size=3, progress=False)


def read(store, ready: Path, go: Path) -> None:
    ds = ifunc.load_scores(store, lazy=True)
    ready.touch()
    wait_for(go)
    ds.file.close()


def readonly(store: Path) -> None:
    params, loss, ihvp, train, query = problem()
    ifunc.attribute(loss, params, ihvp, train, query, chunk_size=3, progress=False)  # load lazy imports as root
    os.setgid(65534)
    os.setuid(65534)
    report = {"uid": os.getuid()}
    try:
        open(store, "r+b").close()
        report["file_writable"] = True
    except PermissionError:
        report["file_writable"] = False
    try:
        tempfile.TemporaryFile(dir=store.parent).close()
        report["dir_writable"] = True
    except PermissionError:
        report["dir_writable"] = False
    report["scores"] = ifunc.load_scores(store).tolist()
    report["top"] = ifunc.top_k(store, 2)[1].tolist()
    report["again"] = str(ifunc.attribute(loss, params, ihvp, train, query, out=store, chunk_size=3, progress=False))
    print(json.dumps(report))


ARMED = [False]


def default(store: Path, available: int, kill_after: int) -> None:
    from ifunc import _memory

    _memory.available_bytes = lambda: available  # the memory that happens to be free in this run
    params, loss, ihvp, train, query = problem()

    class Arm(logging.Handler):
        def emit(self, record):
            ARMED[0] = ARMED[0] or f"chunk {kill_after}/" in record.getMessage()
            if "written" in record.getMessage():
                print(record.getMessage(), flush=True)  # "ifunc: chunk i/n written to ..."

    logging.getLogger("ifunc").addHandler(Arm())
    logging.getLogger("ifunc").setLevel(logging.INFO)

    def train_loss(p, b):  # the same function in every run: the store records it
        if ARMED[0]:
            os.kill(os.getpid(), signal.SIGKILL)  # die in the middle of the next chunk
        return loss(p, b)

    ifunc.attribute(train_loss, params, ihvp, train, query, measurement=loss, out=store, progress=False)


if __name__ == "__main__":
    mode, store = sys.argv[1], Path(sys.argv[2])
    if mode == "default":
        default(store, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "readonly":
        readonly(store)
    else:
        {"hold": hold, "read": read}[mode](store, Path(sys.argv[3]), Path(sys.argv[4]))
