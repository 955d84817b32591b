"""CG iterations with and without the Jacobi and Nyström preconditioners on ill-conditioned problems.

    python benchmarks/preconditioners.py            # a few minutes on 2 cores
    python benchmarks/preconditioners.py --quick    # smaller, about a minute

Three problems, each solved for 8 right-hand sides to relative residual 1e-6 with ``ifunc.cg_solve``:

1. "scaled": ``S A S`` with ``A`` a random SPD matrix (condition 1e2) and ``S`` a log-normal diagonal
   scaling (σ = 1.5): badly scaled coordinates, the case Jacobi is made for.
2. "spiked": ``U diag(λ) Uᵀ + λ_damp I`` with a few hundred eigenvalues decaying from 1e3 and the rest
   tiny: a fast-decaying spectrum, the case Nyström is made for.
3. "mlp": the damped Gauss-Newton matrix of a briefly trained tanh MLP (float64), damping 1e-4 — what
   ``ihvp_cg`` actually solves; preconditioners built from ``ifunc.curvature_operator``.

Reported: iterations (max over right-hand sides), preconditioner build time, solve time, and the relative
error of the solution against a dense solve (synthetic problems) or plain CG run to 1e-10 (MLP).

One run (CG iterations, max over 8 right-hand sides, relative residual 1e-6; times on a shared machine
are noisy, iterations are not):

    problem     d      none    jacobi exact   jacobi 64 probes   nystrom (rank)
    scaled      400    >8000   91             5408               3795 (50)
    spiked      400    304     537            -                  110 (25), 41 (100)
    mlp GGN     3605   188     340            367                141 (50), 66 (200)

Jacobi wins when coordinates are badly scaled but doubles the iterations on the MLP's GGN (its diagonal
says little about a spectrum dominated by a few directions); Nyström cut iterations on every problem.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import ifunc
from ifunc.testing import random_spd


def scaled_problem(d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.exp(1.5 * torch.randn(d, generator=gen, dtype=torch.float64))
    A = s[:, None] * random_spd(d, cond=1e2, seed=seed) * s[None]
    return (lambda V: V @ A), d


def spiked_problem(d: int, seed: int = 0, damping: float = 1e-3):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    w = 1e3 * torch.arange(1, d + 1, dtype=torch.float64) ** -2.0
    H = (Q * w) @ Q.T
    return (lambda V: V @ H), (lambda V: V @ H + damping * V), d, damping


def mlp_problem(n: int, seed: int = 0, damping: float = 1e-4):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation only; ifunc never touches the global RNG
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5)
    ).double()
    x = torch.randn(n, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (n,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    op = ifunc.curvature_operator(loss, ifunc.params_of(model), (x, y))
    return op, (lambda V: op.matvec(V) + damping * V), op.flat_params.numel(), damping


def run(name: str, system, d: int, preconditioners: dict, rows: list, k: int = 8, dense: bool = True):
    B = torch.randn(k, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if dense:
        reference = torch.linalg.solve(system(torch.eye(d, dtype=torch.float64)), B.T).T
    else:
        reference = ifunc.cg_solve(system, B, tol=1e-10, maxiter=20 * d).x
    for label, make in preconditioners.items():
        start = time.perf_counter()
        P = make() if make is not None else None
        built = time.perf_counter() - start
        start = time.perf_counter()
        res = ifunc.cg_solve(system, B, tol=1e-6, maxiter=20 * d, preconditioner=P)
        solved = time.perf_counter() - start
        error = float((res.x - reference).norm() / reference.norm())
        rows.append((name, d, label, int(res.iterations.max()), built, solved, error, bool(res.converged.all())))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows: list = []

    d = 200 if args.quick else 400
    matvec, d = scaled_problem(d)
    run(
        "scaled",
        matvec,
        d,
        {
            "none": None,
            "jacobi (exact)": lambda: ifunc.jacobi_preconditioner(matvec, dim=d, dtype=torch.float64, damping=0.0),
            "jacobi (64 probes)": lambda: ifunc.jacobi_preconditioner(
                matvec, dim=d, dtype=torch.float64, damping=0.0, probes=64
            ),
            "nystrom (rank 50)": lambda: ifunc.nystrom_preconditioner(
                matvec, dim=d, dtype=torch.float64, rank=50, damping=1e-6
            ),
        },
        rows,
    )

    H, system, d, lam = spiked_problem(200 if args.quick else 400)
    run(
        "spiked",
        system,
        d,
        {
            "none": None,
            "jacobi (exact)": lambda: ifunc.jacobi_preconditioner(H, dim=d, dtype=torch.float64, damping=lam),
            "nystrom (rank 25)": lambda: ifunc.nystrom_preconditioner(
                H, dim=d, dtype=torch.float64, rank=25, damping=lam
            ),
            "nystrom (rank 100)": lambda: ifunc.nystrom_preconditioner(
                H, dim=d, dtype=torch.float64, rank=100, damping=lam
            ),
        },
        rows,
    )

    op, system, d, lam = mlp_problem(200 if args.quick else 400)
    run(
        "mlp GGN",
        system,
        d,
        {
            "none": None,
            "jacobi (exact)": lambda: ifunc.jacobi_preconditioner(op, damping=lam),
            "jacobi (64 probes)": lambda: ifunc.jacobi_preconditioner(op, damping=lam, probes=64),
            "nystrom (rank 50)": lambda: ifunc.nystrom_preconditioner(op, rank=50, damping=lam),
            "nystrom (rank 200)": lambda: ifunc.nystrom_preconditioner(op, rank=200, damping=lam),
        },
        rows,
        dense=False,
    )

    header = (
        f"{'problem':<9} {'d':>6}  {'preconditioner':<20} {'CG iters':>8} {'build s':>8} {'solve s':>8} {'rel err':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, d, label, iters, built, solved, error, converged in rows:
        flag = "" if converged else "  (not converged)"
        print(f"{name:<9} {d:>6}  {label:<20} {iters:>8} {built:>8.2f} {solved:>8.2f} {error:>9.1e}{flag}")


if __name__ == "__main__":
    main()
