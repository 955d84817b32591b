"""The bergson side of ``index_vs_bergson.py``: run in bergson's own venv, never imports ifunc.

    /tmp/bergson-venv/bin/python benchmarks/_bergson_worker.py WORKDIR PROJECTION_DIM TOKEN_BATCH ATTENTION

Reads ``WORKDIR/model`` (a saved ``GPT2LMHeadModel``) and ``WORKDIR/tokens.pt`` (``train [N, T]``, ``query [Q, T]``
token ids), and runs bergson's own stages in this process, each timed:

- ``hessian``: bergson's autocorrelation Hessian (``HessianConfig(method="autocorrelation")``, the curvature
  bergson fits for a projected index: per module the Gram ``E[g gᵀ]`` of the ``p × p`` projected gradients, labels
  sampled from the model as bergson's default);
- ``build``: the gradient index (``build_worker``, bergson's ``build`` without its tokenizer step: the data is
  already token ids), per module ``vec(P_o G P_aᵀ)`` of ``p²`` values, float32, biases and embeddings left out;
- ``query``: ``Attributor(index).trace(model)`` around the summed next-token loss of the ``Q`` query sequences,
  ``k = N`` (every training example), once per preconditioning: ``none`` (inner products of the projected
  gradients), ``autocorr`` (one-sided ``H⁻¹`` of the autocorrelation Hessian, bergson's default damping
  ``1 / (λ + 0.1 mean λ)``) and ``cosine`` (``unit_norm=True``, the default of ``bergson query``).

Writes ``WORKDIR/bergson.pt``: ``{"scores": {variant: [Q, N]}, "times": {...}, "bytes": int, "rss_mb": float}``.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from bergson import Attributor, IndexConfig, PreprocessConfig
from bergson.build import build_worker
from bergson.config.config import HessianConfig
from bergson.hessians.hessian_approximations import hessian_worker
from datasets import Dataset
from transformers import GPT2LMHeadModel


def _finish(cfg: IndexConfig) -> str:
    """Move a stage's ``.part`` directory to its run path, as bergson's own ``build`` does after its workers."""
    shutil.rmtree(cfg.run_path, ignore_errors=True)
    shutil.move(str(cfg.partial_run_path), cfg.run_path)
    return cfg.run_path


def _config(run_path: Path, model_dir: Path, p: int, token_batch: int, attention: str) -> IndexConfig:
    """bergson's defaults but the run path, the local model, ``projection_dim = p`` and float32."""
    return IndexConfig(
        run_path=str(run_path),
        model=str(model_dir),
        projection_dim=p,
        token_batch_size=token_batch,
        precision="fp32",
        overwrite=True,
        model_kwargs=f"attn_implementation={attention}",
    )


def _query(index: str, hessian: str | None, unit_norm: bool, model, query: torch.Tensor) -> torch.Tensor:
    """``[Q, N]`` scores of every training example for each query sequence, from bergson's ``Attributor.trace``."""
    attributor = Attributor(index, device="cpu", unit_norm=unit_norm, hessian_path=hessian)
    with attributor.trace(model.base_model, k=None) as result:
        logits = model(query).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), query[:, 1:].reshape(-1), reduction="sum"
        )
        ce.backward()
    scores = torch.empty(query.shape[0], attributor.N)
    scores.scatter_(1, result.indices, result.scores.float())
    return scores


def main(workdir: Path, p: int, token_batch: int, attention: str) -> None:
    """Fit bergson's Hessian, build its index and query it three ways; write ``workdir/bergson.pt``."""
    tokens = torch.load(workdir / "tokens.pt")
    train, query = tokens["train"], tokens["query"]
    ds = Dataset.from_dict({"input_ids": train.tolist(), "length": [train.shape[1]] * len(train)})
    model_dir = workdir / "model"
    times = {}

    cfg = _config(workdir / "bergson_hessian", model_dir, p, token_batch, attention)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hessian_worker(0, 0, 1, cfg, HessianConfig(method="autocorrelation"), ds)
    hessian = _finish(cfg)
    times |= {"precond_autocorr": time.perf_counter() - t0, "precond_none": 0.0, "precond_cosine": 0.0}

    cfg = _config(workdir / "bergson_index", model_dir, p, token_batch, attention)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_worker(0, 0, 1, cfg, PreprocessConfig(), ds)
    index = _finish(cfg)
    times["build"] = time.perf_counter() - t0
    grad_sizes = json.loads((Path(index) / "info.json").read_text())["grad_sizes"]

    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention).eval()
    model.requires_grad_(False)  # as bergson's own loader: only the input embedding carries the backward
    model.get_input_embeddings().requires_grad_(True)
    scores = {}
    variants = {"none": (None, False), "autocorr": (hessian, False), "cosine": (None, True)}
    for name, (hess, unit_norm) in variants.items():
        t0 = time.perf_counter()
        scores[name] = _query(index, hess, unit_norm, model, query)
        times[f"query_{name}"] = time.perf_counter() - t0
    torch.save(
        {
            "scores": scores,
            "times": times,
            "bytes": 4 * sum(grad_sizes.values()),
            "modules": len(grad_sizes),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        workdir / "bergson.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
