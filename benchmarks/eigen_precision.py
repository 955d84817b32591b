"""How much precision the Kronecker eigendecompositions need: scores from float32 against float64 eigenbases.

EK-FAC refits its eigenvalues ``Λ`` in whatever basis it is given, and K-FAC's eigenvalues enter damped, so a
float32 ``eigh`` (2-4x cheaper than float64 on large factors) may rank the training data as float64 does. This
benchmark fits each closure twice on the same weights and data, ``eigen_dtype=torch.float64`` and
``eigen_dtype=torch.float32`` (both from float32 or float64 parameters, as the workload has them), and compares the
``[q, n]`` scores: Spearman per query (min / mean), top-10 overlap per query (mean / min), the largest relative
difference; and, on the digits task, the LDS of each. Where labels are sampled (GPT-2), the yardstick beside it:
how far float64 scores move when the labels are drawn from another seed.

Workloads:

- ``lm``: the 2-block GPT of ``benchmarks/lm.py`` (float32, 9 Linear layers, 2,000 train × 20 query sequences;
  ``--small``: 400 × 10), empirical Fisher at damping 1e-3 (that benchmark's setting) and at the damping rule
  (0.1 × mean eigenvalue per layer), EK-FAC and K-FAC;
- ``gpt2``: GPT-2 small's shape (``benchmarks/gpt2_small.py``; random weights seeded 0, float32), the MLP layers of
  the first ``--gpt2-layers`` blocks (default 2: four factors of 3072² and four of ~768²), 64 train × 16 query
  sequences of 128 tokens, one sampled label per position, the damping rule, EK-FAC and K-FAC;
- ``lds``: the digits MLP of ``benchmarks/lds.py`` (float64, 1,210 parameters, λ = l2), EK-FAC and K-FAC, LDS over
  ``--subsets`` retrained half subsets (default 50).

    python benchmarks/eigen_precision.py                      # all three (~10 minutes on 2 cores)
    python benchmarks/eigen_precision.py --small --workloads lm,lds --subsets 20

Fit times (seconds, one process, 2 threads) are printed for each dtype with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ifunc  # noqa: E402
from ifunc.quality import spearman  # noqa: E402

DTYPES = (torch.float64, torch.float32)


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per query, the fraction of ``a``'s top-``k`` training examples that are in ``b``'s top-``k``."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)])


def compare(name: str, fit_scores, resampled=None) -> dict:
    """Fit and score in each dtype (``fit_scores(dtype) -> scores``), then print the agreement row.

    ``resampled()``: float64 scores with labels sampled from another seed; their agreement with the float64 scores
    is the yardstick (how far the sampled Fisher itself moves the scores).
    """
    scores, seconds = {}, {}
    for dtype in DTYPES:
        t0 = time.perf_counter()
        scores[dtype] = fit_scores(dtype).double()
        seconds[dtype] = time.perf_counter() - t0
    ref, got = scores[torch.float64], scores[torch.float32]
    rho = spearman(got, ref)
    top = top_overlap(got, ref)
    rel = float((got - ref).abs().max() / ref.abs().max())
    noise = "—"
    if resampled is not None:
        other = resampled().double()
        r, t = spearman(other, ref), top_overlap(other, ref)
        noise = f"{r.min():.4f} / {r.mean():.4f}; top-10 {t.mean():.3f}"
    print(
        f"| {name} | {seconds[torch.float64]:.2f} | {seconds[torch.float32]:.2f} | {rho.min():.6f} / "
        f"{rho.mean():.6f} | {top.mean():.3f} / {top.min():.2f} | {rel:.1e} | {noise} | {os.getloadavg()[0]:.1f} |",
        flush=True,
    )
    return scores


def lm_workload(small: bool) -> None:
    import lm  # the benchmark next to this one: model, grammar, training

    n_train, n_query, steps = (400, 10, 60) if small else (2000, 20, 200)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "eigen_precision_lm.pt")
    lm.make_problem(n_train, n_query, steps, path)
    problem = torch.load(path)
    model, params, loss = lm.trained(problem)
    exclude = ifunc.language.untracked(model, params)
    train, query = problem["train"], problem["query"]
    for method in ("ekfac", "kfac"):
        build = ifunc.ihvp_ekfac if method == "ekfac" else ifunc.ihvp_kfac
        for damping in (lm.DAMPING, None):

            def run(dtype, build=build, damping=damping):
                ih = build(
                    loss,
                    params,
                    train,
                    model=model,
                    exclude=exclude,
                    damping=damping,
                    curvature="empirical_fisher",
                    eigen_dtype=dtype,
                )
                return ifunc.attribute(loss, params, ih, train, query, progress=False)

            compare(f"lm {method}, damping {damping or 'rule'}", run)


def gpt2_workload(layers: int) -> None:
    import gpt2_small

    model = gpt2_small.make_model(layers)
    params = ifunc.params_of(model)
    train_ids, query_ids = gpt2_small.make_data(64, 16, 128)
    train, query = {"input_ids": train_ids}, {"input_ids": query_ids}
    loss = ifunc.language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]).logits)
    modules = ifunc.language.transformer_modules(model, attention=False)
    exclude = ifunc.language.untracked(model, params, modules=modules)
    for method in ("ekfac", "kfac"):
        build = ifunc.ihvp_ekfac if method == "ekfac" else ifunc.ihvp_kfac

        def run(dtype, build=build, seed=0):
            ih = build(
                loss,
                params,
                train,
                model=model,
                modules=modules,
                exclude=exclude,
                sample="categorical",
                generator=torch.Generator().manual_seed(seed),
                eigen_dtype=dtype,
            )
            return ifunc.attribute(loss, params, ih, train, query, progress=False)

        resampled = lambda run=run: run(torch.float64, seed=1)  # noqa: E731
        compare(f"GPT-2 shape, {layers} blocks' MLPs, {method}, damping rule", run, resampled)


def lds_workload(n_subsets: int) -> None:
    import lds as task
    import torch.nn.functional as F

    from ifunc.evaluate import lds, random_subsets, retrain

    (x, y), (xq, yq) = task.load(400, 100)
    model = task.fit(task.init_model(0), x, y)
    masks = random_subsets(len(y), n_subsets, fraction=0.5, generator=torch.Generator().manual_seed(1))

    def measure(sub):
        with torch.no_grad():
            return F.cross_entropy(sub(xq), yq, reduction="none")

    outcomes = retrain(lambda idx: task.fit(task.init_model(0), x[idx], y[idx]), measure, masks)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    params = ifunc.params_of(model)
    for method in ("ekfac", "kfac"):
        build = ifunc.ihvp_ekfac if method == "ekfac" else ifunc.ihvp_kfac

        def run(dtype, build=build):
            ih = build(loss, params, (x, y), model=model, damping=task.L2, eigen_dtype=dtype)
            return ifunc.attribute(loss, params, ih, (x, y), (xq, yq), progress=False)

        scores = compare(f"digits MLP (float64), {method}, λ = l2", run)
        print(
            f"|   LDS over {n_subsets} subsets: float64 {lds(scores[torch.float64], masks, outcomes).mean():.4f}, "
            f"float32 {lds(scores[torch.float32], masks, outcomes).mean():.4f} | | | | | | | |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--workloads", default="lm,gpt2,lds", help="comma-separated subset of lm,gpt2,lds")
    ap.add_argument("--small", action="store_true", help="the LM at 400 train / 10 query sequences")
    ap.add_argument("--gpt2-layers", type=int, default=2)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}\n", flush=True)
    print(
        "| workload, closure | fit + score, float64 eigh (s) | float32 eigh (s) | Spearman per query (min / mean) | "
        "top-10 overlap (mean / min) | max rel. difference | float64 at another label seed: Spearman (min / mean) | "
        "load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        if workload == "lm":
            lm_workload(args.small)
        elif workload == "gpt2":
            gpt2_workload(args.gpt2_layers)
        elif workload == "lds":
            lds_workload(args.subsets)
        else:
            raise SystemExit(f"unknown workload {workload!r}: lm, gpt2 or lds")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
