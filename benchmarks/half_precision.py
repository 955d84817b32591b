"""Half precision: how far bfloat16 models and bfloat16 score contractions move ifunc's scores from float32.

Two questions, one script (under two minutes on two shared cores):

1. **A bfloat16 model** (how language models are loaded) against the same trained weights in float32: fit and
   score both, then per query the Spearman correlation of the two rows of scores and the overlap of their top-10
   training examples. Workloads: the language model of ``benchmarks/lm.py``, smaller (200 training and 10 query
   sequences of 64 tokens, 60 training steps; ``--full``: 400 sequences, as its ``--small``; its 2,000 / 20 take
   many minutes in bfloat16 on a CPU without bfloat16 units), EK-FAC (``--full``: also K-FAC and identity) with the
   embeddings and LayerNorms left out as there; and an MLP 64-128-128-10 trained briefly on a seeded random task
   (2,000 training and 50 query examples), EK-FAC, Arnoldi (rank 64) and DataInf. The float32 run uses the trained
   float32 weights, the bfloat16 run their bfloat16 rounding (``model.to(torch.bfloat16)``, as a checkpoint loaded
   in bfloat16): the figures include the change of the weights, not only of the arithmetic; for the MLP a third
   run, float32 arithmetic on the bfloat16-rounded weights, separates the two, and a fourth, the bfloat16 model
   with its cross-entropy taken of float32 logits (``F.cross_entropy(out.float(), y)``), shows where the rest goes:
   ``1 − p_y`` of a confident prediction is below bfloat16's spacing near 1 (``2^-8``), so its gradient rounds away.
2. **A bfloat16 contraction** of a float32 model, ``attribute(..., dtype=torch.bfloat16)``, against the float32
   one: relative error of the scores (Frobenius), per-query Spearman, and wall time of the scoring call, for the
   generic scorer (``ihvp_identity`` without a model: per-example gradients and one ``[q, d] × [d, b]`` product
   per chunk; the MLP, 50 queries × 2,000 examples, 26k parameters) and the Kronecker scorer (EK-FAC with
   ``model=``: per-layer ``Σ_t g_tᵀ Q̃ a_t``; the language model, pairwise and per-token, the per-token scores
   over the first 50 training sequences, ``--full``: all).

    python benchmarks/half_precision.py            # both parts, about 2 minutes on two shared cores
    python benchmarks/half_precision.py --full     # the larger LM, K-FAC and identity too (about 6 minutes)

Prints the load average before and after (the machine is shared: times are only comparable within one run).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from lm import GPT, lm_loss, make_problem  # the benchmarks directory is on the path of a script run from it
from torch import nn

import ifunc

DAMPING = 1e-3


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[q]``: the Spearman correlation of row ``i`` of ``a`` with row ``i`` of ``b`` (ranks, no ties expected)."""
    ra, rb = a.double().argsort(1).argsort(1).double(), b.double().argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """``[q]``: the fraction of row ``i``'s top-``k`` training examples under ``a`` also top-``k`` under ``b``."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)])


def agreement(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """One line: per-query Spearman and top-10 overlap of ``a`` against ``b`` (mean and worst query)."""
    rho, top = spearman_rows(a, b), top_overlap(a, b)
    print(
        f"  {name:28s} Spearman mean {rho.mean():.3f} min {rho.min():.3f}   top-10 overlap mean {top.mean():.2f} "
        f"min {top.min():.2f}   rel. error {float((a.double() - b.double()).norm() / b.double().norm()):.2e}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------ the MLP


def mlp_problem() -> tuple[nn.Module, tuple, tuple]:
    """An MLP 64-128-128-10 trained for 300 Adam steps on a seeded random teacher task; (model, train, query)."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 10, generator=gen)
    x = torch.randn(2050, 64, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(2050, 10, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(idx: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    for idx in torch.randint(0, 2000, (300, 64), generator=gen):  # 300 steps of 64 seeded draws
        step(idx)
    return model.eval(), (x[:2000], y[:2000]), (x[2000:], y[2000:])


def mlp_scores(
    model: nn.Module, train: tuple, query: tuple, method: str, dtype: torch.dtype, upcast: bool = False
) -> torch.Tensor:
    """Fit + pairwise scores; ``upcast``: the cross-entropy of the logits cast to float32 (``out.float()``)."""
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]),
        lambda out, b: F.cross_entropy(out.float() if upcast else out, b[1], reduction="sum"),
    )
    train = (train[0].to(dtype), train[1])
    query = (query[0].to(dtype), query[1])
    if method == "ekfac":
        ih = ifunc.ihvp_ekfac(loss, params, train, model=model, damping=DAMPING, curvature="ggn")
    elif method == "arnoldi":
        ih = ifunc.ihvp_arnoldi(loss, params, train, rank=64, damping=DAMPING)
    else:
        ih = ifunc.ihvp_datainf(loss, params, train, damping=DAMPING)
    return ifunc.attribute(loss, params, ih, train, query, progress=False)


