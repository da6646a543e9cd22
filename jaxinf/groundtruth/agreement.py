"""Agreement of a method's scores S [Q, N] (larger = row n helps query q more) with counterfactual ground truth.

LDS (Park et al. 2023). For M subset masks K [M, N] (1 = row kept) and the query losses of the runs retrained on
each subset, losses [M, Q], the method predicts the outcome of subset m for query q by the sum of its scores over
the kept rows, pred[m, q] = sum_n K[m, n] S[q, n]. A helpful row (large score) lowers the loss, so a perfect
predictor ranks subsets by pred exactly as by -loss:

    LDS_q = Spearman_m(pred[:, q], -losses[:, q]),   LDS = mean_q LDS_q   (+1 = perfect, 0 = no information).

Score-matrix ground truths (trajectory influence, leave-one-out, PBRF, all in the same sign convention): per
query, the Spearman correlation across training rows between the method's scores and the ground truth's, then the
mean over queries. Queries whose correlation is undefined (a constant row) are NaN and left out of the mean.
Intervals: percentile bootstrap over queries (`jaxinf.evaluation.metrics.bootstrap_ci`).
"""

from __future__ import annotations

import numpy as np

from jaxinf.evaluation.metrics import bootstrap_ci, row_spearman
from jaxinf.evaluation.metrics import spearman as _spearman


def _summary(per_query: np.ndarray, n_boot: int, seed: int) -> dict:
    v = np.asarray(per_query, np.float64)
    mean = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return {"value": mean, "ci": list(bootstrap_ci(v, n_boot=n_boot, seed=seed)), "per_query": v.tolist()}


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS_q for each query [Q] (see the module docstring)."""
    s, k, y = (np.asarray(a, np.float64) for a in (scores, masks, losses))
    if s.ndim != 2 or k.shape != (k.shape[0], s.shape[1]) or y.shape != (k.shape[0], s.shape[0]):
        raise ValueError(f"LDS needs scores [Q, N], masks [M, N] and losses [M, Q]; got {s.shape}, {k.shape}, "
                         f"{y.shape}")
    pred = k @ s.T  # [M, Q]
    return np.array([_spearman(pred[:, q], -y[:, q]) for q in range(s.shape[0])])


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"value": mean LDS over queries, "ci": bootstrap interval, "per_query": [Q]}."""
    return _summary(lds_per_query(scores, masks, losses), n_boot, seed)


def rank_agreement(scores: np.ndarray, truth: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean over queries of the Spearman correlation across rows of `scores` [Q, N] with `truth` [Q, N]."""
    s, t = np.asarray(scores, np.float64), np.asarray(truth, np.float64)
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and ground truth {t.shape} must both be [Q, N]")
    return _summary(row_spearman(s, t), n_boot, seed)


def sign_agreement(scores: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of (q, n) pairs where the two score matrices have the same sign."""
    return float(np.mean(np.sign(np.asarray(scores)) == np.sign(np.asarray(truth))))
