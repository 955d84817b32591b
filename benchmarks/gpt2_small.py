"""GPT-2 small's shape on one machine: MLP-only EK-FAC with sampled labels, ifunc vs Kronfluence.

``GPT2LMHeadModel(GPT2Config())`` (124M parameters; random weights seeded 0, eval mode, nothing downloaded),
the 24 MLP layers tracked (``transformer_modules(model, attention=False)``: every ``c_fc`` / ``c_proj``),
everything else excluded; true Fisher with one sampled label per position (``sample="categorical"``), the
damping heuristic (0.1 × mean eigenvalue per layer) in both libraries; 64 training and 4 query sequences of
128 random token ids (seeded), 2 threads, ifunc on its **default settings** (chunk sizes from the default
memory budget). Reported per library, each in its own subprocess on the same weights: fit, pairwise
``[4, 64]`` and (ifunc) per-token ``[4, 64, 128]`` wall seconds, peak RSS (``getrusage``) after each step,
and the agreement of the scores (Spearman; the two libraries draw their labels from different generators, so
their Fisher estimates differ by sampling noise); for ifunc, how far per-token scores are from summing to the
pairwise ones.

Floors, measured in the same run (the machine is shared, so its speed moves): the float32 GEMM rate on the
benchmark's threads, and the eigendecompositions of one block's factors as ifunc's fit runs them by default
(float32 for this float32 model; factors of 1,024 rows or more on the benchmark's threads, smaller ones on one),
with the float64 one-thread figure beside it. The fit's FLOP floor counts two forward passes, two backward passes
to the layer outputs (no weight gradients are needed), the covariance products, the eigenbasis rotations and
per-sequence products of the EK-FAC pass; pairwise and per-token scores: one forward + backward over the training
data (the queries are rotated back to parameter space once, so the training data is not rotated) and
the ``q·n·T·out·in`` contraction.

Kronfluence (``pip install kronfluence``, 1.0.1) needs ``nn.Linear`` layers: the benchmark converts GPT-2's
``Conv1D`` to ``nn.Linear`` with the same weights. Pass ``--kronfluence-python`` to run it from another
environment (e.g. a venv made with ``--system-site-packages`` so it uses the same torch).

    python benchmarks/gpt2_small.py                         # the full workload (slow: tens of minutes)
    python benchmarks/gpt2_small.py --train 16 --layers 2   # a quick run
    python benchmarks/gpt2_small.py --profile               # ifunc's fit under cProfile, by stage
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
from floors import gemm_rate  # the benchmarks directory is on the path of a script run from it

VOCAB = 50257


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers))
    model.eval()
    return model


def make_data(n_train: int, n_query: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n_train + n_query, tokens), generator=gen)
    return ids[:n_train], ids[n_train:]


def fingerprint(model) -> float:
    return float(sum(p.double().sum() for p in model.state_dict().values()))


def run_ifunc(args) -> tuple[dict, dict]:
    import ifunc
    from ifunc.ihvp.kronecker.budget import capture_chunk_size
    from ifunc.ihvp.kronecker.layers import find_layers

    model = make_model(args.layers)
    params = ifunc.params_of(model)
    train_ids, query_ids = make_data(args.train, args.query, args.tokens)
    train, query = {"input_ids": train_ids}, {"input_ids": query_ids}
    loss = ifunc.language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]).logits)
    modules = ifunc.language.transformer_modules(model, attention=False)
    exclude = ifunc.language.untracked(model, params, modules=modules)
    layers, _ = find_layers(model, {k: v for k, v in params.items() if k not in exclude}, modules=modules)
    chunk = capture_chunk_size(loss, params, model, layers, train, max_memory=None, what="probe")
    gen = torch.Generator().manual_seed(0)
    res: dict = {"chunk": chunk, "fingerprint": fingerprint(model), "rss_setup": peak_rss_mb()}
    t0 = time.perf_counter()
    c0 = time.process_time()
    ih = ifunc.ihvp_ekfac(
        loss, params, train, model=model, modules=modules, exclude=exclude, sample="categorical", generator=gen
    )
    res["fit"], res["fit_cpu"], res["rss_fit"] = time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    pair = ifunc.attribute(loss, params, ih, train, query, progress=False)
    res["pairwise"], res["pairwise_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    res["rss_pairwise"] = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    tok = ifunc.attribute(loss, params, ih, train, query, per_token=True, progress=False)
    res["per_token"], res["per_token_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    res["rss"] = peak_rss_mb()
    return res, {"pairwise": pair, "per_token": tok}


def to_linear(model) -> None:
    """Replace every GPT-2 ``Conv1D`` (weight ``[in, out]``) by an ``nn.Linear`` with the same weights."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(module, child_name, lin)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def run_kronfluence(args) -> tuple[dict, dict]:
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model  # pyright: ignore[reportMissingImports]
    from kronfluence.arguments import FactorArguments, ScoreArguments  # pyright: ignore[reportMissingImports]
    from kronfluence.task import Task  # pyright: ignore[reportMissingImports]

    model = make_model(args.layers)
    res: dict = {"fingerprint": fingerprint(model)}
    to_linear(model)
    tracked = [f"transformer.h.{i}.mlp.{m}" for i in range(args.layers) for m in ("c_fc", "c_proj")]

    def summed_ce(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch["input_ids"]).logits
            if not sample:
                return summed_ce(logits, batch["input_ids"])
            with torch.no_grad():  # one label per position drawn from the model (true Fisher)
                probs = torch.softmax(logits[:, :-1].detach().reshape(-1, VOCAB).double(), dim=-1)
                labels = torch.multinomial(probs, 1).reshape(logits.shape[0], -1)
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return summed_ce(model(batch["input_ids"]).logits, batch["input_ids"])

        def get_influence_tracked_modules(self):
            return tracked

    task = LM()
    model = prepare_model(model, task)
    train_ids, query_ids = make_data(args.train, args.query, args.tokens)
    train, query = _Rows(train_ids), _Rows(query_ids)
    torch.manual_seed(0)
    batch = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("gpt2", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        t0 = time.perf_counter()
        c0 = time.process_time()
        an.fit_all_factors(
            "ekfac",
            dataset=train,
            per_device_batch_size=batch,
            overwrite_output_dir=True,
            factor_args=FactorArguments(strategy="ekfac"),
        )
        res["fit"], res["fit_cpu"], res["rss_fit"] = time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        an.compute_pairwise_scores(
            "pair",
            "ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=batch,
            overwrite_output_dir=True,
            score_args=ScoreArguments(damping_factor=None),
        )
        pair = an.load_pairwise_scores("pair")["all_modules"].clone()
        res["pairwise"], res["pairwise_cpu"] = time.perf_counter() - t0, time.process_time() - c0
        res["rss"] = peak_rss_mb()
    return res, {"pairwise": pair}


def profile_fit(args) -> None:
    """ifunc's fit under cProfile: the time of each stage (functions grouped by what they do)."""
    import cProfile
    import pstats

    import ifunc

    model = make_model(args.layers)
    params = ifunc.params_of(model)
    train_ids, _ = make_data(args.train, args.query, args.tokens)
    loss = ifunc.language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]).logits)
    modules = ifunc.language.transformer_modules(model, attention=False)
    exclude = ifunc.language.untracked(model, params, modules=modules)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    ifunc.fit_kronecker_factors(
        loss,
        params,
        {"input_ids": train_ids},
        model=model,
        modules=modules,
        exclude=exclude,
        sample="categorical",
        generator=torch.Generator().manual_seed(0),
        diagonal=False,
        progress=False,
    )
    prof.disable()
    print(f"fit {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def eigh_seconds(sizes: list[int], dtype: torch.dtype, threads: int) -> float:
    """Seconds of ``dtype`` eigendecompositions of SPD matrices of ``sizes``, as ifunc's fit runs them
    (:func:`ifunc.ihvp.kronecker.eigenbases.symmetric_eig`: 1,024 rows or more on ``threads``, smaller on one)."""
    from ifunc.ihvp.kronecker.eigenbases import symmetric_eig

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    total = 0.0
    for n in sizes:
        x = torch.randn(2 * n, n, dtype=torch.float64)
        m = (x.T @ x).to(dtype)
        t = time.perf_counter()
        symmetric_eig(m, dtype)
        total += time.perf_counter() - t
    torch.set_num_threads(before)
    return total


def flop_floors(args) -> dict:
    """FLOPs of the unavoidable work (see the module docstring)."""
    d, L, T, n, q = 768, args.layers, args.tokens, args.train, args.query
    mlp = [(d + 1, 4 * d), (4 * d + 1, d)]  # (in + bias, out) of c_fc, c_proj
    per_token_fwd = 2 * (L * (d * 3 * d + d * d + 2 * d * 4 * d + 2 * T * d) + d * VOCAB)
    pass_fb = 2 * per_token_fwd * n * T  # forward + backward to the layer outputs
    cov = 2 * n * T * L * sum(i * i + o * o for i, o in mlp)  # A and S products
    rot = cov  # g Q_S, a Q_A
    dw = 2 * n * T * L * sum(i * o for i, o in mlp)  # Σ_t g a^T per sequence
    query = 2 * per_token_fwd * q * T + 2 * q * T * L * sum(i * o + i * i + o * o for i, o in mlp)
    query += 2 * q * L * sum(i * o * (i + o) for i, o in mlp)  # each query rotated back once: Q_S R Q_Aᵀ
    contraction = 2 * q * n * L * sum(i * o for i, o in mlp)
    return {
        "fit": 2 * pass_fb + cov + rot + dw,
        "pairwise": pass_fb + dw + contraction + query,
        "per_token": pass_fb + 2 * q * n * T * L * sum(i * o for i, o in mlp) + query,
    }


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    result, scores = (run_ifunc if args.worker == "ifunc" else run_kronfluence)(args)
    torch.save(scores, args.out)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(which: str, args, out: str, python: str, extra: list[str]) -> dict | None:
    cmd = [python, __file__, "--worker", which, "--out", out, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"[{which} failed, exit code {proc.returncode}]\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--query", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12, help="n_layer of the GPT-2 config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="Kronfluence batch size (default: ifunc's chunk)")
    ap.add_argument("--kronfluence-python", default=None, help="python with kronfluence (default: this one)")
    ap.add_argument("--no-kronfluence", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile ifunc's fit only")
    ap.add_argument("--save", default=None, help="save ifunc's scores here")
    ap.add_argument("--worker", choices=["ifunc", "kronfluence"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.profile:
        torch.set_num_threads(args.threads)
        return profile_fit(args)
    shape = ["--train", str(args.train), "--query", str(args.query), "--tokens", str(args.tokens)]
    shape += ["--layers", str(args.layers), "--threads", str(args.threads)]
    print(
        f"workload: GPT-2 small shape, {args.layers} blocks, MLP-only EK-FAC, sampled labels; {args.train} train x "
        f"{args.query} query sequences of {args.tokens} tokens, {args.threads} threads; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    rate0 = gemm_rate(args.threads)
    eig = eigh_seconds([769, 3072, 3073, 768], torch.float32, args.threads)  # ifunc's default for a float32 model
    eig64 = eigh_seconds([769, 3072, 3073, 768], torch.float64, 1)
    print(
        f"float32 GEMM {rate0:.0f} GFLOP/s; eigh of one block's factors: float32 as the fit runs them {eig:.1f} s "
        f"(float64 on one thread {eig64:.1f} s)",
        flush=True,
    )
    res: dict = {}
    scores: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ifunc.pt")
        res["ifunc"] = spawn("ifunc", args, out, sys.executable, shape)
        scores["ifunc"] = torch.load(out) if res["ifunc"] else None
        if res["ifunc"]:
            r = res["ifunc"]
            print(
                f"ifunc       chunk {r['chunk']}  fit {r['fit']:.1f} s (CPU {r['fit_cpu']:.0f} s)  pairwise "
                f"{r['pairwise']:.1f} s (CPU {r['pairwise_cpu']:.0f} s)  per-token {r['per_token']:.1f} s "
                f"(CPU {r['per_token_cpu']:.0f} s)  peak RSS fit {r['rss_fit']:.0f} / "
                f"pairwise {r['rss_pairwise']:.0f} / all {r['rss']:.0f} MB",
                flush=True,
            )
            if args.save:
                torch.save(scores["ifunc"], args.save)
        python = args.kronfluence_python or sys.executable
        has_kf = (
            not args.no_kronfluence
            and subprocess.run([python, "-c", "import kronfluence"], capture_output=True).returncode == 0
        )
        if has_kf:
            batch = args.batch or (res["ifunc"] or {}).get("chunk", 8)
            out = os.path.join(tmp, "kf.pt")
            res["kronfluence"] = spawn("kronfluence", args, out, python, shape + ["--batch", str(batch)])
            scores["kronfluence"] = torch.load(out) if res["kronfluence"] else None
            if res["kronfluence"]:
                r = res["kronfluence"]
                print(
                    f"kronfluence batch {batch}  fit {r['fit']:.1f} s (CPU {r['fit_cpu']:.0f} s)  pairwise "
                    f"{r['pairwise']:.1f} s (CPU {r['pairwise_cpu']:.0f} s)  peak RSS fit {r['rss_fit']:.0f} / "
                    f"all {r['rss']:.0f} MB",
                    flush=True,
                )
        else:
            print("kronfluence not available (pip install kronfluence, or --kronfluence-python): ifunc only")
    rate1 = gemm_rate(args.threads)
    rate = max(rate0, rate1)  # the machine's speed when the other jobs leave it free: the optimistic floor
    flops = flop_floors(args)
    eig_total = eig * args.layers
    floors = {
        "fit": flops["fit"] / (rate * 1e9) + eig_total,
        "pairwise": flops["pairwise"] / (rate * 1e9),
        "per_token": flops["per_token"] / (rate * 1e9),
    }
    print(
        f"\nGEMM rate {rate0:.0f} -> {rate1:.0f} GFLOP/s; load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"floors: fit {flops['fit'] / 1e12:.2f} TFLOP + eigh {eig_total:.0f} s = {floors['fit']:.0f} s; pairwise "
        f"{flops['pairwise'] / 1e12:.2f} TFLOP = {floors['pairwise']:.0f} s; per-token "
        f"{flops['per_token'] / 1e12:.2f} TFLOP = {floors['per_token']:.0f} s"
    )
    ours, theirs = res.get("ifunc"), res.get("kronfluence")
    print("\n| | ifunc (CPU s) | × floor | Kronfluence (CPU s) | ratio |\n|---|---|---|---|---|")
    for key, label in (("fit", "fit (s)"), ("pairwise", "pairwise (s)"), ("per_token", "per-token (s)")):
        if ours is None:
            break
        t = theirs.get(key) if theirs else None
        kf, ratio = (f"{t:.1f} ({theirs[key + '_cpu']:.0f})", f"{ours[key] / t:.2f}") if t and theirs else ("—", "—")
        mine = f"{ours[key]:.1f} ({ours[key + '_cpu']:.0f})"
        print(f"| {label} | {mine} | {ours[key] / floors[key]:.2f} | {kf} | {ratio} |")
    if ours:
        t = theirs["rss"] if theirs else None
        kf, ratio = (f"{t:.0f}", f"{ours['rss'] / t:.2f}") if t else ("—", "—")
        print(f"| peak RSS (MB) | {ours['rss']:.0f} | | {kf} | {ratio} |")
        mine = scores.get("ifunc") or {}
        pair, tok = mine["pairwise"].double(), mine["per_token"].double()
        err = float((tok.sum(-1) - pair).abs().max() / pair.abs().max())
        print(f"| per-token sum vs pairwise (max rel.) | {err:.1e} | | | |")
    other = scores.get("kronfluence")
    if ours and theirs and other is not None:
        if ours["fingerprint"] != theirs["fingerprint"]:
            print("WARNING: the two processes built different weights")
        rho = spearman((scores.get("ifunc") or {})["pairwise"], other["pairwise"])
        print(f"| Spearman ifunc vs Kronfluence (pairwise) | {rho:.4f} | | | |")


if __name__ == "__main__":
    main()
