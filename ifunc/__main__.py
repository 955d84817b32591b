"""``python -m ifunc demo``: influence vs. actual leave-one-out retraining, on an embedded problem.

Trains an L2-regularised logistic regression, scores every training example against 20 test points with
the exact and the CG inverse-HVP, retrains without each of 60 training examples, and prints how well the
scores predicted the change of the test loss.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def demo(n_train: int = 300, n_remove: int = 60, seed: int = 0) -> dict[str, float]:
    import ifunc
    from ifunc.testing import fit_logistic, leave_one_out_losses, logistic_loss, synthetic_classification

    l2 = 1e-2
    x, y = synthetic_classification(n_train, 8, seed=seed)
    xq, yq = synthetic_classification(20, 8, seed=seed + 1)
    params = fit_logistic(x, y, l2=l2)
    loss = logistic_loss(l2)

    def query_loss(p, batch):
        return loss(p, batch) - 0.5 * l2 * batch[0].shape[0] * (p["w"] ** 2).sum()  # test loss, unregularised

    removed = list(range(n_remove))
    loo = leave_one_out_losses(x, y, xq, yq, l2=l2, indices=removed)          # [n_remove, n_query]
    z = xq @ params["w"] + params["b"]
    actual = (loo - (torch.nn.functional.softplus(z) - yq * z)).sum(dim=1)   # change of total test loss
    print(f"logistic regression, {n_train} training points, {len(yq)} test points, l2={l2}")
    results = {}
    helpful = None
    for name, build in [("explicit", lambda: ifunc.ihvp_explicit(loss, params, (x, y))),
                        ("cg", lambda: ifunc.ihvp_cg(loss, params, (x, y), tol=1e-8)),
                        ("arnoldi(rank=4)", lambda: ifunc.ihvp_arnoldi(loss, params, (x, y), rank=4,
                                                                        damping=1e-2))]:
        start = time.perf_counter()
        scores = ifunc.attribute(loss, params, build(), (x, y), (xq, yq), measurement=query_loss)
        seconds = time.perf_counter() - start
        predicted = scores[:, removed].sum(dim=0) / n_train                   # removal: +score / n
        r = float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])
        results[name] = r
        helpful = scores.sum(dim=0).topk(3).indices.tolist() if helpful is None else helpful
        print(f"  {name:16s} Pearson(predicted, actual leave-one-out change) = {r:.4f}   ({seconds:.2f} s)")
    print(f"  most helpful training points for the whole test set (explicit): {helpful}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ifunc", description=__doc__)
    parser.add_argument("command", choices=["demo"])
    parser.add_argument("--n-train", type=int, default=300)
    args = parser.parse_args(argv)
    results = demo(n_train=args.n_train)
    return 0 if min(results["explicit"], results["cg"]) > 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
