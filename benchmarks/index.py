"""Gradient index: agreement with the uncompressed scores of the same closure, its size and its cost, per size.

For each workload an EK-FAC closure (``ifunc.ihvp_ekfac`` on its default settings, fitted on the training set)
scores the queries twice: uncompressed (``ifunc.attribute`` over the training data, timed: the pairwise pass) and
from a gradient index (``build_index`` then ``attribute`` with the index, both timed) for a sweep of
``layer_size`` (``cap`` = every layer exact) or ``dense_size``. Printed per size: ``dim``, bytes per example,
build and query seconds, build / pairwise time, and the agreement per query row: Spearman median and min, mean
overlap of the top-10 training examples. Then the default: the smallest size with median Spearman ≥ 0.9 and
top-10 overlap ≥ 0.7 on every workload of the sweep (or which workload misses it, and its best size).

Workloads: ``mlp``: the MLP 784-512-512-10 of ``benchmarks/ekfac.py`` / ``million.py`` (Synthetic data, briefly
trained), every layer Kronecker; ``lm``: the GPT of ``benchmarks/lm.py`` (2 blocks, 9 Linear layers tracked,
embeddings and LayerNorms excluded, as there); ``lm-dense``: the same GPT with only its embeddings and LayerNorms
tracked (diagonal EK-FAC blocks; the index's dense sign hash), for the ``dense_size`` sweep.
``--million N``: ``build_index(model=...)`` of N examples of ``million.py``'s workload streamed from its loader
(time, rate, minutes per 10⁶, peak RSS at 10 % and at the end). ``--gpt2``: GPT-2 small's shape (24 MLP layers,
``--gpt2-train`` sequences of 128 tokens; bytes per example per size; build vs pairwise EK-FAC time; slow).
Load average printed at start and end; timings on a loaded machine are not speed claims.

Usage:
  python benchmarks/index.py --small                 # 1,024 MLP / 400 LM examples, 32 queries (~5 min on 2 cores)
  python benchmarks/index.py                         # 4,096 MLP / 1,000 LM examples, 64 queries (~15 min)
  python benchmarks/index.py --full                  # lm.py's 2,000 sequences, 8,192 MLP examples (~30 min)
  python benchmarks/index.py --million 1000000       # the 10⁶-example build (target < 2.5 min idle, flat RSS)
  python benchmarks/index.py --gpt2 --workloads none # GPT-2 small's shape: bytes per example, build / pairwise
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from typing import Any, NamedTuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import ifunc  # noqa: E402
from ifunc.index import build_index  # noqa: E402

CAP = 10**9  #: a layer_size that every layer caps: the layers exact
SPEARMAN, TOP10 = 0.9, 0.7  #: what a default must reach


class Workload(NamedTuple):
    name: str
    loss: Any
    params: dict
    model: Any
    train: Any
    query: Any
    options: dict  #: modules= / exclude= for the closure and the index alike
    fit: dict  #: how the EK-FAC closure is fitted besides its default settings


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).double()


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of ``a [q, n]`` with the same row of ``b``: ``[q]``."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per row, the fraction of ``b``'s ``k`` largest entries that are among ``a``'s ``k`` largest: ``[q]``."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return (ta[:, :, None] == tb[:, None, :]).any(2).double().mean(1)


def mlp_workload(n: int, q: int) -> Workload:
    from million import Synthetic, trained_mlp

    model, loss = trained_mlp()
    train, query = (Synthetic(m, seed=s).__getitems__(list(range(m))) for m, s in ((n, 0), (q, 2)))
    return Workload("mlp", loss, ifunc.params_of(model), model, train, query, {}, {})


def lm_workload(n: int, q: int, steps: int, dense: bool, tmp: str) -> Workload:
    import lm

    path = os.path.join(tmp, f"lm-{n}-{steps}.pt")
    if not os.path.exists(path):
        lm.make_problem(n, 1, steps, path)
    problem = torch.load(path)
    model, params, loss = lm.trained(problem)
    untracked = ifunc.language.untracked(model, params)
    exclude = [k for k in params if k not in untracked] if dense else untracked
    name = "lm-dense" if dense else "lm"
    fit = {"sample": "categorical", "generator": torch.Generator().manual_seed(0)}  # the GGN: 16,384 backwards
    return Workload(name, loss, params, model, problem["train"], lm.grammar(q, 2), {"exclude": exclude}, fit)


def too_big(w: Workload, layer_size: int, dense_size: int, n: int, max_bytes: float) -> bool:
    """Whether the index of these sizes would exceed ``max_bytes`` on disk (said when so)."""
    ih: Any = ifunc.ihvp_identity(w.params, model=w.model, **w.options)  # for its layers' sizes
    dims = [min(layer_size, b.spec.out_features) * min(layer_size, b.spec.in_features + (b.spec.bias is not None))
            for b in ih.blocks]  # fmt: skip
    dim = sum(dims) + min(dense_size, sum(d.diag.numel() for d in ih.diags))
    if 4 * dim * n <= max_bytes:
        return False
    print(f"  layer_size {layer_size}, dense_size {dense_size}: dim {dim:,}, {4 * dim * n / 1e9:.1f} GB, skipped")
    return True


def sweep(w: Workload, sizes: list[tuple[int, int]], tmp: str, max_bytes: float) -> list[dict]:
    """One uncompressed pairwise pass, then an index per ``(layer_size, dense_size)``: the printed rows."""
    ih = ifunc.ihvp_ekfac(w.loss, w.params, w.train, model=w.model, progress=False, **w.options, **w.fit)
    t0 = time.perf_counter()
    exact = ifunc.attribute(w.loss, w.params, ih, w.train, w.query, progress=False)
    pairwise = time.perf_counter() - t0
    print(f"\n{w.name}: {exact.shape[1]:,} train x {exact.shape[0]} queries, uncompressed pairwise {pairwise:.2f} s, "
          f"{load()}\n  {'layer':>5} {'dense':>5} {'dim':>7} {'B/example':>10} {'build s':>8} {'/pairwise':>9} "
          f"{'query s':>8} {'Spearman med':>12} {'min':>6} {'top-10':>6} {'own curv':>8}", flush=True)  # fmt: skip
    rows, path = [], os.path.join(tmp, f"{w.name}.idx.h5")
    build_index(w.loss, w.params, w.train, path, model=w.model, progress=False, **w.options)  # warm-up, untimed
    os.remove(path)
    for layer_size, dense_size in sizes:
        if too_big(w, layer_size, dense_size, len(exact[0]), max_bytes):
            continue
        t0 = time.perf_counter()
        index = build_index(w.loss, w.params, w.train, path, model=w.model, layer_size=layer_size,
                            dense_size=dense_size, overwrite=True, progress=False, **w.options)  # fmt: skip
        t1 = time.perf_counter()
        got = ifunc.attribute(w.loss, w.params, ih, index, w.query, progress=False)
        t2 = time.perf_counter()
        rho, top = spearman_rows(got, exact), top_overlap(got, exact)
        logra, P = float("nan"), index.projection
        widest = max([L.k_o * L.k_a for L in P.layers] + [P.k_dense])
        try:  # the index's own curvature (LoGra's projected Fisher): another closure, shown for comparison
            from ifunc.index import ihvp_projected

            if widest > 4096:  # its blocks' second moments are [m, m]
                raise ValueError(f"a block of {widest:,} coordinates")
            own = ifunc.attribute(w.loss, w.params, ihvp_projected(index), index, w.query, progress=False)
            logra = float(spearman_rows(own, exact).median())
        except (ImportError, NotImplementedError, ValueError) as err:
            print(f"  (projected curvature not measured: {type(err).__name__}: {err})")
        row = {"layer": layer_size, "dense": dense_size, "dim": index.dim, "build": t1 - t0, "query": t2 - t1,
               "median": float(rho.median()), "min": float(rho.min()), "top10": float(top.mean()),
               "logra": logra}  # fmt: skip
        rows.append(row)
        shown = "cap" if layer_size == CAP else layer_size
        print(f"  {shown:>5} {dense_size:>5} {index.dim:>7,} {4 * index.dim:>10,} {row['build']:>8.2f} "
              f"{row['build'] / pairwise:>9.2f} {row['query']:>8.2f} {row['median']:>12.3f} {row['min']:>6.3f} "
              f"{row['top10']:>6.2f} {logra:>8.3f}", flush=True)  # fmt: skip
        os.remove(path)
    return rows


def choose(results: dict[str, list[dict]], key: str) -> None:
    """Print the smallest ``key`` size reaching the targets on every workload, or who misses and its best size."""
    sizes = sorted({r[key] for rows in results.values() for r in rows})
    ok = {n: {r[key] for r in rows if r["median"] >= SPEARMAN and r["top10"] >= TOP10} for n, rows in results.items()}
    both = [s for s in sizes if all(s in good for good in ok.values())]
    shown = {CAP: "cap"}
    if both and both[0] == CAP:
        print(f"no projected {key}_size reaches median Spearman >= {SPEARMAN} and top-10 >= {TOP10} on "
              f"{', '.join(results)}: only the uncompressed layers (cap) do")  # fmt: skip
    elif both:
        print(f"default {key}_size: {shown.get(both[0], both[0])} (the smallest with median Spearman >= {SPEARMAN} "
              f"and top-10 overlap >= {TOP10} on {', '.join(results)})")  # fmt: skip
    for name, good in ok.items():
        if not good:
            best = max(results[name], key=lambda r: r["median"])
            print(f"{name} reaches no target in this sweep: best median Spearman {best['median']:.3f}, top-10 "
                  f"{best['top10']:.2f} at {key}_size {shown.get(best[key], best[key])}")  # fmt: skip
        elif not both:
            print(f"{name}: smallest {key}_size reaching the targets {shown.get(min(good), min(good))}")


def million(n: int, tmp: str) -> None:
    """``build_index(model=...)`` of ``n`` examples of million.py's workload from its loader: time, rate, RSS."""
    from million import loader, trained_mlp

    model, loss = trained_mlp()
    params = ifunc.params_of(model)
    seen, marks = [0], {}

    def on_batch(k: int) -> None:
        seen[0] += k
        for frac in (0.1, 0.5):
            if seen[0] >= frac * n and frac not in marks:
                marks[frac] = peak_rss_mb()

    path = os.path.join(tmp, "million.idx.h5")
    t0 = time.perf_counter()
    index = build_index(loss, params, loader(n, on_batch=on_batch), path, model=model, progress=False)
    seconds = time.perf_counter() - t0
    print(f"\nmillion: {n:,} examples indexed (dim {index.dim}, chunk {index.chunk}) in {seconds:.1f} s = "
          f"{seconds / n * 1e6 / 60:.2f} min per 10^6 (target < 2.5); peak RSS {marks.get(0.1, 0):.0f} MB at 10 %, "
          f"{marks.get(0.5, 0):.0f} MB at 50 %, {peak_rss_mb():.0f} MB at the end; {load()}", flush=True)  # fmt: skip


