"""The ifunc demo: which training images made the model say this?

    python -m ifunc demo        (or: ifunc demo)

Trains a small MLP on scikit-learn's bundled 8×8 digits (offline), scores every training image against a
few test images with two iHVP methods (EK-FAC and CG by default), prints the most helpful (up-weighting them
lowers the query's loss: positive score) and most harmful (negative score) training images per query and the
agreement (Spearman) between the methods, and saves a PNG of each query beside its top training images. Then
checks correctness where it can be checked exactly: an L2-regularised logistic regression whose influence
scores are compared with actual leave-one-out retraining.

Exits non-zero when influence is off (the leave-one-out correlation, or the agreement between the methods,
falls below its threshold). scikit-learn and matplotlib come with the examples extra,
pip install -e ".[examples]"; without them only the leave-one-out check runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

import ifunc
from ifunc.quality import spearman
from ifunc.testing import fit_logistic, leave_one_out_losses, logistic_loss, synthetic_classification

METHODS = ("ekfac", "kfac", "cg", "explicit", "arnoldi", "nystrom", "lissa", "datainf", "diagonal", "identity")
LOO_THRESHOLD = 0.95
AGREEMENT_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------- digits
def digits_problem(*, n_train: int = 1000, hidden: int = 32, steps: int = 300, seed: int = 0):
    """A tanh MLP 64-hidden-10 trained on the first ``n_train`` digits; returns a dict of everything."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits: Any = load_digits()  # a sklearn Bunch
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / max(1, p.shape[-1]) ** 0.5)
    x_tr, y_tr, x_te, y_te = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).double().mean().item()
    return {
        "model": model,
        "params": params,
        "loss": loss,
        "train": (x_tr, y_tr),
        "test": (x_te, y_te),
        "accuracy": acc,
        "images": digits.images[perm.numpy()],
    }


def build_ihvp(method: str, prob: dict, damping: float):
    """The iHVP closure of ``method`` on the digits problem (generic and Kronecker methods alike)."""
    loss, params, train, model = prob["loss"], prob["params"], prob["train"], prob["model"]
    gen = torch.Generator().manual_seed(0)
    if method in ("ekfac", "kfac", "diagonal"):
        return getattr(ifunc, f"ihvp_{method}")(loss, params, train, model=model, damping=damping)
    if method == "identity":
        return ifunc.ihvp_identity(params, model=model, damping=damping)
    extra = {
        "cg": dict(tol=1e-6),
        "arnoldi": dict(rank=64, generator=gen),
        "nystrom": dict(rank=64, generator=gen),
        "lissa": dict(depth=500, batch_size=100, generator=gen),
        "explicit": {},
        "datainf": {},
    }[method]
    return getattr(ifunc, f"ihvp_{method}")(loss, params, train, damping=damping, **extra)


