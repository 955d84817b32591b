"""How well do scores predict retraining? Random subsets, the linear datamodeling score, leave-one-out agreement and
mislabel detection.

Sign convention (ifunc's): ``scores[q, i] > 0`` means training example ``i`` *lowers* the query measurement ``f_q``
(the query loss unless ``measurement=`` said otherwise); up-weighting ``i`` by ``ε`` changes ``f_q`` by about
``−ε·scores[q, i]`` and removing it from ``n`` examples by about ``+scores[q, i] / n``. Every function here compares
scores with outcomes of that same measurement ``f_q``; for an outcome that grows where ``f_q`` shrinks (accuracy
against scores of the loss) pass ``-outcomes``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .._errors import check_count
from ..likelihood import default_generator
from ..quality import pearson, spearman

__all__ = ["random_subsets", "lds", "loo_correlation", "LOOCorrelation", "mislabel_auc"]


def _real(value, name: str, who: str, dims: int, shape: str) -> torch.Tensor:
    """``value`` as a finite float64 tensor with ``dims`` dimensions (``shape`` names them in errors)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{who}: {name} must be a torch.Tensor {shape}, got {type(value).__name__}; wrap it with torch.as_tensor"
        )
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{who}: {name} must hold real numbers {shape}, got dtype {value.dtype}")
    if value.dim() != dims:
        raise ValueError(f"{who}: {name} must be {shape}, got shape {tuple(value.shape)}")
    value = value.detach().to("cpu", torch.float64)
    bad = (~torch.isfinite(value)).nonzero()
    if len(bad):
        raise ValueError(f"{who}: {name} holds a non-finite value at index {tuple(bad[0].tolist())}; drop or fix it")
    return value


def _mask(subsets, who: str) -> torch.Tensor:
    if not isinstance(subsets, torch.Tensor) or subsets.dtype != torch.bool or subsets.dim() != 2:
        found = (
            f"{subsets.dtype} tensor of shape {tuple(subsets.shape)}"
            if isinstance(subsets, torch.Tensor)
            else (type(subsets).__name__)
        )
        raise TypeError(
            f"{who}: subsets must be a bool mask [m, n] (row s marks the training examples of subset s, as "
            f"random_subsets returns), got a {found}"
        )
    return subsets.cpu()


