"""The default curvature of a language model: the exact per-position GGN against the sampled Fisher (EK-FAC).

The exact GGN of outputs with ``P`` positions and ``C`` classes costs ``P·C`` backward passes per chunk; the
sampled Fisher (the default for an ``output_loss`` with a likelihood and several positions) costs one and
estimates the same matrix without bias. This script fits EK-FAC both ways (and the empirical Fisher) on a small
version of the ``benchmarks/lm.py`` transformer, where the exact GGN is affordable, and prints each fit's time
and the per-query Spearman of its pairwise scores against the exact GGN's (and between two Fisher seeds, the
sampling noise).

    python benchmarks/lm_curvature.py            # vocabulary 32, context 16, 256 train / 8 query sequences
"""

from __future__ import annotations

import argparse
import os
import time

import lm  # the benchmarks directory is on the path of a script run from it
import torch

import ifunc


def spearman_per_query(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--query", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm.VOCAB, lm.CONTEXT, lm.WIDTH, lm.BLOCKS = args.vocab, args.context, 32, 1
    path = f"/tmp/lm_curvature_{args.vocab}_{args.context}_{args.train}.pt"
    if not os.path.exists(path):
        lm.make_problem(args.train, args.query, 300, path)
    problem = torch.load(path)
    model = lm.GPT()
    model.load_state_dict(problem["state"])
    model.eval()
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[:, :-1]), lambda o, b: lm.lm_loss(o, b), likelihood="categorical"
    )
    exclude = ifunc.language.untracked(model, params)
    train, query = problem["train"], problem["query"]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.train} x {args.context} tokens, vocabulary {args.vocab}")
    runs = {
        "ggn (exact)": {"curvature": "ggn"},
        "default (fisher)": {},
        "fisher, seed 1": {"curvature": "fisher", "generator": torch.Generator().manual_seed(1)},
        "empirical_fisher": {"curvature": "empirical_fisher"},
    }
    scores = {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        ih = ifunc.ihvp_ekfac(loss, params, train, model=model, exclude=exclude, damping=None, progress=False, **kw)
        fit = time.perf_counter() - t0
        scores[name] = ifunc.attribute(loss, params, ih, train, query, progress=False)
        print(f"{name:18s} fit {fit:7.2f} s", flush=True)
    ref = scores["ggn (exact)"]
    for name, s in scores.items():
        rho = spearman_per_query(s, ref)
        print(f"{name:18s} Spearman vs exact GGN per query: median {rho.median():.3f}, min {rho.min():.3f}")
    rho = spearman_per_query(scores["default (fisher)"], scores["fisher, seed 1"])
    print(f"two Fisher seeds: median {rho.median():.3f}, min {rho.min():.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