# ------------------------------------------------------------------------------------------------ the LM


def lm_setup(state: dict, dtype: torch.dtype):
    model = GPT()
    model.load_state_dict(state["state"])
    model = model.to(dtype).eval()
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(lambda p, b: ifunc.call(model, p, b[:, :-1]), lm_loss)
    return model, params, loss, ifunc.language.untracked(model, params)


def lm_closure(model, params, loss, exclude, train, method: str):
    if method == "identity":
        return ifunc.ihvp_identity(params, model=model, exclude=exclude, damping=1.0)
    build = ifunc.ihvp_ekfac if method == "ekfac" else ifunc.ihvp_kfac
    return build(loss, params, train, model=model, exclude=exclude, damping=DAMPING, curvature="empirical_fisher")


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="400 LM sequences, K-FAC and identity, all per-token scores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.threads} threads", flush=True)

    print("\n1. bfloat16 model vs float32 model, same trained weights (per-query agreement of the score rows)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lm.pt")
        make_problem(400 if args.full else 200, 10, 60, path)
        state = torch.load(path)
    train, query = state["train"], state["query"]
    n = len(train)
    for method in ("ekfac", "kfac", "identity") if args.full else ("ekfac",):
        rows = {}
        for dtype in (torch.float32, torch.bfloat16):
            model, params, loss, exclude = lm_setup(state, dtype)
            (ih, fit) = timed(lambda: lm_closure(model, params, loss, exclude, train, method))
            s, score = timed(lambda: ifunc.attribute(loss, params, ih, train, query, progress=False))
            rows[dtype] = s
            print(f"  LM {method:8s} {str(dtype):15s} fit {fit:5.1f} s, pairwise [10, {n}] {score:5.1f} s", flush=True)
        agreement(f"LM {method} bf16 vs fp32", rows[torch.bfloat16], rows[torch.float32])
    mlp, mtrain, mquery = mlp_problem()
    for method in ("ekfac", "arnoldi", "datainf"):
        rows = {}
        # "rounded": float32 on the bfloat16 weights; "upcast": bfloat16, the loss of float32 logits (out.float())
        for dtype in (torch.float32, torch.bfloat16, "rounded", "upcast"):
            model = mlp_problem_copy(mlp, dtype)
            work = {"rounded": torch.float32, "upcast": torch.bfloat16}.get(dtype, dtype)  # pyright: ignore
            rows[dtype], took = timed(lambda: mlp_scores(model, mtrain, mquery, method, work, dtype == "upcast"))
            print(f"  MLP {method:8s} {str(dtype):15s} fit + pairwise [50, 2000] {took:5.1f} s", flush=True)
        agreement(f"MLP {method} bf16 vs fp32", rows[torch.bfloat16], rows[torch.float32])
        agreement(f"MLP {method} bf16 weights only", rows["rounded"], rows[torch.float32])
        agreement(f"MLP {method} bf16, loss fp32", rows["upcast"], rows[torch.float32])

    print("\n2. attribute(dtype=torch.bfloat16) vs the float32 contraction of a float32 model")
    params = ifunc.params_of(mlp)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(mlp, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    ih = ifunc.ihvp_identity(params, damping=1.0)  # no model: the generic scorer
    ref, t32 = timed(lambda: ifunc.attribute(loss, params, ih, mtrain, mquery, progress=False))
    low, t16 = timed(lambda: ifunc.attribute(loss, params, ih, mtrain, mquery, progress=False, dtype=torch.bfloat16))
    print(f"  generic, MLP [50, 2000]: float32 {t32:.2f} s, bfloat16 {t16:.2f} s")
    agreement("generic bf16 vs fp32", low.float(), ref)
    model, params, loss, exclude = lm_setup(state, torch.float32)
    ih = lm_closure(model, params, loss, exclude, train, "ekfac")
    for per_token in (False, True):
        part = train if args.full or not per_token else train[:50]
        what = f"per-token [10, {len(part)}, 64]" if per_token else f"pairwise [10, {len(part)}]"
        ref, t32 = timed(lambda: ifunc.attribute(loss, params, ih, part, query, per_token=per_token, progress=False))
        low, t16 = timed(
            lambda: ifunc.attribute(
                loss, params, ih, part, query, per_token=per_token, progress=False, dtype=torch.bfloat16
            )
        )
        print(f"  Kronecker EK-FAC, LM {what}: float32 {t32:.2f} s, bfloat16 {t16:.2f} s")
        agreement(f"Kronecker {'per-token' if per_token else 'pairwise'} bf16", low.float().flatten(1), ref.flatten(1))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def mlp_problem_copy(model: nn.Module, dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype``; ``"rounded"``: float32 holding the bfloat16 rounding of the weights."""
    copy = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    copy.load_state_dict(model.state_dict())
    if dtype == "rounded":
        return copy.to(torch.bfloat16).float().eval()
    return copy.to(torch.bfloat16 if dtype == "upcast" else dtype).eval()


if __name__ == "__main__":
    main()
