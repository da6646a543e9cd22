"""Attribution metrics of a score matrix S [n_test, n_train] (larger = more influential) against group labels.

A training row n is *relevant* to test row q iff train_groups[n] == test_groups[q] (the study's rule; for the
harmful sets every test row is "harmful" and the 20 harmful training rows are the relevant ones). Per test row:

  Acc_q      = 1 if the top-ranked training row is relevant, else 0.
  Cover_q    = (#relevant among the top c_q rows) / c_q,  c_q = #relevant training rows (the group's size).
  recall@k_q = (#relevant among the top k rows) / c_q           (so Cover_q = recall@c_q).
  AUC_q      = P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)  over relevant x irrelevant pairs (Mann-Whitney with
               average ranks).

Reported values are means over test rows. Rows whose group has no training row get Acc 0 and NaN for the other
metrics (excluded from their means, counted in "n_without_relevant").

Ties. The study's files list each group contiguously, so breaking ties by index order would hand perfect scores
to a constant score matrix. Default `ties="average"`: every top-k count is its expectation over a uniformly
random order of tied rows,
  E[#relevant in top k] = r_above + (k - n_above) * r_tied / n_tied,
where n_above / r_above count (relevant) rows scoring strictly above the k-th largest score t and n_tied /
r_tied the (relevant) rows scoring exactly t. It is deterministic and needs no seed; a constant matrix gives
Acc = Cover = (fraction relevant) and AUC = 0.5. `ties="random"` instead draws one seeded random order of the
training rows (the same permutation for every test row) as the secondary sort key. AUC always uses average ranks.

Confidence intervals: percentile bootstrap over test rows (resample rows with replacement, `n_boot` times,
`np.random.default_rng(seed)`), interval [(1 - level) / 2, (1 + level) / 2] of the resampled means.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.stats

TIES = ("average", "random")


def _check(scores, test_groups, train_groups):
    s = np.asarray(scores, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_test, n_train], got shape {s.shape}")
    tg, ng = np.asarray(test_groups), np.asarray(train_groups)
    if tg.shape != (s.shape[0],) or ng.shape != (s.shape[1],):
        raise ValueError(f"scores {s.shape} need {s.shape[0]} test and {s.shape[1]} train labels, got "
                         f"{tg.shape} and {ng.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN entries: fix the scoring run (e.g. the "
                         "solver's damping) before evaluating")
    return s, tg[:, None] == ng[None, :]


def expected_hits(scores: np.ndarray, relevant: np.ndarray, k, *, ties: str = "average", seed: int = 0) -> np.ndarray:
    """#relevant training rows among the top k of each test row ([Q]; k an int or [Q] ints in 1..N).

    ties="average": expectation over uniformly random orders of tied rows; "random": one seeded order.
    """
    s = np.asarray(scores, np.float64)
    rel = np.asarray(relevant, bool)
    q, n = s.shape
    k = np.broadcast_to(np.asarray(k, np.int64), (q,))
    if (k < 1).any() or (k > n).any():
        raise ValueError(f"k must lie in 1..{n}, got {np.unique(k)}")
    if ties == "random":
        perm = np.random.default_rng(seed).permutation(n)
        order = np.lexsort((np.broadcast_to(perm, s.shape), -s), axis=-1)
        in_top = np.arange(n)[None, :] < k[:, None]
        return (np.take_along_axis(rel, order, axis=1) & in_top).sum(1).astype(np.float64)
    if ties != "average":
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    kth = np.take_along_axis(-np.sort(-s, axis=1), (k - 1)[:, None], axis=1)  # k-th largest score [Q, 1]
    above, tied = s > kth, s == kth
    n_above, n_tied = above.sum(1), tied.sum(1)
    r_above, r_tied = (above & rel).sum(1), (tied & rel).sum(1)
    return r_above + (k - n_above) * r_tied / n_tied


def roc_auc_rows(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AUC per test row (average ranks for ties); NaN where a row has no relevant or no irrelevant rows."""
    s = np.asarray(scores, np.float64)
    rel = np.asarray(relevant, bool)
    ranks = scipy.stats.rankdata(s, method="average", axis=1)
    p = rel.sum(1)
    neg = rel.shape[1] - p
    u = (ranks * rel).sum(1) - p * (p + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((p > 0) & (neg > 0), u / (p * neg), np.nan)


def per_row_metrics(scores, test_groups, train_groups, *, ks: Sequence[int] = (), ties: str = "average",
                    seed: int = 0) -> dict:
    """{"acc", "cover", "auc", "recall@k" for k in ks}: arrays [n_test] (NaN where undefined)."""
    s, rel = _check(scores, test_groups, train_groups)
    c = rel.sum(1)
    has = c > 0
    out = {"acc": expected_hits(s, rel, 1, ties=ties, seed=seed)}
    with np.errstate(invalid="ignore", divide="ignore"):
        hits_c = expected_hits(s, rel, np.where(has, c, 1), ties=ties, seed=seed)
        out["cover"] = np.where(has, hits_c / np.maximum(c, 1), np.nan)
        out["auc"] = roc_auc_rows(s, rel)
        for k in ks:
            hits = expected_hits(s, rel, min(int(k), s.shape[1]), ties=ties, seed=seed)
            out[f"recall@{k}"] = np.where(has, hits / np.maximum(c, 1), np.nan)
    return out


def accuracy(scores, test_groups, train_groups, **kw) -> float:
    """Acc: mean over test rows of [top-1 training row shares the test row's group]."""
    return float(np.mean(per_row_metrics(scores, test_groups, train_groups, **kw)["acc"]))


def cover(scores, test_groups, train_groups, **kw) -> float:
    """Cover: mean over test rows of the fraction of its top-c rows in its group, c = the group's train size."""
    return float(np.nanmean(per_row_metrics(scores, test_groups, train_groups, **kw)["cover"]))


def roc_auc(scores, test_groups, train_groups) -> float:
    """Mean over test rows of the ROC-AUC separating same-group from other training rows."""
    s, rel = _check(scores, test_groups, train_groups)
    return float(np.nanmean(roc_auc_rows(s, rel)))


def recall_at_k(scores, test_groups, train_groups, k: int, **kw) -> float:
    """Mean over test rows of (#same-group rows among the top k) / (#same-group training rows)."""
    return float(np.nanmean(per_row_metrics(scores, test_groups, train_groups, ks=(k,), **kw)[f"recall@{k}"]))


def row_spearman(a, b) -> np.ndarray:
    """[Q] Spearman correlation of row q of `a` [Q, N] with row q of `b` [Q, N] (across the N columns: how alike two
    score matrices rank the training rows for each query). The package's one Spearman:

        rho_q = <r_q - mean(r_q), u_q - mean(u_q)> / (||r_q - mean(r_q)|| ||u_q - mean(u_q)||),  clipped to [-1, 1],

    r_q, u_q the ranks of row q of a and b, ties given their average rank (as `scipy.stats.spearmanr`). NaN for a
    constant row of either (no ranking to compare) and for a row holding a NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"row_spearman needs two [Q, N] matrices of one shape, got {a.shape} and {b.shape}")
    if a.shape[1] == 0:
        raise ValueError("row_spearman needs at least one column")
    constant = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    ra = scipy.stats.rankdata(a, method="average", axis=1)  # a row holding a NaN ranks as all NaN
    rb = scipy.stats.rankdata(b, method="average", axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip((ra * rb).sum(1) / den, -1.0, 1.0)
    return np.where(constant, np.nan, rho)


def spearman(a, b) -> float:
    """Spearman rank correlation of two vectors (`row_spearman` of one row); NaN when either is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"spearman needs two vectors of one length, got shapes {a.shape} and {b.shape}")
    return float(row_spearman(a[None], b[None])[0])


