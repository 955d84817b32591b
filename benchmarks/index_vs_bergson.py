"""ifunc's gradient index against EleutherAI's bergson (2.5.1) on CPU, at equal bytes per example.

Workload: a GPT-2-shaped causal LM with random weights (seeded; vocabulary 256, width 64, 4 heads, 2 blocks,
context 32, float32, ~119k parameters; nothing is downloaded), ``N`` training and ``Q`` query sequences of ``T``
random token ids (seeded), eager attention in both libraries (``--attention sdpa`` for the fused kernel), the
summed next-token cross-entropy (the loss both libraries use by default). Every index costs ``8 p²`` float32
coordinates (``32 p²`` bytes) per example. Each part runs in its own subprocess on the same saved weights and
tokens, so each peak RSS (``getrusage``) is its own:

- ifunc index, one process per coverage (build + queries only, no EK-FAC): ``all`` indexes every parameter,
  ``layer_size=(p, p - 1)`` per ``Conv1D`` (its bias column included) plus ``dense_size = 8 p² − Σ k_o·k_a`` for
  the embeddings and LayerNorms (the dense sketch); ``layers`` is bergson's coverage, the 8 ``Conv1D`` weights only
  (``exclude=`` every other parameter, biases too), ``layer_size=(p, p)``. Rows per coverage: ``identity``
  (``ihvp_identity(damping=1)``: plain inner products of projected gradients, bergson's ``none``) and path (b)
  ``projected``: ``attribute(loss, params, ihvp_projected(index), index, query)``, the block-diagonal second
  moment of the index's own rows (one ``k_o·k_a`` block per layer, one dense block), inverted with its default
  damping (``0.1 ×`` each block's mean eigenvalue), applied to the projected RAW query gradient (the analogue of
  bergson's ``autocorr``); ``--damping λ ...`` adds rows with those λ (``with_damping``, no refit).
- ifunc reference (one process): the UNCOMPRESSED EK-FAC scores ``attribute(loss, params, ihvp_ekfac(loss,
  params, train, model=model), train, query)`` on default settings (Kronecker blocks for the 8 ``Conv1D`` layers,
  diagonal blocks for embeddings and LayerNorms), the uncompressed plain inner products (the ceiling of the
  unpreconditioned rows, printed below the table) and path (a) on each index: ``attribute(loss, params, ekfac,
  index, query)``, the query preconditioned by EK-FAC in parameter space, then projected. Path (a)'s RSS is this
  process's (marked ``*``: it holds the fit and the reference).
- bergson (``benchmarks/_bergson_worker.py`` in its own venv, which never imports ifunc): its index of the same
  8 ``Conv1D`` weights at ``projection_dim = p`` (``p × p`` per module, biases and embeddings left out: its
  default), built and queried by its own code, with three query-time preconditionings: ``none`` (inner
  products), ``autocorr`` (its autocorrelation Hessian of the projected gradients, one-sided ``H⁻¹``: bergson's
  curvature for a projected index, its EK-FAC refuses projection) and ``cosine`` (``bergson query``'s default).

Reported per row: bytes per example of the stored index; seconds to fit the preconditioner (``precond``: the
EK-FAC fit for path (a), ``ihvp_projected`` for path (b), bergson's hessian for ``autocorr``, 0 for the rest), to
build the index and to answer the ``Q`` queries; Spearman correlation with the reference per query (median, min),
the mean overlap of the top 10 training examples per query, peak RSS; the default λ of ``ihvp_projected`` per
block; the load average at the start and end. bergson's stages include loading the model from disk, its queries
building the ``Attributor`` (reading the index, inverting the Hessian). The machine's load moves timings: compare
them only from a quiet machine; the scores repeat run to run.

Setup (once) and run:

    python -m venv /tmp/bergson-venv --system-site-packages     # reuses this environment's CPU torch
    /tmp/bergson-venv/bin/pip install --no-deps bergson==2.5.1 torchopt
    /tmp/bergson-venv/bin/pip install "jaxtyping>=0.3.3" ml_dtypes natsort petname simple-parsing
    python benchmarks/index_vs_bergson.py                 # N=512, Q=16, T=32, p=16: a minute or two on 2 cores
    python benchmarks/index_vs_bergson.py --big           # N=2000, Q=32, T=64, width 128, p=32: ~10 minutes
    python benchmarks/index_vs_bergson.py --proj 32       # another projection size (32 KB per example)
    python benchmarks/index_vs_bergson.py --damping 0.01 1  # also ihvp_projected at these explicit λ
    python benchmarks/index_vs_bergson.py --attention sdpa  # the fused kernel (ifunc's vmap falls back on it)

(bergson 2.5.1 also lists torchvision, torchaudio, bitsandbytes and CUDA-only extras; its build, hessian and query
paths import none of them, and ``--no-deps`` keeps pip from replacing the CPU torch.)
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
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOKEN_BATCH = 2048  # bergson's default token budget per batch
SMALL = dict(n_train=512, n_query=16, tokens=32, width=64, layers=2, heads=4, vocab=256, proj=16)
DAMPINGS = []  # explicit λ for ihvp_projected besides its default (--damping)
BIG = dict(n_train=2000, n_query=32, tokens=64, width=128, layers=2, heads=4, vocab=256, proj=32)


def make_workload(workdir: Path, a: argparse.Namespace) -> None:
    """Save the seeded model (``workdir/model``, Hugging Face format) and ``tokens.pt``: train [N, T], query [Q, T]."""
    import transformers

    from ifunc.testing import causal_lm

    config = transformers.GPT2Config(
        vocab_size=a.vocab,
        n_positions=a.tokens,
        n_embd=a.width,
        n_layer=a.layers,
        n_head=a.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **{"attn_implementation": a.attention},
    )
    causal_lm(config, seed=0, dtype=torch.float32).save_pretrained(workdir / "model")
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, a.vocab, (a.n_train, a.tokens), generator=gen)
    query = torch.randint(0, a.vocab, (a.n_query, a.tokens), generator=gen)
    torch.save({"train": train, "query": query}, workdir / "tokens.pt")


def _load(workdir: Path, attention: str):
    """``(model, params, loss, train, query, Conv1D layers [(name, out, in)])`` of the saved workload."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    import ifunc
    from ifunc.testing import hf_logits

    model = GPT2LMHeadModel.from_pretrained(workdir / "model", dtype=torch.float32, attn_implementation=attention)
    model = model.eval()
    tokens = torch.load(workdir / "tokens.pt")
    train, query = {"input_ids": tokens["train"]}, {"input_ids": tokens["query"]}
    params = ifunc.params_of(model)
    loss = ifunc.language.causal_lm_loss(hf_logits(model))
    layers = [(n, m.nf, m.nx) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    return model, params, loss, train, query, layers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def index_worker(workdir: Path, p: int, attention: str, coverage: str, dampings: list[float]) -> None:
    """One index (own process, so its peak RSS is build + queries only): build, identity and ihvp_projected queries.

    ``coverage="all"``: every parameter, ``layer_size=(p, p - 1)`` per ``Conv1D`` (bias column included) and the
    rest by the dense sketch, ``dim = 8 p²``. ``"layers"``: only the 8 ``Conv1D`` weights (everything else
    ``exclude=``d, biases too), ``layer_size=(p, p)``, ``dim = 8 p²``: bergson's coverage. Writes
    ``workdir/index_{coverage}.pt``.
    """
    import ifunc

    model, params, loss, train, query, layers = _load(workdir, attention)
    weights = {name + ".weight" for name, _, _ in layers}
    exclude: list[str] = []
    if coverage == "all":
        kept = sum(min(p, o) * min(p - 1, i + 1) for _, o, i in layers)  # k_o·k_a, capped at (out, in + bias)
        layer_size, dense_size = (p, p - 1), len(layers) * p * p - kept
    else:
        layer_size, dense_size, exclude = (p, p), 1, [k for k in params if k not in weights]
    path = workdir / f"ifunc_{coverage}.idx.h5"
    t0 = time.perf_counter()
    sizes = dict(layer_size=layer_size, dense_size=dense_size, exclude=exclude, overwrite=True, progress=False)
    index = ifunc.build_index(loss, params, train, path, model=model, **sizes)  # type: ignore[arg-type]
    times, scores = {"build": time.perf_counter() - t0}, {}

    def timed(name: str, ihvp) -> None:
        t = time.perf_counter()
        scores[name] = ifunc.attribute(loss, params, ihvp, index, query, progress=False)
        times["query_" + name] = time.perf_counter() - t

    timed("identity", ifunc.ihvp_identity(params, model=model, damping=1.0))  # plain inner products
    t0 = time.perf_counter()
    projected = ifunc.ihvp_projected(index, model=model)  # queries projected through the layers, as the rows
    times["precond_projected"] = time.perf_counter() - t0
    timed("projected", projected)
    for lam in dampings:
        timed(f"projected λ={lam:g}", projected.with_damping(lam))
    lams = [float(v) for v in projected.info["damping"].values()]
    out = {"scores": scores, "times": times, "bytes": 4 * index.dim, "rss_mb": _rss_mb(), "default λ": lams}
    torch.save(out, workdir / f"index_{coverage}.pt")


def reference_worker(workdir: Path, attention: str) -> None:
    """The reference (own process): uncompressed EK-FAC scores, the plain inner products, path (a) on each index.

    Path (a): ``attribute(loss, params, ekfac, index, query)``, the query preconditioned by EK-FAC in parameter
    space, then projected. Writes ``workdir/reference.pt``.
    """
    import ifunc

    model, params, loss, train, query, _ = _load(workdir, attention)
    t0 = time.perf_counter()
    ekfac = ifunc.ihvp_ekfac(loss, params, train, model=model)
    t1 = time.perf_counter()
    reference = ifunc.attribute(loss, params, ekfac, train, query, progress=False)
    times = {"precond_ekfac": t1 - t0, "reference": time.perf_counter() - t1}
    identity = ifunc.ihvp_identity(params, model=model, damping=1.0)
    scores = {"exact identity": ifunc.attribute(loss, params, identity, train, query, progress=False)}
    for coverage in ("all", "layers"):
        index = ifunc.open_index(workdir / f"ifunc_{coverage}.idx.h5")
        t0 = time.perf_counter()
        scores[f"ekfac {coverage}"] = ifunc.attribute(loss, params, ekfac, index, query, progress=False)
        times[f"query_ekfac {coverage}"] = time.perf_counter() - t0
    out = {"reference": reference, "scores": scores, "times": times, "rss_mb": _rss_mb()}
    torch.save(out, workdir / "reference.pt")


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation of ``a, b [q, n]`` (ranks by argsort; ties are measure-zero here) -> ``[q]``."""
    ra, rb = (x.double().argsort(1).argsort(1).double() for x in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of ``|top_k(a_q) ∩ top_k(b_q)| / k`` (the k most positively influential examples)."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb)) / (k * a.shape[0])


def table_rows(ref: dict, mine: dict, theirs: dict) -> list[tuple]:
    """``(label, scores [Q, N], bytes/example, precond s, build s, query s, RSS)`` per row of the table."""
    rows, rt, star = [], ref["times"], f"{ref['rss_mb']:.0f}*"
    for c, res in mine.items():
        t, nbytes, rss = res["times"], res["bytes"], f"{res['rss_mb']:.0f}"
        ekfac = (ref["scores"][f"ekfac {c}"], nbytes, rt["precond_ekfac"], t["build"], rt[f"query_ekfac {c}"])
        rows.append((f"ifunc {c}, (a) ekfac", *ekfac, star))
        for name, s in res["scores"].items():
            fit, label = (0.0, name) if name == "identity" else (t["precond_projected"], "(b) " + name)
            rows.append((f"ifunc {c}, {label}", s, nbytes, fit, t["build"], t["query_" + name], rss))
    for v in ("none", "autocorr", "cosine"):
        t = theirs["times"]
        row = (f"bergson, {v}", theirs["scores"][v], theirs["bytes"], t["precond_" + v], t["build"])
        rows.append(row + (t["query_" + v], f"{theirs['rss_mb']:.0f}"))
    return rows


def run(cmd: list[str], what: str) -> None:
    """Run one library's worker; its output goes to this terminal, a failure stops the benchmark with its code."""
    done = subprocess.run(cmd, cwd=HERE.parent, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        raise SystemExit(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="the bigger workload: " + json.dumps(BIG))
    for key, value in SMALL.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {value}")
    parser.add_argument("--attention", default="eager", choices=("eager", "sdpa"), help="both libraries' attention")
    parser.add_argument("--damping", type=float, nargs="*", default=DAMPINGS, help="explicit λ for ihvp_projected")
    parser.add_argument("--bergson-python", default="/tmp/bergson-venv/bin/python")
    parser.add_argument("--workdir", default=None, help="keep the workload and outputs here (default: a temp dir)")
    parser.add_argument("--ifunc-worker", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: DIR ROLE
    a = parser.parse_args()
    for key, value in (BIG if a.big else SMALL).items():
        setattr(a, key, value if getattr(a, key) is None else getattr(a, key))
    if a.ifunc_worker:
        workdir, role = Path(a.ifunc_worker[0]), a.ifunc_worker[1]
        if role == "reference":
            return reference_worker(workdir, a.attention)
        return index_worker(workdir, a.proj, a.attention, role, a.damping)
    if a.proj < 2:
        raise SystemExit("--proj must be at least 2 (ifunc's layer_size is (p, p - 1))")

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        make_workload(workdir, a)
        me = [sys.executable, str(Path(__file__).resolve()), "--proj", str(a.proj), "--attention", a.attention]
        me += ["--damping", *map(str, a.damping)]
        for role in ("all", "layers", "reference"):  # the reference process queries the two indexes (path a)
            run(me + ["--ifunc-worker", str(workdir), role], f"ifunc {role}")
        worker = str(HERE / "_bergson_worker.py")
        run([a.bergson_python, worker, str(workdir), str(a.proj), str(TOKEN_BATCH), a.attention], "bergson")
        ref, theirs = torch.load(workdir / "reference.pt"), torch.load(workdir / "bergson.pt")
        mine = {c: torch.load(workdir / f"index_{c}.pt") for c in ("all", "layers")}
    load_end = os.getloadavg()

    reference = ref["reference"]
    print(
        f"\nGPT-2 shape: vocab {a.vocab}, width {a.width}, {a.layers} blocks, {a.heads} heads, {a.attention} "
        f"attention; N={a.n_train} train, Q={a.n_query} query sequences of T={a.tokens} tokens; p={a.proj}; "
        f"torch threads {torch.get_num_threads()}; reference: uncompressed EK-FAC, {ref['times']['reference']:.2f} s "
        f"(+ fit {ref['times']['precond_ekfac']:.2f} s), its process's peak RSS {ref['rss_mb']:.0f} MB"
    )
    head = f"{'row':<34}{'bytes/ex':>9}{'precond s':>10}{'build s':>9}{'query s':>9}"
    print(head + f"{'rho med':>9}{'rho min':>9}{'top-10':>8}{'RSS MB':>8}")
    for label, s, nbytes, fit, build, ask, rss in table_rows(ref, mine, theirs):
        rho = spearman(s, reference)
        print(
            f"{label:<34}{nbytes:>9}{fit:>10.2f}{build:>9.2f}{ask:>9.2f}{rho.median().item():>9.3f}"
            f"{rho.min().item():>9.3f}{top_overlap(s, reference):>8.2f}{rss:>8}"
        )
    exact = ref["scores"]["exact identity"]
    rho = spearman(exact, reference)
    print(
        f"ceiling of the plain inner products (uncompressed, ifunc): rho median {rho.median().item():.3f}, "
        f"min {rho.min().item():.3f}, top-10 {top_overlap(exact, reference):.2f}"
    )
    for c, res in mine.items():
        lams = res["default λ"]
        print(f"ihvp_projected default λ per block ({c}): {min(lams):.3g} .. {max(lams):.3g} over {len(lams)} blocks")
    print("RSS: ifunc rows are the index's own process (build + queries); * = the reference process (EK-FAC fit,")
    print("uncompressed reference, path (a) queries); bergson's is its one process (hessian, build, queries)")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")


if __name__ == "__main__":
    main()
