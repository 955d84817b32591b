"""The peers' language-model workload: EK-FAC / K-FAC / identity fit, pairwise and per-token scores.

ifunc vs Kronfluence.

A GPT-style causal transformer (2 blocks, d_model 128, 4 heads, context 64, vocabulary 256, fused q/k/v:
9 Linear layers tracked, embeddings and LayerNorms not; ~470k parameters) trained briefly on a seeded
synthetic grammar; 2,000 training and 20 query sequences; float32, empirical Fisher (data labels, so both
libraries fit the same curvature), damping 1e-3. Each library runs in its own subprocess on the same
trained weights (peak RSS is its own). Reported: wall seconds of factor fitting, pairwise ``[20, 2000]`` and
per-token ``[20, 2000, 64]`` scores, the process peak RSS (before the extra ``query_rank=32`` per-token run), the
ratios, the agreement of the two libraries'
scores and how far each library's per-token scores are from summing to its pairwise scores, and each EK-FAC stage
against its floor: its FLOPs (:func:`flop_floors`) over the float32 GEMM rate measured in the same run.

Kronfluence is not an ifunc dependency: ``pip install kronfluence`` by hand; without it only ifunc runs.

    python benchmarks/lm.py                 # the full workload (a few minutes on 2 cores)
    python benchmarks/lm.py --small         # 400 train / 10 query sequences, shorter training
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from floors import gemm_rate  # the benchmarks directory is on the path of a script run from it
from torch import nn

VOCAB, CONTEXT, WIDTH, HEADS, BLOCKS = 256, 64, 128, 4, 2
DAMPING = 1e-3
METHODS = ("ekfac", "kfac", "identity")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc, self.proj = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, h):
        b, T, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(b, T, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), torch.finfo(att.dtype).min)
        h = h + self.out((att.softmax(-1) @ v).transpose(1, 2).reshape(b, T, WIDTH))
        return h + self.proj(F.gelu(self.fc(self.ln2(h))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList([Block() for _ in range(BLOCKS)])
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


def grammar(n: int, seed: int) -> torch.Tensor:
    """``[n, CONTEXT + 1]`` token sequences from a seeded sparse second-order Markov chain over VOCAB tokens."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, VOCAB, (VOCAB, 8, 4), generator=torch.Generator().manual_seed(0))  # fixed grammar
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    seqs = torch.empty(n, CONTEXT + 1, dtype=torch.long)
    seqs[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=gen)
    for t in range(2, CONTEXT + 1):
        choice = torch.multinomial(probs.expand(n, 4), 1, generator=gen).squeeze(1)
        seqs[:, t] = succ[seqs[:, t - 1], seqs[:, t - 2] % 8, choice]
    return seqs


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")