def bootstrap_ci(values, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaN entries dropped), resampling with replacement;
    (nan, nan) when there is nothing to resample or n_boot = 0 (no interval asked for)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def evaluate(scores, test_groups, train_groups, *, ks: Sequence[int] = (1, 5, 10, 20), ties: str = "average",
             n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """All metrics with bootstrap CIs: {"acc": {"value", "ci"}, "cover": ..., "auc": ..., "recall@k": ...,
    "per_group": {group: {"acc", "cover", "n"}}, "n_test", "n_without_relevant"}."""
    rows = per_row_metrics(scores, test_groups, train_groups, ks=ks, ties=ties, seed=seed)
    out = {}
    for name, v in rows.items():
        value = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out[name] = {"value": value, "ci": list(bootstrap_ci(v, n_boot=n_boot, level=level, seed=seed))}
    tg = np.asarray(test_groups)
    out["per_group"] = {
        str(g): {"acc": float(np.mean(rows["acc"][tg == g])),
                 "cover": float(np.nanmean(rows["cover"][tg == g])) if np.isfinite(rows["cover"][tg == g]).any()
                 else float("nan"),
                 "n": int((tg == g).sum())}
        for g in np.unique(tg)}
    out["n_test"] = int(len(tg))
    out["n_without_relevant"] = int(np.isnan(rows["cover"]).sum())
    out["ties"] = ties
    return out


def harmful_labels(train_groups, *, harmful: str = "harmful", n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """(test_groups, train_groups) for harmful-data identification: every test row is `harmful`; a training row
    is relevant iff its group is `harmful` (all other groups collapse to "other")."""
    ng = np.asarray(train_groups)
    if not (ng == harmful).any():
        raise ValueError(f"no training row has group {harmful!r}; groups are {sorted(set(ng.tolist()))}")
    return np.full(n_test, harmful, dtype=object), np.where(ng == harmful, harmful, "other").astype(object)


def harmful_evaluation(scores, train_groups, *, harmful: str = "harmful", **kwargs) -> dict:
    """`evaluate` for the mixed (harmful) sets: only the harmful training rows count; Cover uses c = their count
    (20 in the study's mixedS / mixedL)."""
    s = np.asarray(scores)
    tg, ng = harmful_labels(train_groups, harmful=harmful, n_test=s.shape[0])
    out = evaluate(s, tg, ng, **kwargs)
    out["n_relevant"] = int((ng == harmful).sum())
    return out