def save_figure(path: str, images, y_tr, queries, y_te, pred, scores, k: int = 4):
    """One row per query: the query image, its ``k`` most helpful and ``k`` most harmful training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_train = len(y_tr)
    fig, axes = plt.subplots(
        len(queries), 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.7 * len(queries) + 0.3), squeeze=False
    )
    for row, q in enumerate(queries):
        top = scores[row].topk(k).indices.tolist()
        bottom = (-scores[row]).topk(k).indices.tolist()
        cells = [(images[n_train + q], f"test {q}\nlabel {int(y_te[q])} pred {int(pred[q])}", "black")]
        cells += [(images[i], f"+ #{i} ({int(y_tr[i])})", "tab:green") for i in top]
        cells += [(images[i], f"− #{i} ({int(y_tr[i])})", "tab:red") for i in bottom]
        for ax, (img, title, colour) in zip(axes[row], cells):
            ax.imshow(img, cmap="gray_r")
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"query | {k} most helpful (+) | {k} most harmful (−) training images (label)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def digits_demo(
    *,
    method: str = "ekfac",
    reference: str = "cg",
    damping: float = 1e-2,
    n_queries: int = 4,
    out: str | None = "ifunc-demo.png",
    n_train: int = 1000,
    k: int = 4,
) -> float:
    """Run the digits demo; returns the mean Spearman agreement of ``method`` with ``reference``."""
    t0 = time.perf_counter()
    prob = digits_problem(n_train=n_train)
    x_te, y_te = prob["test"]
    x_tr, y_tr = prob["train"]
    with torch.no_grad():
        pred = prob["model"](x_te).argmax(1)
    wrong = (pred != y_te).nonzero().flatten().tolist()
    # show mistakes first (the interesting queries), then correct ones
    queries = (wrong + [i for i in range(len(y_te)) if i not in wrong])[:n_queries]
    query = (x_te[queries], y_te[queries])
    d = sum(p.numel() for p in prob["params"].values())
    print(
        f"digits: MLP 64-32-10 ({d:,} parameters) trained on {n_train} images in {time.perf_counter() - t0:.1f} s,"
        f" test accuracy {prob['accuracy']:.3f}; damping {damping}"
    )
    print("  helpful: up-weighting this training image lowers the query's loss (positive score)")
    print("  harmful: up-weighting this training image raises the query's loss (negative score)")
    scores = {}
    for name in dict.fromkeys([method, reference]):
        start = time.perf_counter()
        ihvp = build_ihvp(name, prob, damping)
        scores[name] = ifunc.attribute(prob["loss"], prob["params"], ihvp, prob["train"], query, progress=False)
        print(f"  {name:9s} scores [{len(queries)}, {n_train}] in {time.perf_counter() - start:.2f} s")
    main = scores[method]
    rho = spearman(main, scores[reference])
    for row, q in enumerate(queries):
        top = main[row].topk(k).indices.tolist()
        bottom = (-main[row]).topk(k).indices.tolist()
        fmt = lambda idx: ", ".join(f"#{i}({int(y_tr[i])})" for i in idx)  # noqa: E731
        print(
            f"  test image {q} (label {int(y_te[q])}, predicted {int(pred[q])}), Spearman({method}, {reference}) "
            f"= {rho[row]:.3f}\n    most helpful: {fmt(top)}\n    most harmful: {fmt(bottom)}"
        )
    agreement = float(rho.mean())
    print(f"  mean Spearman({method}, {reference}) over {len(queries)} queries: {agreement:.3f}")
    if out:
        try:
            save_figure(out, prob["images"], y_tr, queries, y_te, pred, main, k=k)
            print(f"  figure: {out}")
        except ImportError:
            print('  (matplotlib not installed: no figure; pip install -e ".[examples]")')
    return agreement


# --------------------------------------------------------------------------------------- leave-one-out
def loo_demo(n_train: int = 300, n_remove: int = 60, seed: int = 0) -> dict[str, float]:
    """Logistic regression: Pearson correlation of predicted vs actual leave-one-out change of the test loss."""

    l2 = 1e-2
    x, y = synthetic_classification(n_train, 8, seed=seed)
    xq, yq = synthetic_classification(20, 8, seed=seed + 1)
    params = fit_logistic(x, y, l2=l2)
    loss = logistic_loss(l2)

    def query_loss(p, batch):
        return loss(p, batch) - 0.5 * l2 * batch[0].shape[0] * (p["w"] ** 2).sum()  # test loss, unregularised

    removed = list(range(n_remove))
    loo = leave_one_out_losses(x, y, xq, yq, l2=l2, indices=removed)  # [n_remove, n_query]
    z = xq @ params["w"] + params["b"]
    actual = (loo - (torch.nn.functional.softplus(z) - yq * z)).sum(dim=1)  # change of total test loss
    print(
        f"leave-one-out check: logistic regression, {n_train} training points, {len(yq)} test points, l2={l2}, "
        f"{n_remove} points removed and the model retrained each time"
    )
    results = {}
    for name, build in [
        ("explicit", lambda: ifunc.ihvp_explicit(loss, params, (x, y))),
        ("cg", lambda: ifunc.ihvp_cg(loss, params, (x, y), tol=1e-8)),
        ("arnoldi(rank=4)", lambda: ifunc.ihvp_arnoldi(loss, params, (x, y), rank=4, damping=1e-2)),
    ]:
        start = time.perf_counter()
        scores = ifunc.attribute(loss, params, build(), (x, y), (xq, yq), measurement=query_loss, progress=False)
        seconds = time.perf_counter() - start
        predicted = scores[:, removed].sum(dim=0) / n_train  # removal: +score / n
        r = float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])
        results[name] = r
        print(f"  {name:16s} Pearson(predicted, actual leave-one-out change) = {r:.4f}   ({seconds:.2f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ifunc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["demo"], help="demo: the digits demo, then the leave-one-out check")
    parser.add_argument("--method", choices=METHODS, default="ekfac", help="method shown (default ekfac)")
    parser.add_argument("--reference", choices=METHODS, default="cg", help="method compared with (default cg)")
    parser.add_argument("--damping", type=float, default=1e-2, help="λ added to the curvature (default 1e-2)")
    parser.add_argument("--queries", type=int, default=4, help="number of test images (default 4)")
    parser.add_argument("--out", default="ifunc-demo.png", help="PNG path ('' for none; default ifunc-demo.png)")
    parser.add_argument("--n-train", type=int, default=1000, help="digits training images (default 1000)")
    parser.add_argument("--loo", action="store_true", help="only the leave-one-out check (no scikit-learn needed)")
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out check")
    args = parser.parse_args(argv)
    if args.queries < 1:
        parser.error("--queries must be at least 1")
    torch.set_num_threads(1)  # the demo's matrices are small: one thread beats two on a shared machine
    ok = True
    if not args.loo:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print(
                "scikit-learn is not installed, so the digits demo is skipped; install the extras with\n"
                '  pip install -e ".[examples]"   (scikit-learn + matplotlib)\n'
            )
        else:
            agreement = digits_demo(
                method=args.method,
                reference=args.reference,
                damping=args.damping,
                n_queries=args.queries,
                out=args.out or None,
                n_train=args.n_train,
            )
            if agreement < AGREEMENT_THRESHOLD:
                print(f"FAIL: agreement {agreement:.3f} < {AGREEMENT_THRESHOLD}")
                ok = False
            print()
    if not args.no_loo:
        results = loo_demo()
        if min(results["explicit"], results["cg"]) <= LOO_THRESHOLD:
            print(f"FAIL: leave-one-out correlation <= {LOO_THRESHOLD}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
