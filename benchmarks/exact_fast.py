"""Exact-level attribution at a fraction of CG's time: every iterative setting against the exact solve.

    python benchmarks/exact_fast.py               # both problems, one round, a few minutes on 2 cores
    python benchmarks/exact_fast.py --repeats 3   # min / median of 3 interleaved rounds
    python benchmarks/exact_fast.py --no-peers    # without pyDVL (used when installed)

Problems (GGN of the cross-entropy, float64, trained with L-BFGS to convergence as in ``benchmarks/lds.py``):

- ``lds``: the 64-16-10 tanh MLP of ``benchmarks/lds.py`` (1,210 parameters), 400 training and 100 query digits;
- ``wide``: a 64-32-10 tanh MLP (2,410 parameters), 1,000 training and 100 query digits.

Each at two dampings: the ``damping=None`` rule (0.1 × mean eigenvalue, from ``ihvp_cg``'s Hutchinson estimate)
and ``1e-2``. For every method: build time, ``attribute`` time (query gradients, the block solve, the train
gradients and the contraction), total, and the Spearman correlation of its ``[n_query, n_train]`` scores with the
exact ones (``ihvp_explicit`` at the same λ), per query: min and mean over the queries. Methods run interleaved,
round by round, so machine load hits them alike; the load average is printed.

``explicit (before: products+eigh)`` is the former dense path (``d`` curvature-product columns, then ``eigh``), run
next to the current one (Jacobians or gradients, then Cholesky). pyDVL's direct solve with
``SecondOrderMode.GAUSS_NEWTON`` forms ``Σ_i g_i g_iᵀ / (d (B − 1))`` from per-example loss gradients (the empirical
Fisher, with B its batches: see :func:`pydvl_scale`), so ``explicit, pyDVL's matrix (EF)`` is ``ihvp_explicit`` on
that matrix at the matching λ, and the line after each table compares the two score matrices directly (pyDVL's
influences have our sign).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lds  # noqa: E402  (the benchmark next to this one: data, model and training)

import ifunc  # noqa: E402
from ifunc._data import DataSource  # noqa: E402
from ifunc.ihvp._blocks import resolve_blocks  # noqa: E402
from ifunc.ihvp._dense import dense_curvature  # noqa: E402
from ifunc.ihvp._dense_solve import DenseSolver, dense_ihvp  # noqa: E402
from ifunc.quality import spearman  # noqa: E402

PYDVL_BATCH = 64


def make_problem(name: str):
    if name == "lds":
        (x, y), (xq, yq) = lds.load(400, 100)
        model = lds.init_model(0)
    else:
        (x, y), (xq, yq) = lds.load(1000, 100)
        gen = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)
    model = lds.fit(model, x, y)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    return model, loss, ifunc.params_of(model), (x, y), (xq, yq)


def former_explicit(loss, params, train, lam):
    """``ihvp_explicit`` as it was before the Jacobian path: ``d`` curvature-product columns, then ``eigh``."""
    op = ifunc.curvature_operator(loss, params, train)
    flat, unflatten = ifunc.flatten(params)
    groups = resolve_blocks("full", unflatten)
    matrices, _, _ = dense_curvature(loss, op, DataSource(train), groups, way="products")
    solver = DenseSolver(matrices, psd=True, dtype=flat.dtype, who="ihvp_explicit")
    solver._eigendecompose()  # every solve from the eigendecomposition, as the former closure did
    lam = lam if lam is not None else 0.1 * solver.trace() / flat.numel()
    return dense_ihvp(solver, groups, lam, name="explicit", unflatten=unflatten, like=flat.new_zeros(()), info={})


def pydvl_scale(d: int, n: int) -> float:
    """pyDVL 0.10's ``gauss_newton`` is ``Σ_i g_i g_iᵀ`` (per-example loss gradients: the empirical Fisher, not the
    GGN) divided by ``d · (batches − 1)`` instead of ``n`` (it counts the rows of each batch's ``[d, d]`` product and
    skips the first batch): its matrix is ``F_emp · n / (d (B − 1))``, so its regularisation λ is our damping
    ``λ · d (B − 1) / n`` on ``F_emp``, and its scores are ours times ``d (B − 1) / n``."""
    batches = -(-n // PYDVL_BATCH)
    return d * (batches - 1) / n


def ours(loss, params, train, model, lam, peer_lam: float):
    """label -> build(); ``lam=None`` is the damping rule; ``peer_lam`` the λ pyDVL is given (the rule's value)."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    op = lambda: ifunc.curvature_operator(loss, params, train)  # noqa: E731

    def nystrom_cg(rank, tol):
        return lambda: ifunc.ihvp_cg(
            loss,
            params,
            train,
            damping=lam,
            tol=tol,
            preconditioner=ifunc.nystrom_preconditioner(op(), rank=rank, damping=None, generator=g()),
        )

    def ekfac_cg():
        cg = ifunc.ihvp_cg(loss, params, train, damping=lam, tol=1e-2)  # the rule's λ, shared with EK-FAC
        pre = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=cg.damping)
        return ifunc.ihvp_cg(loss, params, train, damping=cg.damping, tol=1e-2, preconditioner=pre)

    d, n = ifunc.flatten(params)[0].numel(), len(train[1])
    return {
        "explicit": lambda: ifunc.ihvp_explicit(loss, params, train, damping=lam),
        "explicit (before: products+eigh)": lambda: former_explicit(loss, params, train, lam),
        "explicit, pyDVL's matrix (EF)": lambda: ifunc.ihvp_explicit(
            loss, params, train, curvature="empirical_fisher", damping=peer_lam * pydvl_scale(d, n)
        ),
        "cg (default, tol 1e-5)": lambda: ifunc.ihvp_cg(loss, params, train, damping=lam),
        "cg tol 1e-3": lambda: ifunc.ihvp_cg(loss, params, train, damping=lam, tol=1e-3),
        "cg tol 1e-2": lambda: ifunc.ihvp_cg(loss, params, train, damping=lam, tol=1e-2),
        "cg tol 1e-1": lambda: ifunc.ihvp_cg(loss, params, train, damping=lam, tol=1e-1),
        "cg + nystrom 50, tol 1e-2": nystrom_cg(50, 1e-2),
        "cg + nystrom 100, tol 1e-2 *": nystrom_cg(100, 1e-2),
        "cg + nystrom 100, tol 1e-1": nystrom_cg(100, 1e-1),
        "cg + ekfac, tol 1e-2": ekfac_cg,
        "nystrom (rank 200, no CG)": lambda: ifunc.ihvp_nystrom(
            loss, params, train, rank=200, damping=lam, generator=g()
        ),
        "ekfac": lambda: ifunc.ihvp_ekfac(loss, params, train, model=model, damping=lam),
        # mini-batch LiSSA as its earlier defaults ran it: an unchecked stochastic estimate (tol=None); LiSSA's
        # defaults now take full-data steps until the residual is below 1e-2, or refuse
        "lissa (batch 64, depth 1000)": lambda: ifunc.ihvp_lissa(
            loss, params, train, damping=lam, depth=1000, batch_size=64, tol=None
        ),
    }