def random_subsets(n: int, m: int, *, fraction: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` random subsets of ``n`` training examples, each of ``k = round(fraction · n)`` distinct examples.

    Subset ``s`` is the first ``k`` entries of ``torch.randperm(n, generator=generator)`` (the ``s``-th draw), so a
    generator seeded the same gives the same subsets on every machine; the global RNG is never touched.

    Args:
      n: training set size (>= 1).
      m: number of subsets (>= 1).
      fraction: share of the training set in each subset, in ``(0, 1]`` (0.5: half subsets, as in TRAK's LDS).
      generator: a CPU ``torch.Generator`` (default: a fresh one seeded with 0).

    Returns:
      bool mask ``[m, n]``: ``mask[s, i]`` is True when example ``i`` is in subset ``s`` (each row holds ``k``).
      ``mask[s].nonzero().flatten()`` gives the sorted indices.

    Raises:
      TypeError, ValueError: ``n`` or ``m`` not an int >= 1; ``fraction`` not a number in ``(0, 1]``, or so small
        that a subset would be empty.

    Example:
      >>> masks = ifunc.evaluate.random_subsets(400, 100, generator=torch.Generator().manual_seed(1))
      >>> masks.shape, int(masks[0].sum())
      (torch.Size([100, 400]), 200)
    """
    n = check_count(n, "n", "random_subsets")
    m = check_count(m, "m", "random_subsets")
    if isinstance(fraction, torch.Tensor) and fraction.numel() == 1 and not fraction.dtype.is_complex:
        fraction = float(fraction)  # a 0-d tensor
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < float(fraction) <= 1:
        raise ValueError(f"random_subsets: fraction must be a number in (0, 1], got {fraction!r}")
    fraction = float(fraction)  # a NumPy scalar too
    k = round(fraction * n)
    if k < 1:
        raise ValueError(f"random_subsets: fraction={fraction} of n={n} examples leaves the subsets empty; raise it")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"random_subsets: generator must be a torch.Generator or None, got {type(generator).__name__}")
    generator = generator if generator is not None else default_generator()
    masks = torch.zeros(m, n, dtype=torch.bool)
    for s in range(m):
        masks[s, torch.randperm(n, generator=generator)[:k]] = True
    return masks


def lds(scores: torch.Tensor, subsets: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """Linear datamodeling score of each query (Park et al. 2023): how well summed scores rank retrained outcomes.

    For query ``q`` and subset ``S_s`` the scores predict ``g_q(S_s) = −Σ_{i∈S_s} scores[q, i]`` (the more helpful
    examples a subset holds, the lower ``f_q`` after training on it); the score is the Spearman correlation over
    the ``m`` subsets between ``g_q(S_s)`` and the measured ``outcomes[s, q] = f_q(θ(S_s))`` of a model retrained
    on ``S_s``. Ties get average ranks. It is 1 when the outcomes are an increasing function of an additive model
    ``c_q − a_q Σ_{i∈S} scores[q, i]`` (``a_q > 0``), −1 for the opposite sign convention, about 0 for scores that
    carry no information. The usual summary is the mean over queries, ``lds(...).nanmean()``, with its standard
    error over the ``q'`` queries that have one, ``r[r.isfinite()].std() / √q'``.

    Args:
      scores: ``[q, n]`` scores of ``q`` queries against the ``n`` training examples (e.g. :func:`ifunc.attribute`).
      subsets: bool mask ``[m, n]`` of the retrained subsets (:func:`random_subsets`), ``m >= 3``.
      outcomes: ``[m, q]`` the measurement of each query after retraining on each subset (:func:`retrain`).

    Returns:
      ``[q]`` float64 Spearman correlations, in ``[−1, 1]``; NaN for a query whose predictions or outcomes are
      constant over the subsets (no ranking to compare).

    Raises:
      TypeError: a non-tensor, a non-bool mask or non-real scores/outcomes.
      ValueError: shapes that disagree (named), fewer than 3 subsets, non-finite values (the index named).

    Example:
      >>> masks = ifunc.evaluate.random_subsets(n, 50, generator=torch.Generator().manual_seed(1))
      >>> outcomes = ifunc.evaluate.retrain(train_fn, query_losses, masks)  # [50, q]
      >>> ifunc.evaluate.lds(scores, masks, outcomes).nanmean()
    """
    who = "lds"
    scores = _real(scores, "scores", who, 2, "[q, n]")
    masks = _mask(subsets, who)
    outcomes = _real(outcomes, "outcomes", who, 2, "[m, q]")
    (q, n), (m, n_mask) = scores.shape, masks.shape
    if n_mask != n:
        raise ValueError(f"{who}: subsets mark {n_mask} training examples but scores has {n} columns ([q, n])")
    if m < 3:
        raise ValueError(
            f"{who}: a rank correlation over {m} subset(s) says nothing; retrain on at least 3 (50-100 is usual)"
        )
    if outcomes.shape != (m, q):
        hint = " (transpose it: outcomes are [m, q], one row per subset)" if outcomes.shape == (q, m) else ""
        raise ValueError(
            f"{who}: outcomes must be [m={m}, q={q}] (one row per subset, one column per query), got "
            f"{tuple(outcomes.shape)}{hint}"
        )
    # identical subsets must get bitwise identical predictions (their outcomes tie, so must their ranks): one
    # product per distinct subset, gathered back (a BLAS product may round two equal rows differently)
    distinct, which = torch.unique(masks, dim=0, return_inverse=True)
    predicted = (-scores @ distinct.to(torch.float64).T)[:, which]  # [q, m]
    return spearman(predicted, outcomes.T.contiguous())


class LOOCorrelation(NamedTuple):
    """Result of :func:`loo_correlation`: per-query agreement of scores with leave-one-out retraining."""

    pearson: torch.Tensor  #: ``[q]`` Pearson correlation of ``scores[q, examples]`` with the measured changes
    spearman: torch.Tensor  #: ``[q]`` Spearman (rank) correlation of the same pairs


def loo_correlation(
    scores: torch.Tensor, loo_outcomes: torch.Tensor, base_outcome: torch.Tensor, *, examples=None
) -> LOOCorrelation:
    """Agreement of scores with leave-one-out retraining: correlation of ``scores[q, i]`` with ``f_q(θ_{−i}) − f_q(θ)``.

    Retraining without example ``i`` changes the query measurement by ``Δ[i, q] = loo_outcomes[i, q] −
    base_outcome[q]``; influence predicts ``Δ[i, q] ≈ scores[q, i] / n`` (removing a helpful example raises the
    loss), so both correlations are positive for good scores and 1 when the prediction is exact up to scale. For
    each query, over the ``k`` left-out examples: Pearson ``corr(scores[q, I], Δ[:, q])`` (does the size agree, up
    to one factor?) and Spearman (does the order agree?). The model trained on all ``n`` examples gives
    ``base_outcome``, and it and each leave-one-out model should come from the same initialisation (convex
    problems: any), else seed noise swamps the small ``Δ``.

    Args:
      scores: ``[q, n]`` scores of ``q`` queries against the ``n`` training examples.
      loo_outcomes: ``[k, q]``: row ``j`` holds the ``q`` measurements of the model retrained without example
        ``examples[j]``.
      base_outcome: ``[q]`` the measurements of the model trained on all ``n`` examples.
      examples: indices ``[k]`` of the left-out examples (distinct, in ``0 .. n-1``), ``k >= 3``; default all
        ``n`` (then ``loo_outcomes`` has ``n`` rows).

    Returns:
      :class:`LOOCorrelation` of two ``[q]`` float64 tensors; NaN for a query whose changes or scores are constant.

    Raises:
      TypeError: non-tensors, non-real values, ``examples`` not integers.
      ValueError: shapes that disagree (named), fewer than 3 examples, repeated or out-of-range ``examples``,
        non-finite values.

    Example:
      >>> left_out = torch.arange(20)
      >>> loo = ifunc.evaluate.retrain(train_fn, query_losses, ~torch.eye(n, dtype=torch.bool)[left_out])
      >>> ifunc.evaluate.loo_correlation(scores, loo, query_losses(full_model), examples=left_out).pearson.mean()
    """
    who = "loo_correlation"
    scores = _real(scores, "scores", who, 2, "[q, n]")
    loo = _real(loo_outcomes, "loo_outcomes", who, 2, "[k, q]")
    base = _real(base_outcome, "base_outcome", who, 1, "[q]")
    q, n = scores.shape
    if examples is None:
        index = torch.arange(n)
    else:
        index = torch.as_tensor(examples)
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex() or index.dim() != 1:
            raise TypeError(
                f"{who}: examples must be a 1-D tensor of integer indices [k], got {index.dtype} {tuple(index.shape)}"
            )
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"{who}: examples must lie in 0 .. {n - 1} (scores has n={n} columns)")
        if len(index.unique()) != len(index):
            raise ValueError(f"{who}: examples repeats an index; each left-out example appears once")
    k = len(index)
    if k < 3:
        raise ValueError(f"{who}: a correlation over {k} left-out example(s) says nothing; leave out at least 3")
    if base.shape != (q,):
        raise ValueError(f"{who}: base_outcome must be [q={q}] (scores has q={q} rows), got {tuple(base.shape)}")
    if loo.shape != (k, q):
        raise ValueError(
            f"{who}: loo_outcomes must be [k={k}, q={q}] (one row per left-out example"
            f"{'' if examples is not None else ', all n of them; pass examples= for fewer'}), got {tuple(loo.shape)}"
        )
    change = (loo - base).T.contiguous()  # [q, k]
    predicted = scores[:, index.long()]
    return LOOCorrelation(pearson(predicted, change), spearman(predicted, change))


def mislabel_auc(self_scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """ROC AUC of finding mislabelled examples by their self-influence (highest first).

    ``AUC = (#{(i, j): s_i > s_j} + ½ #{(i, j): s_i = s_j}) / (|P| |N|)`` over pairs of a flipped example ``i ∈ P``
    and a clean one ``j ∈ N``: the probability that a random flipped example outranks a random clean one, ties
    counted half. 1: every flipped example ranks above every clean one; 0.5: chance. Computed by sorting, in
    ``O(n log n)``.

    Args:
      self_scores: ``[n]`` self-influence of each training example (:func:`ifunc.self_influence`), or any
        suspicion score where larger means more likely mislabelled.
      flipped: bool ``[n]``, True for the examples whose labels were corrupted.

    Returns:
      The AUC as a float in ``[0, 1]``.

    Raises:
      TypeError: non-tensors, a non-bool ``flipped``, non-real scores.
      ValueError: lengths that differ, no flipped or no clean example, non-finite scores.

    Example:
      >>> s = ifunc.self_influence(loss, params, ihvp, (x, y_noisy))
      >>> ifunc.evaluate.mislabel_auc(s, y_noisy != y)
    """
    who = "mislabel_auc"
    scores = _real(self_scores, "self_scores", who, 1, "[n]")
    if not isinstance(flipped, torch.Tensor) or flipped.dtype != torch.bool or flipped.dim() != 1:
        found = (
            f"{flipped.dtype} {tuple(flipped.shape)}" if isinstance(flipped, torch.Tensor) else type(flipped).__name__
        )
        raise TypeError(f"{who}: flipped must be a bool tensor [n] (True = label corrupted), got {found}")
    flipped = flipped.cpu()
    if flipped.shape != scores.shape:
        raise ValueError(f"{who}: flipped has {len(flipped)} entries but self_scores has {len(scores)}")
    positive, negative = scores[flipped], scores[~flipped].sort().values
    if not len(positive) or not len(negative):
        raise ValueError(f"{who}: needs both flipped and clean examples, got {len(positive)} flipped of {len(scores)}")
    below = torch.searchsorted(negative, positive, right=False)  # clean examples scored strictly lower
    tied = torch.searchsorted(negative, positive, right=True) - below
    wins = below.sum().item() + 0.5 * tied.sum().item()
    return float(wins / (len(positive) * len(negative)))
