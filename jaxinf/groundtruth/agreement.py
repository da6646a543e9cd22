"""Agreement of a method's scores S [Q, N] (larger = row n helps query q more) with counterfactual ground truth.

LDS (Park et al. 2023). For M subset masks K [M, N] (1 = row kept) and the query losses of the runs retrained on
each subset, losses [M, Q], the method predicts the outcome of subset m for query q by the sum of its scores over
the kept rows, pred[m, q] = sum_n K[m, n] S[q, n]. A helpful row (large score) lowers the loss, so a perfect
predictor ranks subsets by pred exactly as by -loss:

    LDS_q = Spearman_m(pred[:, q], -losses[:, q]),   LDS = mean_q LDS_q   (+1 = perfect, 0 = no information).

Score-matrix ground truths (trajectory influence, leave-one-out, PBRF, all in the same sign convention): per
query, the Spearman correlation across training rows between the method's scores and the ground truth's, then the
mean over queries. Queries whose correlation is undefined (a constant row) are NaN and left out of the mean.
Intervals: percentile bootstrap over queries (`jaxinf.evaluation.metrics.bootstrap_ci`), and none at all from
fewer than MIN_QUERIES queries (the "ci" is then [nan, nan] and a "note" says why): with 1-4 queries a bootstrap
interval is only the spread of the per-query values.

Paired comparisons (`paired_lds`, `paired_rank`): the difference A - B of two methods' agreement on the same
queries and subsets, with a bootstrap of the difference itself, so what the two share (a hard query, an odd
subset) cancels. For LDS the bootstrap is two-way: each resample draws M subsets and Q queries with replacement
and recomputes both methods' LDS on them; for score ground truths it resamples queries.
"""

from __future__ import annotations

import numpy as np

from jaxinf.evaluation.metrics import bootstrap_ci, row_spearman
from jaxinf.evaluation.metrics import spearman as _spearman


MIN_QUERIES = 8  # no interval is reported from fewer queries


def _too_few(n: int) -> str:
    return f"{n} queries: no interval (at least {MIN_QUERIES} are needed)"


def _summary(per_query: np.ndarray, n_boot: int, seed: int) -> dict:
    v = np.asarray(per_query, np.float64)
    n = int(np.isfinite(v).sum())
    mean = float(np.nanmean(v)) if n else float("nan")
    out = {"value": mean, "ci": [float("nan"), float("nan")], "n_queries": n, "per_query": v.tolist()}
    if n < MIN_QUERIES:
        out["note"] = _too_few(n)
    else:
        out["ci"] = list(bootstrap_ci(v, n_boot=n_boot, seed=seed))
    return out


def paired_lds(scores_a: np.ndarray, scores_b: np.ndarray, masks: np.ndarray, losses: np.ndarray, *,
               n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """LDS(A) - LDS(B) on the same queries and subsets, {"value", "ci", "n_queries", "n_subsets", "per_query"}.

    value = mean_q (LDS_q(A) - LDS_q(B)). ci: percentile interval of that mean over `n_boot` two-way resamples
    (M subsets and Q queries drawn with replacement, independently, each LDS_q recomputed on the drawn subsets;
    draws where a query's LDS is undefined are averaged over its defined queries). None below MIN_QUERIES."""
    return pooled_paired_lds([(scores_a, scores_b, masks, losses)], n_boot=n_boot, level=level, seed=seed)


def pooled_paired_lds(strata, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """`paired_lds` over several independent runs (strata: [(scores_a, scores_b, masks, losses)], e.g. one per
    fine-tuning seed, each with its own subsets and queries): value = mean of LDS_q(A) - LDS_q(B) over every
    (run, query); each bootstrap draw resamples subsets and queries within every run (stratified two-way).
    scores_b None: LDS(A) itself, with the same interval."""
    prepared = []
    for scores_a, scores_b, masks, losses in strata:
        k, y = np.asarray(masks, np.float64), -np.asarray(losses, np.float64)
        pa = k @ np.asarray(scores_a, np.float64).T  # [M, Q]
        pb = None if scores_b is None else k @ np.asarray(scores_b, np.float64).T
        if pa.shape != y.shape:
            raise ValueError(f"paired LDS needs scores [Q, N], masks [M, N] and losses [M, Q]; got {pa.shape} vs "
                             f"{y.shape}")
        prepared.append((pa, pb, y))
    def diff(pa, pb, y):  # [Q]: Spearman over the subsets of each query's column
        return row_spearman(pa.T, y.T) - (0.0 if pb is None else row_spearman(pb.T, y.T))

    per_query = np.concatenate([diff(pa, pb, y) for pa, pb, y in prepared])
    out = {"value": float(np.nanmean(per_query)) if np.isfinite(per_query).any() else float("nan"),
           "ci": [float("nan"), float("nan")], "n_queries": int(np.isfinite(per_query).sum()),
           "n_subsets": int(sum(y.shape[0] for _, _, y in prepared)), "per_query": per_query.tolist(),
           "bootstrap": "two-way: subsets and queries" + (f", within each of {len(prepared)} runs"
                                                          if len(prepared) > 1 else "")}
    if out["n_queries"] < MIN_QUERIES:
        out["note"] = _too_few(out["n_queries"])
        return out
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(int(n_boot)):
        parts = []
        for pa, pb, y in prepared:
            m, q = y.shape
            im, iq = rng.integers(0, m, m), rng.integers(0, q, q)
            parts.append(diff(pa[im][:, iq], None if pb is None else pb[im][:, iq], y[im][:, iq]))
        d = np.concatenate(parts)
        if np.isfinite(d).any():
            draws.append(np.nanmean(d))
    if draws:
        lo, hi = np.quantile(draws, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
        out["ci"] = [float(lo), float(hi)]
    return out


def paired_rank(scores_a: np.ndarray, scores_b: np.ndarray, truth: np.ndarray, *, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """Spearman(A, truth) - Spearman(B, truth) per query (across the training rows), its mean and a bootstrap
    interval over queries (none below MIN_QUERIES). All three matrices are [Q, N] on the same queries and rows."""
    d = row_spearman(scores_a, truth) - row_spearman(scores_b, truth)
    return dict(_summary(d, n_boot, seed), bootstrap="queries")


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS_q for each query [Q] (see the module docstring)."""
    s, k, y = (np.asarray(a, np.float64) for a in (scores, masks, losses))
    if s.ndim != 2 or k.shape != (k.shape[0], s.shape[1]) or y.shape != (k.shape[0], s.shape[0]):
        raise ValueError(f"LDS needs scores [Q, N], masks [M, N] and losses [M, Q]; got {s.shape}, {k.shape}, "
                         f"{y.shape}")
    pred = k @ s.T  # [M, Q]
    return row_spearman(pred.T, -y.T)


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
