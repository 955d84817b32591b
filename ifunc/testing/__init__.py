"""Small problems with known answers, shared by the tests, the demo and the benchmarks.

Public so that people who extend ifunc can test their own methods the same way. The tiny Hugging Face
language models live in :mod:`ifunc.testing.language_models` and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import call, params_of
from ..likelihood import output_loss
from .language_models import causal_lm, hf_logits, tiny_gpt2, tiny_gpt_neo, tiny_llama

__all__ = [
    "rel_error",
    "random_spd",
    "mlp_problem",
    "logistic_loss",
    "fit_logistic",
    "leave_one_out_losses",
    "synthetic_classification",
    "Conv1D",
    "TokenModel",
    "SmallCNN",
    "TinyGPT",
    "causal_lm",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_gpt_neo",
    "hf_logits",
]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``‖a − b‖ / ‖b‖`` (Frobenius norm over all entries) of ``a`` against the reference ``b``.

    ``b`` is the trusted answer (a dense solve, the exact matrix); the result is a Python float, ``inf`` when
    ``b`` is zero and ``a`` is not, and ``nan`` when both are zero.

    Example:
      >>> assert rel_error(ihvp(V), torch.linalg.solve(H + lam * I, V.T).T) < 1e-8
    """
    return float((a - b).norm() / b.norm())


def random_spd(d: int, *, cond: float = 100.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A ``[d, d]`` SPD matrix ``Q diag(λ) Qᵀ`` with eigenvalues log-spaced in ``[1/cond, 1]``."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    w = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d, dtype=torch.float64)
    return ((Q * w) @ Q.T).to(dtype)


def mlp_problem(
    *,
    seed: int = 0,
    sizes=(3, 4, 2),
    n: int = 12,
    activation=nn.Tanh,
    task: str = "classification",
    dtype=torch.float64,
):
    """A random MLP with data: returns ``(model, params, loss, (x, y))``; ``loss`` is an ``output_loss``.

    ``task="classification"`` uses summed cross-entropy, ``"regression"`` summed squared error (× 1/2).
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 and activation is not None:
            layers.append(activation())
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / max(1, p.shape[-1]) ** 0.5)
    x = torch.randn(n, sizes[0], generator=gen, dtype=dtype)
    if task == "classification":
        y = torch.randint(0, sizes[-1], (n,), generator=gen)
        lo = lambda out, b: F.cross_entropy(out, b[1], reduction="sum")  # noqa: E731
    elif task == "regression":
        y = torch.randn(n, sizes[-1], generator=gen, dtype=dtype)
        lo = lambda out, b: 0.5 * ((out - b[1]) ** 2).sum()  # noqa: E731
    else:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    loss = output_loss(lambda p, b: call(model, p, b[0]), lo)
    return model, params_of(model), loss, (x, y)


def synthetic_classification(n: int = 200, d: int = 5, *, seed: int = 0, noise: float = 1.0, dtype=torch.float64):
    """Binary labels from a noisy linear rule: ``(x [n, d], y [n] in {0, 1})``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    w = torch.randn(d, generator=gen, dtype=dtype)
    logits = x @ w + noise * torch.randn(n, generator=gen, dtype=dtype)
    return x, (logits > 0).to(dtype)


def logistic_loss(l2: float):
    """Summed L2-regularised logistic loss on ``params = {"w": [d], "b": []}`` and ``batch = (x, y)``.

    Per example: ``softplus(z) − y z + (l2/2)‖w‖²`` with ``z = x·w + b``; the mean over a data set is the
    usual regularised objective, so its Hessian is the ``H`` ifunc's methods use (``curvature="hessian"``;
    the loss is convex, so ``H`` is PSD).
    """

    def loss(params, batch):
        x, y = batch
        z = x @ params["w"] + params["b"]
        return (F.softplus(z) - y * z).sum() + 0.5 * l2 * x.shape[0] * (params["w"] ** 2).sum()

    return loss


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    init: dict | None = None,
    weights: torch.Tensor | None = None,
    tol: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """Minimise the mean regularised logistic loss (Newton's method, float64); ``weights`` per example."""
    n, d = x.shape
    w = torch.zeros(d + 1, dtype=torch.float64) if init is None else torch.cat([init["w"], init["b"][None]]).double()
    X = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    c = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    total = c.sum()
    reg = torch.full((d + 1,), l2, dtype=torch.float64)
    reg[-1] = 0.0
    for _ in range(100):
        z = X @ w
        p = torch.sigmoid(z)
        g = X.T @ (c * (p - y.double())) / total + reg * w
        if g.norm() < tol:
            break
        H = (X.T * (c * p * (1 - p))) @ X / total + torch.diag(reg)
        w = w - torch.linalg.solve(H, g)
    return {"w": w[:d].to(x.dtype), "b": w[d].to(x.dtype)}


def leave_one_out_losses(x, y, xq, yq, *, l2: float, indices) -> torch.Tensor:
    """Query losses ``[len(indices), n_query]`` after retraining without each training example."""
    full = fit_logistic(x, y, l2=l2)
    out = []
    for i in indices:
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[i] = False
        p = fit_logistic(x[keep], y[keep], l2=l2, init=full)
        z = xq @ p["w"] + p["b"]
        out.append(F.softplus(z) - yq * z)
    return torch.stack(out)


class Conv1D(nn.Module):
    """Stand-in for transformers' GPT-2 ``Conv1D``: ``y = x @ W + b`` with ``W`` stored ``[in, out]``.

    Initialised from the global RNG (seed it for reproducible weights).
    """

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class TokenModel(nn.Module):
    """Sequence model ``[b, T, 3] -> [b, 2]``: a :class:`Conv1D`, a Linear used twice (shared), a Linear without bias.

    Exercises per-token layers, a module called twice per forward, and a missing bias.
    """

    def __init__(self):
        super().__init__()
        self.c = Conv1D(4, 3)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h).sum(dim=1)