def gpt2(args, tmp: str) -> None:
    """GPT-2 small's shape: bytes per example per layer_size, and one build vs one pairwise EK-FAC pass."""
    from gpt2_small import make_data, make_model

    model = make_model(args.gpt2_layers)
    params = ifunc.params_of(model)
    train_ids, query_ids = make_data(args.gpt2_train, 4, 128)
    train, query = {"input_ids": train_ids}, {"input_ids": query_ids}
    loss = ifunc.language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"]).logits)
    modules = ifunc.language.transformer_modules(model, attention=False)
    options: dict[str, Any] = {"modules": modules, "exclude": ifunc.language.untracked(model, params, modules=modules)}
    n_layers = 2 * args.gpt2_layers
    print(f"\nGPT-2 small shape: {n_layers} MLP layers (768 <-> 3072), {args.gpt2_train} x 128 tokens; {load()}")
    for k in args.layer_sizes:  # c_fc [3072, 768 + bias], c_proj [768, 3072 + bias]
        dim = args.gpt2_layers * (min(k, 3072) * min(k, 769) + min(k, 768) * min(k, 3073))
        shown = "cap" if k == CAP else k
        print(f"  layer_size {shown:>4}: dim {dim:>11,}  {4 * dim:>13,} bytes per example")
    gen = torch.Generator().manual_seed(0)
    ih = ifunc.ihvp_ekfac(loss, params, train, model=model, sample="categorical", generator=gen, progress=False,
                          **options)  # fmt: skip
    t0 = time.perf_counter()
    ifunc.attribute(loss, params, ih, train, query, progress=False)
    pairwise = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = build_index(loss, params, train, os.path.join(tmp, "gpt2.idx.h5"), model=model, progress=False, **options)
    build = time.perf_counter() - t0
    print(f"  default build {build:.1f} s, pairwise EK-FAC pass {pairwise:.1f} s: ratio {build / pairwise:.2f} "
          f"(target <= 1.2); {4 * index.dim:,} bytes per example; {load()}", flush=True)  # fmt: skip
    later = {"input_ids": make_data(args.gpt2_train, 8, 128)[1][4:]}  # 4 more queries: a second question

    def timed(ihvp, q) -> float:
        t0 = time.perf_counter()
        ifunc.attribute(loss, params, ihvp, index, q, progress=False)
        return time.perf_counter() - t0

    path_a, again_a = timed(ih, query), timed(ih, later)
    t0 = time.perf_counter()
    own = ifunc.ihvp_projected(index, model=model)  # queries projected through the captured layers, as the rows
    fit_b = time.perf_counter() - t0
    path_b = fit_b + timed(own, query)
    again_b = timed(own, later)
    print(f"  4 new queries from the index, first question (with the one-time check of the measurement's use of the "
          f"layers) / a later one: (a) EK-FAC query {path_a:.2f} / {again_a:.2f} s = 1/{pairwise / path_a:.0f} / "
          f"1/{pairwise / again_a:.0f} of a pairwise pass; (b) ihvp_projected fit ({fit_b:.2f} s) + query "
          f"{path_b:.2f} / {again_b:.2f} s = 1/{pairwise / path_b:.0f} / 1/{pairwise / again_b:.0f} (target <= "
          f"1/20); {load()}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--small", action="store_true", help="1,024 MLP / 400 LM examples, 32 queries")
    ap.add_argument("--full", action="store_true", help="8,192 MLP / 2,000 LM examples (lm.py's size), 64 queries")
    ap.add_argument("--workloads", default="mlp,lm,lm-dense", help="comma-separated: mlp, lm, lm-dense, or none")
    ap.add_argument("--layer-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64, CAP])
    ap.add_argument("--dense-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    ap.add_argument("--million", type=int, default=0, help="also index N examples of million.py's workload")
    ap.add_argument("--gpt2", action="store_true", help="GPT-2 small's shape (slow)")
    ap.add_argument("--gpt2-train", type=int, default=64)
    ap.add_argument("--gpt2-layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-gb", type=float, default=2.0, help="skip sizes whose index exceeds this (GB)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {"small": (1024, 400, 32, 60), "full": (8192, 2000, 64, 200), "default": (4096, 1000, 64, 200)}
    n_mlp, n_lm, q, steps = sizes["small" if args.small else "full" if args.full else "default"]
    print(f"gradient index benchmark, {args.threads} threads, torch {torch.__version__}; at start {load()}")
    chosen = [w for w in args.workloads.split(",") if w != "none"]
    with tempfile.TemporaryDirectory() as tmp:
        layer, dense = {}, {}
        for name in chosen:
            if name == "mlp":
                w = mlp_workload(n_mlp, q)
            else:
                w = lm_workload(n_lm, q, steps, name == "lm-dense", tmp)
            if name == "lm-dense":
                dense[name] = sweep(w, [(16, k) for k in args.dense_sizes], tmp, args.max_gb * 1e9)
            else:
                layer[name] = sweep(w, [(k, 256) for k in args.layer_sizes], tmp, args.max_gb * 1e9)
        print()
        if layer:
            choose(layer, "layer")
        if dense:
            choose(dense, "dense")
        if args.million:
            million(args.million, tmp)
        if args.gpt2:
            gpt2(args, tmp)
    print(f"at end {load()}")


if __name__ == "__main__":
    main()
