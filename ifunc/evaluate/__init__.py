"""Measuring attribution against retraining: the linear datamodeling score, leave-one-out agreement, mislabel
detection, and the resumable retraining driver that produces their ground truth.

``metrics`` holds the measures (:func:`random_subsets`, :func:`lds`, :func:`loo_correlation`,
:func:`mislabel_auc`), ``retraining`` the driver (:func:`retrain`, outcomes stored in an ifunc score store). Sign
convention: ``scores[q, i] > 0`` means example ``i`` lowers the query measurement ``f_q``; see ``docs/evaluate.md``.
"""

from .metrics import LOOCorrelation, lds, loo_correlation, mislabel_auc, random_subsets
from .retraining import retrain

__all__ = ["random_subsets", "retrain", "lds", "loo_correlation", "LOOCorrelation", "mislabel_auc"]