def pydvl_methods(model, train, lam: float):
    """pyDVL 0.10's CG, LiSSA and direct solve with their defaults, GGN, regularization λ (mean loss)."""
    try:
        from pydvl.influence.torch import CgInfluence, DirectInfluence, LissaInfluence, SecondOrderMode
    except ImportError:
        return {}
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(*train), batch_size=PYDVL_BATCH)
    kw = dict(regularization=lam, second_order_mode=SecondOrderMode.GAUSS_NEWTON)

    def build(cls, **extra):
        def make():
            return cls(model, F.cross_entropy, **kw, **extra).fit(loader)

        return make

    return {
        "pyDVL cg (defaults)": build(CgInfluence, warn_on_max_iteration=False, solve_simultaneously=True),
        "pyDVL lissa (defaults)": build(LissaInfluence, warn_on_max_iteration=False),
        "pyDVL direct": build(DirectInfluence),
    }


def timed(loss, params, build, train, query, peer: bool):
    start = time.perf_counter()
    ihvp = build()
    built = time.perf_counter() - start
    start = time.perf_counter()
    if peer:  # pyDVL's influences <H^{-1} ∇ℓ(z_q), ∇ℓ(z_i)> have our sign: both are + for a helpful example
        scores = ihvp.influences(query[0], query[1], train[0], train[1]).detach()
    else:
        scores = ifunc.attribute(loss, params, ihvp, train, query, progress=False)
    return built, time.perf_counter() - start, scores, getattr(ihvp, "damping", None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["lds", "wide"], choices=["lds", "wide"])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (min / median reported)")
    parser.add_argument("--no-peers", action="store_true", help="skip pyDVL even when installed")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the method labels to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    for name in args.problems:
        model, loss, params, train, query = make_problem(name)
        d = sum(p.numel() for p in params.values())
        print(f"\n== {name}: d = {d:,}, {len(train[1])} train, {len(query[1])} queries, GGN, float64")
        lam_rule = ifunc.ihvp_cg(loss, params, train).damping  # the damping=None rule (Hutchinson, seed 0)
        start = time.perf_counter()
        exact = ifunc.ihvp_explicit(loss, params, train, damping=1e-2)
        print(f"   exact reference built in {time.perf_counter() - start:.2f} s")
        for lam, lam_label in ((None, f"rule λ = {lam_rule:.3g}"), (1e-2, "λ = 1e-2")):
            ref = ifunc.attribute(loss, params, exact.with_damping(lam or lam_rule), train, query, progress=False)
            table = {k: (v, False) for k, v in ours(loss, params, train, model, lam, lam or lam_rule).items()}
            if not args.no_peers:
                table.update({k: (v, True) for k, v in pydvl_methods(model, train, lam or lam_rule).items()})
            if args.only:
                table = {k: v for k, v in table.items() if any(s in k for s in args.only)}
            results: dict[str, list] = {k: [] for k in table}
            for _ in range(args.repeats):
                for label, (build, peer) in table.items():
                    try:
                        results[label].append(timed(loss, params, build, train, query, peer))
                    except Exception as err:  # one failing method must not hide the others
                        results[label].append(err)
            print(f"\n   {lam_label}   (load average {os.getloadavg()[0]:.2f})")
            print(
                f"   {'method':32s} {'build s':>8s} {'attr s':>8s} {'total min':>9s} {'median':>7s} "
                f"{'vs cg':>6s} {'ρ min':>7s} {'ρ mean':>7s}"
            )
            base = None
            for label, runs in results.items():
                ok = [r for r in runs if not isinstance(r, Exception)]
                if not ok:
                    print(f"   {label:32s} failed: {str(runs[0])[:90]}")
                    continue
                totals = [b + a for b, a, _, _ in ok]
                best = min(range(len(ok)), key=lambda i: totals[i])
                built, attr, scores, _ = ok[best]
                rho = spearman(scores.double(), ref)
                base = min(totals) if label.startswith("cg (default") else base
                ratio = f"{min(totals) / base:6.2f}" if base else f"{'':6s}"
                print(
                    f"   {label:32s} {built:8.2f} {attr:8.2f} {min(totals):9.2f} {statistics.median(totals):7.2f} "
                    f"{ratio} {float(rho.min()):7.4f} {float(rho.mean()):7.4f}",
                    flush=True,
                )
            peer, mine = results.get("pyDVL direct", []), results.get("explicit, pyDVL's matrix (EF)", [])
            peer = [r for r in peer if not isinstance(r, Exception)]
            mine = [r for r in mine if not isinstance(r, Exception)]
            if peer and mine:  # the conventions aligned: same matrix, same λ, same sign; scores differ by a scale
                a, b = peer[0][2].double(), mine[0][2].double() * pydvl_scale(d, len(train[1]))
                rho = spearman(a, b)
                print(
                    f"   pyDVL direct vs ifunc explicit on pyDVL's matrix (empirical Fisher, λ matched): ρ min "
                    f"{float(rho.min()):.4f} mean {float(rho.mean()):.4f}, max |Δ| / max |s| "
                    f"{float((a - b).abs().max() / b.abs().max()):.1e}"
                )
    print(f"\nload average after: {os.getloadavg()}")
    print("* the recommended setting: ihvp_cg(..., tol=1e-2, preconditioner=nystrom_preconditioner(op, rank=100))")


if __name__ == "__main__":
    main()
