"""GPT-Neo at the shape of TinyStories-1M: MLP-only EK-FAC fit, pairwise and per-token scores.

A ``GPTNeoForCausalLM`` with random weights (``ifunc.testing.tiny_gpt_neo``, nothing is downloaded): hidden 64,
8 layers, 16 heads, vocabulary 50,257, alternating global/local attention (window 256), float32, eager
attention. EK-FAC over the 16 MLP layers only (``ifunc.language.transformer_modules(model, attention=False)``;
every other parameter excluded, as in Grosse et al. 2023), true Fisher with one sampled label per position,
damping ``None`` (0.1 × the mean eigenvalue per layer). Labels are drawn by inverse CDF
(:func:`sample_categorical`). Data: random token sequences (the timings do not depend on the weights' values). Reported:
wall seconds of the fit, of pairwise ``[n_query, n_train]`` and of per-token ``[n_query, n_train, T]`` scores,
the agreement of ``per_token.sum(-1)`` with the pairwise scores, the process peak RSS and the load average.

    python benchmarks/gpt_neo.py                          # 1,000 train sequences of 128 tokens, 10 queries
    python benchmarks/gpt_neo.py --train 50 --length 32   # a quick look
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import ifunc
from ifunc import language
from ifunc.testing import hf_logits, tiny_gpt_neo


def build(layers: int = 8, seed: int = 0) -> torch.nn.Module:
    """TinyStories-1M's shape with random weights (``attention_types`` alternates global and local layers)."""
    return tiny_gpt_neo(layers=layers, seed=seed, window=256, positions=2048, dtype=torch.float32)


def sample_categorical(outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``softmax(out) − onehot(ŷ)`` at ``ŷ ~ softmax(out)``, by inverse CDF: one ``searchsorted`` per row.

    The same distribution as ``sample="categorical"`` (which draws with ``torch.multinomial`` in float64, ~3 ms
    per row for 50,257 classes on CPU: most of the fit time at this vocabulary).
    """
    probs = torch.softmax(outputs.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=generator.device).to(flat.device)
    labels = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(flat.shape[-1] - 1).squeeze(1)
    flat[torch.arange(flat.shape[0], device=flat.device), labels] -= 1
    return flat.reshape(outputs.shape).to(outputs.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training sequences")
    parser.add_argument("--query", type=int, default=10, help="query sequences")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=8, help="transformer layers (even)")
    parser.add_argument("--chunk", type=int, default=16, help="sequences per forward/backward")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.layers)
    params = ifunc.params_of(model)
    loss = language.causal_lm_loss(hf_logits(model))
    gen = torch.Generator().manual_seed(1)
    train = {"input_ids": torch.randint(0, 50257, (args.train, args.length), generator=gen)}
    query = {"input_ids": torch.randint(0, 50257, (args.query, args.length), generator=gen)}
    mods = language.transformer_modules(model, attention=False)
    print(
        f"GPT-Neo: {sum(p.numel() for p in params.values()):,} parameters, {len(mods)} MLP layers tracked; "
        f"{args.train} train / {args.query} query sequences of {args.length} tokens; "
        f"{torch.get_num_threads()} threads; load average before {os.getloadavg()}",
        flush=True,
    )
    times = {}
    t = time.perf_counter()
    ihvp = ifunc.ihvp_ekfac(
        loss,
        params,
        train,
        model=model,
        modules=mods,
        exclude=language.untracked(model, params, modules=mods),
        sample=sample_categorical,
        generator=torch.Generator().manual_seed(0),
        damping=None,
        chunk_size=args.chunk,
        progress=False,
    )
    times["fit"] = time.perf_counter() - t
    print(f"       fit: {times['fit']:8.1f} s", flush=True)
    t = time.perf_counter()
    pair = ifunc.attribute(loss, params, ihvp, train, query, chunk_size=args.chunk, progress=False)
    times["pairwise"] = time.perf_counter() - t
    print(f"  pairwise: {times['pairwise']:8.1f} s", flush=True)
    t = time.perf_counter()
    tok = ifunc.attribute(loss, params, ihvp, train, query, per_token=True, chunk_size=args.chunk, progress=False)
    times["per_token"] = time.perf_counter() - t
    print(f" per_token: {times['per_token']:8.1f} s", flush=True)
    err = float((tok.sum(-1) - pair).norm() / pair.norm())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"scores {tuple(pair.shape)}, per-token {tuple(tok.shape)}; |Σ_t tok − pair| / |pair| = {err:.1e}")
    print(f"peak RSS {rss:,.0f} MB; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