class SmallCNN(nn.Module):
    """Images ``[b, 2, 6, 6] -> [b, 3]``: a strided padded Conv2d, a dilated "same" Conv2d without bias, a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 2, 2, dilation=2, padding="same", bias=False)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head attention (q, k, v, o Linear layers) and a GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.ModuleDict({k: nn.Linear(width, width) for k in ("q", "k", "v", "o")})
        self.mlp = nn.ModuleDict({"fc": nn.Linear(width, 4 * width), "proj": nn.Linear(4 * width, width)})

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, T, w = h.shape
        x = self.ln1(h)
        q, k, v = (self.attn[n](x).reshape(b, T, self.heads, -1).transpose(1, 2) for n in ("q", "k", "v"))
        att = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        allowed = causal & mask[:, None, None, :]  # padded keys are never attended to
        att = torch.softmax(att.masked_fill(~allowed, torch.finfo(att.dtype).min), dim=-1)
        h = h + self.attn["o"]((att @ v).transpose(1, 2).reshape(b, T, w))
        return h + self.mlp["proj"](F.gelu(self.mlp["fc"](self.ln2(h))))


class TinyGPT(nn.Module):
    """A small GPT-style causal LM in plain PyTorch (explicit attention, so ``vmap`` works).

    ``forward(input_ids [b, L], attention_mask [b, L] | None) -> logits [b, L, vocab]``. Positions count
    real tokens only (``cumsum(mask) − 1``), so left and right padding leave the real tokens' logits
    unchanged. ``shared=True`` applies one block ``layers`` times (a module called several times per
    forward); ``tied=True`` ties the head to the token embedding.
    """

    def __init__(
        self,
        vocab: int = 16,
        width: int = 8,
        heads: int = 2,
        layers: int = 1,
        context: int = 16,
        *,
        shared: bool = False,
        tied: bool = False,
    ):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.n_layers = layers
        self.blocks = nn.ModuleList([_Block(width, heads) for _ in range(1 if shared else layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        h = self.tok(input_ids) + self.pos(pos)
        for j in range(self.n_layers):
            h = self.blocks[j % len(self.blocks)](h, mask)
        return self.head(self.norm(h))
