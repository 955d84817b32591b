"""ifunc side by side with Kronfluence, dattri and pyDVL: the same model, data and damping, every shared method.

    python benchmarks/compare.py            # ~5 minutes on 2 cores with all peers installed
    python benchmarks/compare.py --quick    # 300 training images

The peers are not ifunc dependencies; install them by hand for this benchmark (a separate virtual
environment with ``--system-site-packages`` keeps them out of yours):

    pip install kronfluence==1.0.1 dattri==0.3.0 "pydvl[torch]==0.10.0"

A library that is not installed is skipped with a message. Workload: a 64-32-10 tanh MLP (2,410 parameters,
float32) trained on 1,000 of scikit-learn's bundled 8×8 digits; the full ``[50, 1000]`` score matrix for 50
test images; damping λ = 1e-2 for every method. Each (library, method) runs in its own subprocess with one
thread so that its wall time and peak RSS are its own (peak RSS includes the interpreter and torch, ~300 MB).

Columns: wall time (build + scoring), peak RSS, the ratio of the peer's time to ifunc's for the same method,
and agreement (Spearman, per query, averaged) with the exact reference — ifunc's dense solve on the damped
Gauss-Newton matrix, float64. All four libraries return scores with the same sign (positive = helpful;
checked: self-influences are positive), so none is flipped.

Method settings follow each library's own names: CG to relative tolerance 1e-4 (dattri: its fixed
``max_iter``, which ignores the tolerance), Arnoldi/Nyström rank 50, LiSSA depth 300 with batches of 100.
Curvature: ifunc uses the Gauss-Newton matrix; dattri's iHVPs use the Hessian (all they offer) and so does
pyDVL (its Gauss-Newton mode returned plain gradient dot products, scaled, or NaN here), so their agreement
also measures the Hessian–GGN gap; Kronfluence estimates its Fisher with sampled labels.
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

import torch
import torch.nn.functional as F

DAMPING = 1e-2
RANK = 50
METHODS = {
    "ifunc": ["explicit", "cg", "arnoldi", "nystrom", "lissa", "datainf", "ekfac", "kfac", "diagonal", "identity"],
    "kronfluence": ["ekfac", "kfac", "diagonal", "identity"],
    "dattri": ["explicit", "cg", "arnoldi", "lissa", "datainf", "ekfac"],
    "pydvl": ["explicit", "cg", "arnoldi", "nystrom", "lissa", "ekfac"],
}
MODULE = {"ifunc": "ifunc", "kronfluence": "kronfluence", "dattri": "dattri", "pydvl": "pydvl"}


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def make_problem(n_train: int, n_query: int, path: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    gen = torch.Generator().manual_seed(0)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x[:n_train]), y[:n_train]).backward()
        opt.step()
    torch.save(
        {
            "state": model.state_dict(),
            "x": x[:n_train],
            "y": y[:n_train],
            "xq": x[n_train : n_train + n_query],
            "yq": y[n_train : n_train + n_query],
        },
        path,
    )


def load_model(problem: dict) -> torch.nn.Module:
    model = make_model()
    model.load_state_dict(problem["state"])
    return model.eval()


# ------------------------------------------------------------------------------------------- workers
def run_ifunc(method: str, problem: dict, dtype=torch.float32) -> torch.Tensor:
    import ifunc

    model = load_model(problem).to(dtype)
    x, y, xq, yq = problem["x"].to(dtype), problem["y"], problem["xq"].to(dtype), problem["yq"]
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    train = (x, y)
    g = torch.Generator().manual_seed(0)
    build = {
        "explicit": lambda: ifunc.ihvp_explicit(loss, params, train, damping=DAMPING),
        "cg": lambda: ifunc.ihvp_cg(loss, params, train, damping=DAMPING),
        "arnoldi": lambda: ifunc.ihvp_arnoldi(loss, params, train, rank=RANK, damping=DAMPING, generator=g),
        "nystrom": lambda: ifunc.ihvp_nystrom(loss, params, train, rank=RANK, damping=DAMPING, generator=g),
        "lissa": lambda: ifunc.ihvp_lissa(
            loss, params, train, damping=DAMPING, depth=300, batch_size=100, generator=g, tol=None
        ),
        "datainf": lambda: ifunc.ihvp_datainf(loss, params, train, damping=DAMPING),
        "ekfac": lambda: ifunc.ihvp_ekfac(loss, params, train, model=model, damping=DAMPING),
        "kfac": lambda: ifunc.ihvp_kfac(loss, params, train, model=model, damping=DAMPING),
        "diagonal": lambda: ifunc.ihvp_diagonal(loss, params, train, model=model, damping=DAMPING),
        "identity": lambda: ifunc.ihvp_identity(params, model=model, damping=DAMPING),
    }[method]
    return ifunc.attribute(loss, params, build(), train, (xq, yq), progress=False)


def run_kronfluence(method: str, problem: dict) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class Classify(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            y = batch[1]
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    task = Classify()
    model = prepare_model(load_model(problem), task)
    train, query = TensorDataset(problem["x"], problem["y"]), TensorDataset(problem["xq"], problem["yq"])
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("compare", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors(
            "f",
            dataset=train,
            per_device_batch_size=len(train),
            overwrite_output_dir=True,
            factor_args=FactorArguments(strategy=method),
        )
        analyzer.compute_pairwise_scores(
            "s",
            "f",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=len(train),
            overwrite_output_dir=True,
            score_args=ScoreArguments(damping_factor=DAMPING),
        )
        return analyzer.load_pairwise_scores("s")["all_modules"].detach().clone()


def run_dattri(method: str, problem: dict) -> torch.Tensor:
    from dattri import algorithm
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = load_model(problem)

    def loss_func(params, data):
        x, y = data
        if x.dim() == 1:  # dattri vmaps single examples for per-example gradients
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(model, params, x), y)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    train = DataLoader(TensorDataset(problem["x"], problem["y"]), batch_size=len(problem["y"]))
    query = DataLoader(TensorDataset(problem["xq"], problem["yq"]), batch_size=len(problem["yq"]))
    attributor = {
        "explicit": lambda: algorithm.IFAttributorExplicit(task, regularization=DAMPING),
        "cg": lambda: algorithm.IFAttributorCG(task, regularization=DAMPING, max_iter=50, tol=1e-4),
        "arnoldi": lambda: algorithm.IFAttributorArnoldi(
            task, regularization=DAMPING, proj_dim=RANK, max_iter=2 * RANK
        ),
        "lissa": lambda: algorithm.IFAttributorLiSSA(task, damping=DAMPING, recursion_depth=300, batch_size=100),
        "datainf": lambda: algorithm.IFAttributorDataInf(task, regularization=DAMPING),
        "ekfac": lambda: algorithm.IFAttributorEKFAC(task, damping=DAMPING),
    }[method]()
    attributor.cache(train)
    return attributor.attribute(train, query).T.detach().clone()  # dattri returns [n_train, n_query]


def run_pydvl(method: str, problem: dict) -> torch.Tensor:
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
        LissaInfluence,
        NystroemSketchInfluence,
    )
    from pydvl.influence.torch.util import SecondOrderMode
    from torch.utils.data import DataLoader, TensorDataset

    model = load_model(problem)
    loss = F.cross_entropy
    # pyDVL 0.10's GAUSS_NEWTON mode returned scores equal to plain gradient dot products (batch 100) or NaN
    # (one full batch) on this model, so its default, the Hessian, is used
    ggn = dict(second_order_mode=SecondOrderMode.HESSIAN)
    infl = {
        "explicit": lambda: DirectInfluence(model, loss, regularization=DAMPING, **ggn),
        "cg": lambda: CgInfluence(model, loss, regularization=DAMPING, rtol=1e-4, solve_simultaneously=True, **ggn),
        "arnoldi": lambda: ArnoldiInfluence(model, loss, regularization=DAMPING, rank=RANK, **ggn),
        "nystrom": lambda: NystroemSketchInfluence(model, loss, regularization=DAMPING, rank=RANK, **ggn),
        "lissa": lambda: LissaInfluence(model, loss, regularization=DAMPING, maxiter=300, **ggn),
        "ekfac": lambda: EkfacInfluence(model, hessian_regularization=DAMPING),
    }[method]()
    infl = infl.fit(DataLoader(TensorDataset(problem["x"], problem["y"]), batch_size=100))
    up = infl.influences(problem["xq"], problem["yq"], problem["x"], problem["y"])
    return up.detach().clone()  # same sign as ifunc: self-influences come out positive


PRELOAD = {
    "ifunc": ["ifunc"],
    "kronfluence": ["kronfluence.analyzer"],
    "dattri": ["dattri.algorithm", "dattri.task"],
    "pydvl": ["pydvl.influence.torch"],
}


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM; ru_maxrss would include the parent's, kept across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(library: str, method: str, problem_path: str, out: str) -> None:
    import importlib

    torch.set_num_threads(1)
    for name in PRELOAD[library]:  # imports are not part of the measured time
        importlib.import_module(name)
    problem = torch.load(problem_path)
    start = time.perf_counter()
    scores = {"ifunc": run_ifunc, "kronfluence": run_kronfluence, "dattri": run_dattri, "pydvl": run_pydvl}[library](
        method, problem
    )
    seconds = time.perf_counter() - start
    torch.save(scores.double(), out)
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb()}))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Row-wise Spearman correlation (:func:`ifunc.quality.spearman`), averaged over the rows."""
    from ifunc.quality import spearman as row_spearman  # the workers import ifunc late, on purpose

    return float(row_spearman(a, b).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--libraries", default="ifunc,kronfluence,dattri,pydvl")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per (library, method)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    import importlib.util

    n_train = 300 if args.quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.pt")
        make_problem(n_train, 50, path)
        problem = torch.load(path)
        reference = run_ifunc("explicit", problem, dtype=torch.float64)
        print(
            f"digits MLP 64-32-10 (2,410 parameters, float32), {n_train} training / 50 query images, "
            f"damping {DAMPING}, 1 thread per run; reference: ifunc explicit GGN solve in float64\n"
        )
        print("| library | method | seconds | × ifunc time | peak RSS MB | Spearman vs exact |")
        print("|---|---|---|---|---|---|")
        ours: dict[str, float] = {}
        for library in args.libraries.split(","):
            if importlib.util.find_spec(MODULE[library]) is None:
                print(f"| {library} | (not installed: pip install {library}) | | | | |")
                continue
            for method in METHODS[library]:
                out = os.path.join(tmp, f"{library}-{method}.pt")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", library, method, path, out]
                env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                except subprocess.TimeoutExpired:
                    print(f"| {library} | {method} | > {args.timeout:.0f} (stopped) | | | |", flush=True)
                    continue
                if proc.returncode != 0:
                    error = (proc.stderr.strip().splitlines() or ["?"])[-1][:90]
                    print(f"| {library} | {method} | failed: {error} | | | |", flush=True)
                    continue
                stats = json.loads(proc.stdout.strip().splitlines()[-1])
                scores = torch.load(out)
                if library == "ifunc":
                    ours[method] = stats["seconds"]
                ratio = f"{stats['seconds'] / ours[method]:.1f}" if method in ours else ""
                finite = bool(torch.isfinite(scores).all())
                rho = f"{spearman(reference, scores):.3f}" if finite else "non-finite scores"
                print(
                    f"| {library} | {method} | {stats['seconds']:.2f} | {ratio} | {stats['rss_mb']:.0f} | {rho} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
