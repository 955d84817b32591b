"""Influence from inside a plain PyTorch training loop, and ensembles over checkpoints and seeds.

    python examples/training_loop.py            # ~20 s on 2 cores (needs scikit-learn: pip install -e ".[examples]")

ifunc's functions are pure: they read parameters only from their arguments and never touch the module, so
computing influence in the middle of training is a few lines and does not disturb it. The loop below trains
a digits MLP with mini-batch SGD and, every few epochs, snapshots the parameters and scores the training set
against some test images with EK-FAC. After training it combines the checkpoints:

* **TracIn** (Pruthi et al. 2020): Σ_k lr_k ∇f(z_q; θ_k)·∇ℓ(z_i; θ_k), gradient dot products summed over
  checkpoints weighted by the learning rate — ``attribute_ensemble`` with ``ihvp_identity`` and ``weights``;
* an EK-FAC **checkpoint ensemble**, the mean of the per-checkpoint influence scores;
* a **seed ensemble** (TRAK-style): the same run from other initialisations, scores averaged.

and reports how each agrees (Spearman) with exact-up-to-tolerance CG influence on the final model, and how
often the most helpful training image shares the query's label. Agreeing with one model's CG scores is not
what the ensembles aim at (they average out the idiosyncrasies of one run); ``benchmarks/lds.py`` measures
how well each predicts actual retraining.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import ifunc


def spearman(a, b):
    ra, rb = a.argsort(-1).argsort(-1).double(), b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return ((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).mean().item()


def load():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1000], y[:1000]), (x[1000:1050], y[1000:1050])


def train(seed, train_data, query, *, epochs=12, every=3, damping=1e-2, verbose=True):
    """Mini-batch SGD; returns the model and a list of (checkpoint params, learning rate)."""
    x, y = train_data
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=0.5)
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]), lambda out, b: F.cross_entropy(out, b[1], reduction="sum")
    )
    checkpoints, previous = [], None
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(y), generator=gen).split(50):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch % every == 0:
            # params_of shares storage with the module, which keeps training: snapshot a copy
            params = {k: v.clone() for k, v in ifunc.params_of(model).items()}
            checkpoints.append((params, sched.get_last_lr()[0]))
            if verbose:
                ihvp = ifunc.ihvp_ekfac(loss, params, train_data, model=model, damping=damping)
                scores = ifunc.attribute(loss, params, ihvp, train_data, query, progress=False)
                with torch.no_grad():
                    acc = (ifunc.call(model, params, query[0]).argmax(1) == query[1]).float().mean()
                change = (
                    ""
                    if previous is None
                    else f", Spearman with the previous checkpoint {spearman(scores, previous):.3f}"
                )
                print(
                    f"  epoch {epoch:2d}: query accuracy {acc:.2f}, most helpful for query 0: "
                    f"{scores[0].topk(3).indices.tolist()}{change}"
                )
                previous = scores
        sched.step()
    return model, loss, checkpoints


def main():
    torch.set_num_threads(1)
    train_data, query = load()
    damping = 1e-2
    start = time.perf_counter()
    print("seed 0, EK-FAC influence at every 3rd epoch:")
    model, loss, checkpoints = train(0, train_data, query, damping=damping)
    params = [p for p, _ in checkpoints]
    lrs = [lr for _, lr in checkpoints]
    final = params[-1]

    reference = ifunc.attribute(
        loss,
        final,
        ifunc.ihvp_cg(loss, final, train_data, damping=damping, tol=1e-5),  # float32 reaches ~1e-6, not below
        train_data,
        query,
        progress=False,
    )
    ekfac = lambda p: ifunc.ihvp_ekfac(loss, p, train_data, model=model, damping=damping)  # noqa: E731
    results = {
        "EK-FAC, final checkpoint": ifunc.attribute(loss, final, ekfac(final), train_data, query, progress=False),
        "TracIn (identity, lr-weighted sum over checkpoints)": ifunc.attribute_ensemble(
            loss, params, lambda p: ifunc.ihvp_identity(p, model=model), train_data, query, weights=lrs, progress=False
        ),
        "EK-FAC, mean over checkpoints": ifunc.attribute_ensemble(
            loss, params, ekfac, train_data, query, progress=False
        ),
    }
    # seed ensemble: the same recipe from other initialisations; the loss of each run calls its own module,
    # but modules of one architecture are interchangeable under ifunc.call, so one loss and model serve all
    finals = [final] + [train(seed, train_data, query, verbose=False)[2][-1][0] for seed in (1, 2, 3)]
    results["EK-FAC, mean over 4 seeds (final checkpoints)"] = ifunc.attribute_ensemble(
        loss, finals, ekfac, train_data, query, progress=False
    )

    y_train, y_query = train_data[1], query[1]
    print(f"\nagreement with CG influence on the final model ({len(y_query)} queries, 1000 training images):")
    for name, scores in results.items():
        same = (y_train[scores.argmax(1)] == y_query).float().mean()
        print(f"  {name:52s} Spearman {spearman(scores, reference):.3f}   top-1 same label {same:.2f}")
    same = (y_train[reference.argmax(1)] == y_query).float().mean()
    print(f"  {'CG, final checkpoint (reference)':52s} Spearman 1.000   top-1 same label {same:.2f}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
