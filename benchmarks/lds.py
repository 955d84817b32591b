"""Linear datamodeling score (LDS) of every ifunc method on a small, real task.

    python benchmarks/lds.py            # 100 half subsets, ~3 minutes on 2 cores
    python benchmarks/lds.py --quick    # 20 subsets, for a smoke run

Task: a 64-16-10 tanh MLP (1,210 parameters) on 400 of scikit-learn's bundled 8×8 digits, trained to
convergence (L-BFGS) on the mean cross-entropy plus weight decay l2/2 ‖θ‖²; 100 test images are the queries
and the measurement is each query's loss. The damping is λ = l2, so every method approximates the inverse
of the regularised objective's Gauss-Newton matrix.

LDS (Park et al. 2023, TRAK): draw M random subsets S_1..S_M holding half of the training set, retrain on
each (from the same initialisation), and record the query losses f_q(S_m). A method's additive prediction
is g_q(S) = −Σ_{i∈S} scores[q, i] (a positive score means the example lowers the query loss). LDS is the
Spearman correlation between f_q(S_m) and g_q(S_m) over the M subsets, averaged over the queries. The
subsets, the retraining and the score come from ``ifunc.evaluate`` (random_subsets, retrain, lds); with
``--out outcomes.h5`` the retrained outcomes are stored as they finish and a killed run resumes.

Ensembles average the scores of models trained from 5 different initialisations on the full training set
(``ifunc.attribute_ensemble``); the subset models are retrained from the first of them, or each from its own
random initialisation with ``--random-init`` (then seed noise is part of what is predicted).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import ifunc
from ifunc.evaluate import lds, random_subsets, retrain

L2 = 1e-2


def load(n_train: int, n_query: int):
    from sklearn.datasets import load_digits

    data, target = load_digits(return_X_y=True)
    x = torch.tensor(data, dtype=torch.float64) / 16.0
    y = torch.tensor(target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train : n_train + n_query], y[n_train : n_train + n_query])


def init_model(seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)
    return model


def fit(model, x, y, *, tol=1e-7, max_iter=1000) -> torch.nn.Module:
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        objective = F.cross_entropy(model(x), y) + 0.5 * L2 * sum((p**2).sum() for p in model.parameters())
        objective.backward()
        return objective

    opt.step(closure)
    return model


def methods(loss, train, model, lam):
    """name -> factory ``params -> iHVP closure``; one entry per method in ifunc."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    return {
        "explicit": lambda p: ifunc.ihvp_explicit(loss, p, train, damping=lam),
        "cg (default tol 1e-5)": lambda p: ifunc.ihvp_cg(loss, p, train, damping=lam),
        "cg, tol 1e-2 + Nystrom preconditioner": lambda p: ifunc.ihvp_cg(
            loss,
            p,
            train,
            damping=lam,
            tol=1e-2,
            preconditioner=ifunc.nystrom_preconditioner(
                ifunc.curvature_operator(loss, p, train), rank=100, damping=None, generator=g()
            ),
        ),
        "cg + EK-FAC preconditioner": lambda p: ifunc.ihvp_cg(
            loss, p, train, damping=lam, preconditioner=ifunc.ihvp_ekfac(loss, p, train, model=model, damping=lam)
        ),
        "arnoldi (rank 100)": lambda p: ifunc.ihvp_arnoldi(loss, p, train, rank=100, damping=lam, generator=g()),
        "nystrom (rank 100)": lambda p: ifunc.ihvp_nystrom(loss, p, train, rank=100, damping=lam, generator=g()),
        "lissa (depth 300)": lambda p: ifunc.ihvp_lissa(
            loss, p, train, damping=lam, depth=300, batch_size=100, generator=g(), tol=None
        ),
        "datainf": lambda p: ifunc.ihvp_datainf(loss, p, train, damping=lam),
        "ekfac": lambda p: ifunc.ihvp_ekfac(loss, p, train, model=model, damping=lam),
        "kfac": lambda p: ifunc.ihvp_kfac(loss, p, train, model=model, damping=lam),
        "diagonal": lambda p: ifunc.ihvp_diagonal(loss, p, train, model=model, damping=lam),
        "identity (gradient dot products)": lambda p: ifunc.ihvp_identity(p, model=model, damping=lam),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 subsets instead of 100")
    parser.add_argument("--subsets", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5, help="ensemble members (default 5)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="retrain each subset from its own random initialisation (TRAK's setting) instead of the first seed's",
    )
    parser.add_argument(
        "--out", default=None, help="HDF5 file for the retrained outcomes: a killed run resumes where it stopped"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_subsets = args.subsets or (20 if args.quick else 100)
    (x, y), (xq, yq) = load(args.n_train, args.queries)
    n = len(y)
    start = time.perf_counter()
    models = [fit(init_model(seed), x, y) for seed in range(args.seeds)]
    model = models[0]
    with torch.no_grad():
        acc = (model(xq).argmax(1) == yq).double().mean().item()
    print(
        f"digits MLP 64-16-10 (1,210 parameters), {n} training images, {len(yq)} query images, l2 = damping = "
        f"{L2}; test accuracy {acc:.3f}; {args.seeds} seeds trained in {time.perf_counter() - start:.1f} s"
    )

    # ground truth: retrain on random half subsets (ifunc.evaluate.retrain; resumable with --out)
    masks = random_subsets(n, n_subsets, fraction=0.5, generator=torch.Generator().manual_seed(1))
    own_seed = {tuple(row.nonzero().flatten().tolist()): 1000 + m for m, row in enumerate(masks)}

    def train_fn(idx):
        return fit(init_model(own_seed[tuple(idx.tolist())] if args.random_init else 0), x[idx], y[idx])

    def measure(sub):
        with torch.no_grad():
            return F.cross_entropy(sub(xq), yq, reduction="none")

    start = time.perf_counter()
    outcomes = retrain(train_fn, measure, masks, out=args.out)  # [n_subsets, n_query]
    init = "its own random initialisation" if args.random_init else "the first seed's initialisation"
    print(f"retrained on {n_subsets} half subsets, each from {init}, in {time.perf_counter() - start:.1f} s\n")

    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    train, query = (x, y), (xq, yq)
    params = [ifunc.params_of(mod) for mod in models]
    table = methods(loss, train, model, L2)
    ensembles = {
        "explicit": table["explicit"],
        "ekfac": table["ekfac"],
        "identity (gradient dot products)": table["identity (gradient dot products)"],
    }

    print(f"| method | LDS (mean ± s.e. over {len(yq)} queries) | seconds |")
    print("|---|---|---|")
    rows = [
        (name, lambda f=f: ifunc.attribute(loss, params[0], f(params[0]), train, query, progress=False))
        for name, f in table.items()
    ]
    rows += (
        [
            (
                f"{name}, ensemble of {args.seeds} seeds",
                lambda f=f: ifunc.attribute_ensemble(loss, params, f, train, query, progress=False),
            )
            for name, f in ensembles.items()
        ]
        if args.seeds > 1
        else []
    )
    for name, run in rows:
        start = time.perf_counter()
        scores = run()
        seconds = time.perf_counter() - start
        r = lds(scores, masks, outcomes)
        print(f"| {name} | {r.mean():.3f} ± {r.std() / len(r) ** 0.5:.3f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