def make_problem(n_train: int, n_query: int, steps: int, path: str) -> None:
    torch.manual_seed(0)
    model = GPT()
    train, query = grammar(n_train, 1), grammar(n_query, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(3)
    t0 = time.perf_counter()
    for _step in range(steps):
        batch = train[torch.randint(0, n_train, (32,), generator=gen)]
        opt.zero_grad()
        loss = lm_loss(model(batch[:, :-1]), batch) / batch[:, 1:].numel()
        loss.backward()
        opt.step()
    print(
        f"trained {steps} steps in {time.perf_counter() - t0:.1f} s, final token loss {loss.item():.3f} "
        f"(uniform: {torch.log(torch.tensor(float(VOCAB))):.3f}); "
        f"{sum(p.numel() for p in model.parameters()):,} parameters",
        flush=True,
    )
    torch.save({"state": model.state_dict(), "train": train, "query": query}, path)


def trained(problem: dict):
    """``(model, params, loss)``: the trained GPT of a problem file (eval mode) and its summed next-token loss."""
    import ifunc

    model = GPT()
    model.load_state_dict(problem["state"])
    model.eval()
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(lambda p, b: ifunc.call(model, p, b[:, :-1]), lm_loss)
    return model, params, loss


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ifunc(problem: dict, method: str) -> tuple[dict, dict]:
    import ifunc

    model, params, loss = trained(problem)
    exclude = ifunc.language.untracked(model, params)  # embeddings, LayerNorms: as Kronfluence
    train, query = problem["train"], problem["query"]
    t0 = time.perf_counter()
    if method == "identity":
        ih = ifunc.ihvp_identity(params, model=model, exclude=exclude, damping=1.0)
    else:
        build = ifunc.ihvp_ekfac if method == "ekfac" else ifunc.ihvp_kfac
        ih = build(loss, params, train, model=model, exclude=exclude, damping=DAMPING, curvature="empirical_fisher")
    t1 = time.perf_counter()
    pair = ifunc.attribute(loss, params, ih, train, query, progress=False)
    t2 = time.perf_counter()
    tok = ifunc.attribute(loss, params, ih, train, query, per_token=True, progress=False)
    t3 = time.perf_counter()
    rss = peak_rss_mb()
    low = ifunc.attribute(loss, params, ih, train, query, per_token=True, query_rank=32, progress=False)
    t4 = time.perf_counter()
    return {
        "fit": t1 - t0,
        "pairwise": t2 - t1,
        "per_token": t3 - t2,
        "rss": rss,
        "per_token_r32": t4 - t3,
        "spearman_r32": spearman(low, tok),
        "pass": model_pass(model, train),
    }, {"pairwise": pair, "per_token": tok}


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


def run_kronfluence(problem: dict, method: str) -> tuple[dict, dict]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return lm_loss(model(batch[:, :-1]), batch)  # empirical Fisher: sample is never requested

        def compute_measurement(self, batch, model):
            return lm_loss(model(batch[:, :-1]), batch)

    model = GPT()
    model.load_state_dict(problem["state"])
    model.eval()
    task = LM()
    model = prepare_model(model, task)
    train, query = _Sequences(problem["train"]), _Sequences(problem["query"])
    kw = dict(
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=len(query),
        per_device_train_batch_size=64,
        overwrite_output_dir=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("lm", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        t0 = time.perf_counter()
        an.fit_all_factors(
            method,
            dataset=train,
            per_device_batch_size=64,
            overwrite_output_dir=True,
            factor_args=FactorArguments(strategy=method, use_empirical_fisher=True),
        )
        t1 = time.perf_counter()
        an.compute_pairwise_scores("pair", method, score_args=ScoreArguments(damping_factor=DAMPING), **kw)
        pair = an.load_pairwise_scores("pair")["all_modules"].clone()
        t2 = time.perf_counter()
        an.compute_pairwise_scores(
            "tok", method, score_args=ScoreArguments(damping_factor=DAMPING, compute_per_token_scores=True), **kw
        )
        tok = an.load_pairwise_scores("tok")["all_modules"].clone()
        t3 = time.perf_counter()
    return {"fit": t1 - t0, "pairwise": t2 - t1, "per_token": t3 - t2, "rss": peak_rss_mb()}, {
        "pairwise": pair,
        "per_token": tok,
    }


def worker(which: str, method: str, problem_path: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    problem = torch.load(problem_path)
    result, scores = (run_ifunc if which == "ifunc" else run_kronfluence)(problem, method)
    torch.save(scores, out)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(which: str, method: str, problem: str, out: str, threads: int) -> dict | None:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            which,
            "--method",
            method,
            "--problem",
            problem,
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
    print(f"[{which} {method} failed]\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def flop_floors(n: int, q: int) -> dict:
    """FLOPs of the unavoidable work of each EK-FAC stage (the eigendecompositions, ≤ 513², take < 0.1 s).

    A forward pass and a backward pass to the layer outputs (no weight gradients) per pass over the data. Per token,
    the forward is ``2·weights`` in the Linear layers and ``2·2·T·d`` in each block's attention (``q kᵀ`` and
    ``p v``); the backward is ``2·weights`` less the input gradient of the first tracked layer (nothing before it is
    tracked), and four attention products (``dp = dy vᵀ``, ``dv = pᵀ dy``, ``dq = ds k``, ``dk = dsᵀ q``). The fit:
    two passes, the covariance products ``a aᵀ``, ``g gᵀ`` and, for Λ, the eigenbasis rotations of ``a, g`` and the
    per-sequence ``Σ_t g aᵀ``; pairwise: one pass, then per layer the cheapest exact contraction, ``Σ_t g aᵀ`` per
    sequence (``2·T·out·in``) and its products with the ``q`` queries (``2·q·out·in``), cheaper than applying every
    query at every position (``2·q·T·out·in``); per-token: one pass and that ``q·n·T·out·in`` contraction.
    """
    T = CONTEXT
    layers = [(WIDTH + 1, 3 * WIDTH), (WIDTH + 1, WIDTH), (WIDTH + 1, 4 * WIDTH), (4 * WIDTH + 1, WIDTH)] * BLOCKS
    layers.append((WIDTH + 1, VOCAB))  # (in + bias, out) of every tracked Linear
    weights = sum((i - 1) * o for i, o in layers)
    attention = BLOCKS * 2 * 2 * T * WIDTH  # per token: q kᵀ and p v, each 2·T·d
    first = (layers[0][0] - 1) * layers[0][1]  # the first tracked layer's weights: no input gradient needed
    passes = n * T * ((2 * weights + attention) + (2 * (weights - first) + 2 * attention))
    squares = 2 * n * T * sum(i * i + o * o for i, o in layers)
    dw = 2 * n * T * sum(i * o for i, o in layers)
    return {
        "fit": 2 * passes + 2 * squares + dw,
        "pairwise": passes + dw + 2 * q * n * sum(i * o for i, o in layers),
        "per_token": passes + 2 * q * n * T * sum(i * o for i, o in layers),
        "pass": passes,
    }


def model_pass(model: nn.Module, train: torch.Tensor, chunk: int = 64) -> float:
    """Seconds of plain PyTorch's forward + backward to the tracked layers' outputs over ``train`` (the floor's pass,
    as eager PyTorch runs it: its GELU, softmax, masking, LayerNorm and copies are not GEMM work)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        outs.append(output)

    t0 = time.perf_counter()
    for s in range(0, len(train), chunk):
        outs.clear()
        hooks = [m.register_forward_hook(keep) for m in linears]
        try:
            with torch.enable_grad():
                batch = train[s : s + chunk]
                value = lm_loss(model(batch[:, :-1]), batch)
        finally:
            for h in hooks:
                h.remove()
        torch.autograd.grad(value, outs)
    return time.perf_counter() - t0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def sum_error(scores: dict) -> float:
    """Max over entries of |Σ_t per-token − pairwise| / max |pairwise|."""
    pair, tok = scores["pairwise"].double(), scores["per_token"].double()
    return float((tok.sum(-1) - pair).abs().max() / pair.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--small", action="store_true", help="400 train / 10 query sequences, 60 training steps")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of ekfac,kfac,identity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", metavar="DIR", help="keep the trained problem and every library's scores in DIR")
    ap.add_argument("--worker", choices=["ifunc", "kronfluence"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--problem", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.method, args.problem, args.out, args.threads)
    torch.set_num_threads(args.threads)
    n_train, n_query, steps = (400, 10, 60) if args.small else (2000, 20, 200)
    try:
        import kronfluence  # noqa: F401

        libraries = ("ifunc", "kronfluence")
    except ImportError:
        print("kronfluence is not installed (pip install kronfluence): running ifunc only")
        libraries = ("ifunc",)
    print(
        f"workload: {n_train} train x {n_query} query sequences of {CONTEXT} tokens, damping {DAMPING}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rate0 = gemm_rate(args.threads)
    rows = []
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory() as tmp:
        problem = os.path.join(tmp, "problem.pt")
        make_problem(n_train, n_query, steps, problem)
        for method in args.methods.split(","):
            res, scores = {}, {}
            for lib in libraries:
                out = os.path.join(tmp, f"{lib}-{method}.pt")
                res[lib] = spawn(lib, method, problem, out, args.threads)
                scores[lib] = torch.load(out) if res[lib] else None
                if res[lib]:
                    print(
                        f"{method:8s} {lib:11s} fit {res[lib]['fit']:7.2f} s  pairwise {res[lib]['pairwise']:7.2f} s"
                        f"  per-token {res[lib]['per_token']:7.2f} s  peak RSS {res[lib]['rss']:6.0f} MB  "
                        f"per-token sum error {sum_error(scores[lib]):.1e}  load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            rows.append((method, res, scores))
    rate = max(rate0, gemm_rate(args.threads))  # the machine's speed when other jobs leave it free
    floors = {k: v / (rate * 1e9) for k, v in flop_floors(n_train, n_query).items()}
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; float32 GEMM {rate:.0f} GFLOP/s")
    print("floors (FLOPs ÷ GEMM rate): " + ", ".join(f"{k} {v:.2f} s" for k, v in floors.items()))
    print("\n| method | step | ifunc | Kronfluence | ratio | ifunc ÷ floor |\n|---|---|---|---|---|---|")
    for method, res, scores in rows:
        ours, theirs = res.get("ifunc"), res.get("kronfluence")
        if ours is None:
            continue
        for key, label in (
            ("fit", "fit (s)"),
            ("pairwise", "pairwise (s)"),
            ("per_token", "per-token (s)"),
            ("rss", "peak RSS (MB)"),
        ):
            t = f"{theirs[key]:.2f}" if theirs else "—"
            r = f"{ours[key] / theirs[key]:.2f}" if theirs and theirs[key] > 0 else "—"
            f = f"{ours[key] / floors[key]:.2f}" if key in floors and method == "ekfac" else ""
            print(f"| {method} | {label} | {ours[key]:.2f} | {t} | {r} | {f} |")
        if theirs:
            total_o = ours["fit"] + ours["per_token"]
            total_t = theirs["fit"] + theirs["per_token"]
            print(f"| {method} | fit + per-token (s) | {total_o:.2f} | {total_t:.2f} | {total_o / total_t:.2f} |")
            a, b = scores["ifunc"], scores["kronfluence"]
            print(
                f"| {method} | Spearman ifunc vs Kronfluence (pairwise / per-token) | "
                f"{spearman(a['pairwise'], b['pairwise']):.4f} | {spearman(a['per_token'], b['per_token']):.4f} | |"
            )
        if method == "ekfac":
            rest = ours["pairwise"] - ours["pass"]
            print(
                f"| {method} | plain PyTorch pass: forward + backward to the layer outputs (s) | {ours['pass']:.2f} | "
                f"| | {ours['pass'] / floors['pass']:.2f} |"
            )
            print(
                f"| {method} | pairwise less that pass: queries, capture, contraction (s) | {rest:.2f} | | | "
                f"{rest / (floors['pairwise'] - floors['pass']):.2f} |"
            )
        print(
            f"| {method} | ifunc per-token with query_rank=32 (s; Spearman vs full rank) | "
            f"{ours['per_token_r32']:.2f} | {ours['spearman_r32']:.4f} | |"
        )
        print(
            f"| {method} | per-token sum error (max rel.) | {sum_error(scores['ifunc']):.1e} | "
            f"{sum_error(scores['kronfluence']) if theirs else float('nan'):.1e} | |"
        )


if __name__ == "__main__":
    main()
