"""Time and accuracy of every iHVP method on an MLP with ~94k parameters, for 1 and 64 right-hand sides.

    python benchmarks/solvers.py            # full size (a few minutes on 2 cores)
    python benchmarks/solvers.py --quick    # smaller data, for a smoke run

The model (100-256-256-10, tanh, float32) is trained briefly on random data. A dense solve is out of
reach at this size (d² ≈ 9·10⁹ entries), so the reference is CG in float64 at relative tolerance 1e-10 on
the same damped Gauss-Newton matrix. Reported: build time, solve time, and the relative error
‖x − x_ref‖ / ‖x_ref‖ over the right-hand sides (query gradients, as in attribution).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import ifunc


def make_problem(n_train: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation only; ifunc itself never touches the global RNG
    model = torch.nn.Sequential(
        torch.nn.Linear(100, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
    ).to(dtype)
    x = torch.randn(n_train + 64, 100, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n_train + 64,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x[:n_train]), y[:n_train]).backward()
        opt.step()
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    train = [(x[i : i + 250], y[i : i + 250]) for i in range(0, n_train, 250)]
    query = (x[n_train:], y[n_train:])
    return model, loss, train, query


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--damping", type=float, default=1e-2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    n_train = 250 if args.quick else 1000
    model, loss, train, query = make_problem(n_train)
    params = ifunc.params_of(model)
    lam = args.damping
    Q = ifunc.per_sample_grads(loss, params, query)  # [64, d]
    d = Q.shape[1]
    print(f"MLP 100-256-256-10, d = {d:,} parameters, {n_train} training examples, damping {lam}, GGN, float32")

    # reference: float64 CG to 1e-10
    params64 = {k: v.double() for k, v in params.items()}
    train64 = [(x.double(), y) for x, y in train]
    start = time.perf_counter()
    ref = ifunc.ihvp_cg(loss, params64, train64, damping=lam, tol=1e-10, maxiter=2000)(Q.double())
    print(f"reference (float64 CG, tol 1e-10) for 64 right-hand sides: {time.perf_counter() - start:.1f} s\n")

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    methods = {
        "cg (tol 1e-4)": lambda: ifunc.ihvp_cg(loss, params, train, damping=lam),
        "cg (tol 1e-6)": lambda: ifunc.ihvp_cg(loss, params, train, damping=lam, tol=1e-6),
        "arnoldi (rank 50)": lambda: ifunc.ihvp_arnoldi(loss, params, train, rank=50, damping=lam, generator=gen()),
        "lissa (depth 300, batch 100)": lambda: ifunc.ihvp_lissa(
            loss, params, train, damping=lam, depth=300, batch_size=100, generator=gen(), tol=None
        ),
    }
    optional = {
        "nystrom (rank 50)": ("ihvp_nystrom", dict(rank=50, damping=lam, generator=gen())),
        "datainf": ("ihvp_datainf", dict(damping=lam)),
    }
    for label, (fn, kw) in optional.items():
        if hasattr(ifunc, fn):
            methods[label] = lambda fn=fn, kw=kw: getattr(ifunc, fn)(loss, params, train, **kw)
    if hasattr(ifunc, "ihvp_ekfac"):
        methods["ekfac"] = lambda: ifunc.ihvp_ekfac(loss, params, train, model=model, damping=lam)
    if hasattr(ifunc, "ihvp_kfac"):
        methods["kfac"] = lambda: ifunc.ihvp_kfac(loss, params, train, model=model, damping=lam)

    print(f"{'method':32s} {'build s':>8s} {'1 rhs s':>8s} {'64 rhs s':>9s} {'rel. error (64)':>16s}")
    for label, build in methods.items():
        try:
            start = time.perf_counter()
            ihvp = build()
            built = time.perf_counter() - start
            start = time.perf_counter()
            ihvp(Q[0])
            one = time.perf_counter() - start
            start = time.perf_counter()
            X = ihvp(Q)
            many = time.perf_counter() - start
        except Exception as err:  # report and go on: one failing method must not hide the others
            print(f"{label:32s} failed: {type(err).__name__}: {str(err)[:80]}")
            continue
        err = float((X.double() - ref).norm() / ref.norm())
        print(f"{label:32s} {built:8.2f} {one:8.2f} {many:9.2f} {err:16.2e}")


if __name__ == "__main__":
    main()
