"""Memory of EK-FAC with a GPT-2-small-sized token embedding (50,257 × 768) as a Kronecker layer.

    python benchmarks/embedding_memory.py                  # 8 sequences of 64 tokens, float32
    python benchmarks/embedding_memory.py --sequences 16 --length 128

The model is the embedding, a tanh and a small per-token head (16 classes), so the embedding dominates. The
embedding is the Kronecker layer (named in ``modules=``); the head gets diagonal blocks. The script fits EK-FAC,
scores two queries against the sequences, and prints the bytes of every factor, the bytes a dense ``vocab × vocab``
input factor would take, and the peak RSS (``getrusage``) against the weights' own bytes.

Measured (2 shared CPU cores, defaults): factors 300 MB (Λ ``[768, 50257]`` in float64 is 295 of them; ``A`` is a
``[50257]`` vector, ``Q_A`` the identity, where a dense ``A`` and ``Q_A`` would take 19 GB); fit 15 s (12 of them the
one-time probe of the layer's weight use, dense ``[768, 50257]`` checks); two queries scored in 10 s; peak RSS
1.2 GB after the fit, 1.7 GB after scoring (the weights are 147 MB).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

import ifunc

VOCAB, WIDTH, CLASSES = 50257, 768, 16


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MB"


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # kilobytes on Linux


def main(sequences: int, length: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES)).eval()
    params = ifunc.params_of(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (sequences, length), generator=gen)
    labels = torch.randint(0, CLASSES, (sequences, length), generator=gen)

    def loss(p, batch):
        logits = ifunc.call(model, p, batch[0])
        return F.cross_entropy(logits.reshape(-1, CLASSES), batch[1].reshape(-1), reduction="sum")

    weights = sum(p.numel() * p.element_size() for p in params.values())
    start_rss = _peak_rss()
    t0 = time.perf_counter()
    factors = ifunc.fit_kronecker_factors(
        loss, params, (ids, labels), model=model, modules=["0"], curvature="empirical_fisher", diagonal=False
    )
    fit_s = time.perf_counter() - t0
    fit_rss = _peak_rss()
    emb = factors.factors["0"]
    assert emb.ekfac is not None  # fitted with ekfac=True (the default)
    print(f"embedding {VOCAB} x {WIDTH}, {sequences} sequences x {length} tokens, float32; weights {_mb(weights)}")
    print(f"fit (two passes, eigendecompositions): {fit_s:.1f} s")
    for field in ("A", "eig_A", "Q_A", "S", "Q_S", "eig_S", "ekfac"):
        t = getattr(emb, field)
        shape = "None (identity)" if t is None else f"{list(t.shape)} {t.dtype}"
        print(f"  {field:6s} {shape:28s} {_mb(0 if t is None else t.numel() * t.element_size())}")
    held = sum(t.numel() * t.element_size() for t in emb if t is not None)
    print(
        f"  embedding factors in all: {_mb(held)}; a dense vocab x vocab A (and its Q_A) would be "
        f"{_mb(2 * VOCAB**2 * 4)} in float32"
    )
    # a fixed damping: with a few sequences most tokens are unseen (Λ = 0), so 0.1 × mean(Λ) would be tiny
    ihvp = ifunc.ihvp_ekfac(loss, params, factors, model=model, damping=1e-3 * float(emb.ekfac.max()))
    t0 = time.perf_counter()
    scores = ifunc.attribute(loss, params, ihvp, (ids, labels), (ids[:2], labels[:2]))
    print(f"pairwise scores {list(scores.shape)}: {time.perf_counter() - t0:.1f} s")
    print(f"peak RSS: {_mb(start_rss)} before the fit, {_mb(fit_rss)} after it, {_mb(_peak_rss())} after scoring")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    main(args.sequences, args.length)
