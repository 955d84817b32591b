"""EK-FAC: ifunc vs Kronfluence on the same model and data, side by side in one run.

Workload (the peers' speed workload): MLP 784-512-512-10 with ReLU, random 28×28 inputs and labels, briefly trained;
5,000 training and 100 query examples; float32, CPU, empirical Fisher, damping 1e-3 for both; full
``[100, 5000]`` pairwise score matrix. Each library runs in its own subprocess (so peak RSS is its own);
the parent prints fit time (covariances + eigendecompositions + EK-FAC eigenvalues), pairwise-score time,
peak RSS and the Pearson / Spearman correlation between the two score matrices, with ratios.

A second table measures EK-FAC as a conjugate-gradient preconditioner (``ifunc.ihvp_cg(...,
preconditioner=ekfac)``) on a smaller MLP, where CG on the GGN is affordable: CG iterations to a relative
residual of 1e-4 for several dampings and EK-FAC variants.

Kronfluence is not an ifunc dependency: ``pip install kronfluence`` by hand to run the comparison; without
it the ifunc column is still measured.

Usage:
  python benchmarks/ekfac.py            # full size (about 3 minutes on 2 cores)
  python benchmarks/ekfac.py --small    # 1,000 train / 20 query
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
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ifunc  # noqa: E402

DAMPING = 1e-3
QUERY_RANK = 32


def mlp(sizes=(784, 512, 512, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_problem(n_train: int, n_query: int, path: str, steps: int = 100) -> None:
    """Seeded random data, an MLP trained briefly with Adam; saved to ``path``."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(n_train + n_query, 784, generator=gen)
    y = torch.randint(0, 10, (n_train + n_query,), generator=gen)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _step in range(steps):
        idx = torch.randint(0, n_train, (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    torch.save(
        {"state": model.state_dict(), "x": x[:n_train], "y": y[:n_train], "xq": x[n_train:], "yq": y[n_train:]}, path
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ifunc(problem: dict, out: str) -> dict:
    model = mlp()
    model.load_state_dict(problem["state"])
    model.eval()
    params = ifunc.params_of(model)

    def loss(p, b):
        return F.cross_entropy(ifunc.call(model, p, b[0]), b[1], reduction="sum")

    train, query = (problem["x"], problem["y"]), (problem["xq"], problem["yq"])
    t0, c0 = time.perf_counter(), time.process_time()
    factors = ifunc.fit_kronecker_factors(
        loss, params, train, model=model, curvature="empirical_fisher", chunk_size=500
    )
    ihvp = ifunc.ihvp_ekfac(loss, params, factors, model=model, damping=DAMPING)
    t1, c1 = time.perf_counter(), time.process_time()
    scores = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=500)
    t2, c2 = time.perf_counter(), time.process_time()
    rss = peak_rss_mb()
    low = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=500, query_rank=QUERY_RANK)
    t3 = time.perf_counter()
    torch.save({"scores": scores, "low_rank": low}, out)
    return {
        "fit": t1 - t0,
        "score": t2 - t1,
        "fit_cpu": c1 - c0,
        "score_cpu": c2 - c1,
        "rss": rss,
        "score_low_rank": t3 - t2,
    }


def run_kronfluence(problem: dict, out: str) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model = mlp()
    model.load_state_dict(problem["state"])
    model.eval()
    task = Classification()
    model = prepare_model(model, task)
    train = TensorDataset(problem["x"], problem["y"])
    query = TensorDataset(problem["xq"], problem["yq"])
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        t0, c0 = time.perf_counter(), time.process_time()
        analyzer.fit_all_factors(
            "ekfac",
            dataset=train,
            per_device_batch_size=500,
            overwrite_output_dir=True,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
        )
        t1, c1 = time.perf_counter(), time.process_time()
        analyzer.compute_pairwise_scores(
            "s",
            "ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=500,
            score_args=ScoreArguments(damping_factor=DAMPING),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        t2, c2 = time.perf_counter(), time.process_time()
    torch.save({"scores": scores.detach().clone()}, out)
    return {"fit": t1 - t0, "score": t2 - t1, "fit_cpu": c1 - c0, "score_cpu": c2 - c1, "rss": peak_rss_mb()}


def worker(which: str, problem_path: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    problem = torch.load(problem_path)
    result = (run_ifunc if which == "ifunc" else run_kronfluence)(problem, out)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(which: str, problem_path: str, out: str, threads: int) -> dict | None:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            which,
            "--problem",
            problem_path,
            "--out",
            out,
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"[{which} failed]\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _cg_problem(scale_inputs: bool):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = mlp((64, 64, 64, 10)).double()
    x = torch.randn(500, 64, generator=gen, dtype=torch.float64)
    if scale_inputs:  # ill-conditioned input covariance: feature scales from 1e-2 to 10
        x = x * torch.logspace(-2, 1, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (500,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        idx = torch.randint(0, 500, (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda o, b: F.cross_entropy(o, b[1], reduction="sum")
    )
    return model, params, loss, (x, y)


def preconditioner_table(threads: int) -> None:
    """CG iterations on the GGN of a small MLP, with and without EK-FAC / K-FAC preconditioning."""
    torch.set_num_threads(threads)
    dampings = [1e-3, 1e-2, 1e-1]
    print(
        "\nEK-FAC as CG preconditioner (ifunc.ihvp_cg(..., preconditioner=ekfac)): MLP 64-64-64-10 (8,970 "
        "params), 500 examples, GGN, 4 right-hand sides, tol 1e-4. CG iterations (max over right-hand sides):"
    )
    for scaled in (False, True):
        model, params, loss, data = _cg_problem(scaled)
        op = ifunc.curvature_operator(loss, params, data, curvature="ggn")
        B = ifunc.per_sample_grads(loss, params, (data[0][:4], data[1][:4]))
        fit = lambda **kw: ifunc.fit_kronecker_factors(loss, params, data, model=model, **kw)  # noqa: E731
        fits = {
            "EK-FAC, GGN (exact output Hessian)": fit(curvature="ggn"),
            "EK-FAC, true Fisher (1 sample)": fit(sample="categorical"),
            "EK-FAC, empirical Fisher": fit(curvature="empirical_fisher"),
        }
        rows = (
            [("none", None, None)]
            + [(k, ifunc.ihvp_ekfac, v) for k, v in fits.items()]
            + [("K-FAC, GGN", ifunc.ihvp_kfac, fits["EK-FAC, GGN (exact output Hessian)"])]
        )
        title = "inputs with feature scales 1e-2..10" if scaled else "standard normal inputs"
        print(f"  {title:40s}" + "".join(f"{'λ=' + format(d, 'g'):>10s}" for d in dampings))
        for name, method, factors in rows:
            cells = []
            for lam in dampings:
                pre = None if method is None else method(loss, params, factors, damping=lam).solve
                res = ifunc.cg_solve(lambda P: op.matvec(P) + lam * P, B, tol=1e-4, maxiter=1000, preconditioner=pre)
                cells.append(f"{int(res.iterations.max())}{'' if bool(res.converged.all()) else '*'}")
            print(f"  {name:40s}" + "".join(f"{c:>10s}" for c in cells))
    print("  (* = not converged in 1,000 iterations)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="1,000 train / 20 query instead of 5,000 / 100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cg", action="store_true", help="skip the preconditioner table")
    ap.add_argument("--worker", choices=["ifunc", "kronfluence"], help=argparse.SUPPRESS)
    ap.add_argument("--problem", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.problem, args.out, args.threads)
        return
    n_train, n_query = (1000, 20) if args.small else (5000, 100)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.pt")
        torch.set_num_threads(args.threads)
        make_problem(n_train, n_query, path)
        res = {"ifunc": spawn("ifunc", path, os.path.join(tmp, "ifunc.pt"), args.threads)}
        try:
            import kronfluence  # noqa: F401

            res["kronfluence"] = spawn("kronfluence", path, os.path.join(tmp, "kf.pt"), args.threads)
        except ImportError:
            print("kronfluence is not installed (pip install kronfluence): comparison skipped")
            res["kronfluence"] = None
        scores = {
            k: torch.load(os.path.join(tmp, f))
            for k, f in (("ifunc", "ifunc.pt"), ("kronfluence", "kf.pt"))
            if res.get(k) and os.path.exists(os.path.join(tmp, f))
        }
    print(
        f"\nEK-FAC, MLP 784-512-512-10 (669,706 params), {n_train:,} train / {n_query} query, float32, "
        f"empirical Fisher, damping {DAMPING:g}, {args.threads} threads, torch {torch.__version__}, "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':22s}{'ifunc':>12s}{'Kronfluence':>14s}{'ratio':>10s}   (ratio = ifunc / Kronfluence)")
    ours, theirs = res["ifunc"], res.get("kronfluence")
    for key, label, unit in (
        ("fit", "fit, wall (s)", "{:.2f}"),
        ("score", "pairwise, wall (s)", "{:.2f}"),
        ("fit_cpu", "fit, CPU (s)", "{:.2f}"),
        ("score_cpu", "pairwise, CPU (s)", "{:.2f}"),
        ("rss", "peak RSS (MB)", "{:.0f}"),
    ):
        a = unit.format(ours[key]) if ours else "-"
        b = unit.format(theirs[key]) if theirs else "-"
        r = f"{ours[key] / theirs[key]:.2f}" if ours and theirs else "-"
        print(f"{label:22s}{a:>12s}{b:>14s}{r:>10s}")
    if ours and theirs:
        t_ours, t_theirs = ours["fit"] + ours["score"], theirs["fit"] + theirs["score"]
        print(f"{'total (s)':22s}{t_ours:>12.2f}{t_theirs:>14.2f}{t_ours / t_theirs:>10.2f}")
    if "ifunc" in scores:
        full, low = scores["ifunc"]["scores"].double(), scores["ifunc"]["low_rank"].double()
        print(
            f"ifunc with query_rank={QUERY_RANK}: pairwise {ours['score_low_rank']:.2f} s wall, Pearson with "
            f"full rank {float(torch.corrcoef(torch.stack([full.flatten(), low.flatten()]))[0, 1]):.4f}, "
            f"Spearman {rank_corr(full, low):.4f}"
        )
    if len(scores) == 2:
        a, b = scores["ifunc"]["scores"].double(), scores["kronfluence"]["scores"].double()
        pearson = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        print(
            f"score agreement: Pearson {pearson:.5f}, Spearman {rank_corr(a, b):.5f}, "
            f"max |diff| / max |score| {float((a - b).abs().max() / b.abs().max()):.2e}"
        )
    if not args.skip_cg:
        preconditioner_table(args.threads)


if __name__ == "__main__":
    main()
