"""Ground truths for a study run, computed once, cached in a directory, and every method's agreement with them.

Kinds (all scores in the library's sign: larger = the training row helps the query more):
  trajectory  -d L_q(theta_S(w)) / d w_n at w = 1, the exact derivative of the real fine-tuning (all rows)
  loo         L_q(without n) - L_q(full), by retraining, for `loo_rows` rows spread evenly over the training set
  pbrf        minus the PBRF response (L_q(theta*(eps)) - L_q(theta_s)) / eps for `pbrf_rows` rows; a solve whose
              final gradient norm is above `pbrf_tol` x its initial one is flagged (converged: false, a warning)
  lds         query losses of `lds_subsets` subsets of fraction `lds_fraction` (`lds_stratify`: that fraction of
              every group), each retrained from scratch on its rows with the fine-tuning's rule for that many
              rows, once per seed in `lds_seeds` (seed + 0, seed + 1, ...), averaged over seeds
  lds_masked  the same subsets as weight-0 replays of the fine-tuning run itself (same order, steps and keys):
              trajectory-conditional, the function whose exact derivative is `trajectory`
Trajectory, LOO and PBRF cost a backward pass or a solve per query (or row), so they use `max_queries` test rows
spread evenly over the test set (all when None); LDS retrains cost the same for any number of queries and use all.
Trajectory's adjoint takes `query_chunk` queries per backward pass (memory grows with it; default 1).
Trajectory's forward pass (every weight 1) must end on the fine-tuned adapters: `replay_error`, the largest
parameter difference, checks that the scanned trainer replays `jaxinf.training.train` (free: the adjoint needs
that pass anyway; LOO's first retrain is the full run too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from jaxinf import progress, training
from jaxinf.workdir import write_npz
from jaxinf.groundtruth import agreement
from jaxinf.groundtruth.pbrf import pbrf_scores
from jaxinf.groundtruth.retrain import lds_masks, retrain_losses, retrain_subsets, stratified_masks
from jaxinf.groundtruth.trajectory import WeightedRun, forward_states, trajectory_influence

KINDS = ("trajectory", "lds", "lds_masked", "loo", "pbrf")
LDS_KINDS = ("lds", "lds_masked")


@dataclasses.dataclass(frozen=True)
class GroundTruthConfig:
    kinds: tuple[str, ...] = ()
    max_queries: Optional[int] = None
    lds_subsets: int = 8
    lds_fraction: float = 0.5
    lds_seeds: int = 2
    lds_stratify: bool = False
    loo_rows: Optional[int] = 8
    pbrf_rows: Optional[int] = 8
    pbrf_eps: float = 1e-2
    pbrf_damping: float = 1e-3  # absolute lambda (the study binary sets it relative to the Fisher's mean eigenvalue)
    pbrf_iters: int = 50
    pbrf_tol: float = 1e-2
    retrain_chunk: int = 1
    query_chunk: Optional[int] = 1
    seed: int = 0

    def validate(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown ground truth {unknown}; choose from {list(KINDS)}")
        if self.lds_seeds < 1:
            raise ValueError(f"lds_seeds={self.lds_seeds}: retrain each LDS subset with at least 1 seed")


def spread(n: int, k: Optional[int]) -> np.ndarray:
    """k indices spread evenly over 0..n-1 (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max(1, int(k)))).astype(np.int64))


def _take(arrays: dict, idx) -> dict:
    return {k: np.asarray(v)[idx] for k, v in arrays.items()}


def _key(kind: str, config: GroundTruthConfig, qidx: np.ndarray) -> str:
    """The settings a cached ground truth depends on, as a file-name part (other settings: other files)."""
    q = f"q{len(qidx)}"
    if kind == "trajectory":
        return q
    if kind == "loo":
        return f"{q}_r{config.loo_rows}"
    strat = "_g" if config.lds_stratify else ""
    if kind == "lds":
        return f"m{config.lds_subsets}_a{config.lds_fraction:g}{strat}_s{config.seed}_n{config.lds_seeds}"
    if kind == "lds_masked":
        return f"m{config.lds_subsets}_a{config.lds_fraction:g}{strat}_s{config.seed}"
    return f"{q}_r{config.pbrf_rows}_e{config.pbrf_eps:g}_l{config.pbrf_damping:g}_i{config.pbrf_iters}"


def replay(fns, adapters: Any, train_arrays: dict, config: training.TrainConfig, finetune_dir: str,
           mesh=None) -> WeightedRun:
    """The fine-tuning run in `finetune_dir` as a `WeightedRun`: its initial adapters are that run's checkpoint 0,
    with the same data, `config` (order, schedule, keys) and, optionally, device mesh; `adapters` gives the tree
    structure to restore into."""
    abstract = {"trainable": adapters, "opt_state": training.make_optimizer(
        config, config.total_steps(int(np.shape(train_arrays["input_ids"])[0]))).init(adapters)}
    init = training.restore_checkpoint(finetune_dir, abstract, step=0)[1]["trainable"]
    return WeightedRun(fns, init, train_arrays, config, mesh=mesh)


def subset_masks(config: GroundTruthConfig, groups) -> np.ndarray:
    """The LDS subsets [M, N] of `config` (shared by lds and lds_masked)."""
    if config.lds_stratify:
        return stratified_masks(groups, config.lds_subsets, config.lds_fraction, config.seed)
    return lds_masks(len(groups), config.lds_subsets, config.lds_fraction, config.seed)


def compute(run: WeightedRun, adapters: Any, queries: dict, config: GroundTruthConfig, directory: str, *,
            groups=None, config_for=None, init_for=None) -> dict:
    """{kind: ground truth} for each kind of `config`, cached in `directory` (<kind>.npz), resumable.

    Score kinds hold "scores" [Q', N'] with the indices "queries" [Q'] and "rows" [N'] they refer to; LDS kinds
    hold "masks" [M, N] and "losses" [M, Q] ("lds" also "seed_losses" [S, M, Q], one slice per seed). Each holds
    "seconds" (wall time of its computation). Cache files are named by the sizes they depend on (`_key`); the
    directory must belong to one fine-tuning run. `groups` [N]: the training rows' groups (stratified subsets);
    `config_for(n_rows, seed) -> TrainConfig` and `init_for(seed) -> adapters`: the fine-tuning a user would run,
    needed by "lds" (`retrain.retrain_subsets`).
    """
    config.validate()
    os.makedirs(directory, exist_ok=True)
    n, q = run.n_rows, int(np.asarray(queries["input_ids"]).shape[0])
    qidx = spread(q, config.max_queries)
    out = {}
    for kind in config.kinds:
        path = os.path.join(directory, f"{kind}_{_key(kind, config, qidx)}.npz")
        if not os.path.exists(path):
            start = time.perf_counter()
            if kind == "trajectory":
                with progress.stage(f"trajectory influence ({len(qidx)} queries x {n} rows: a forward pass, then "
                                    "the adjoint backwards through every step)"):
                    forward = forward_states(run)
                    scores = trajectory_influence(run, _take(queries, qidx), query_chunk=config.query_chunk,
                                                  forward=forward)
                res = {"scores": scores, "queries": qidx, "rows": np.arange(n),
                       "replay_error": _max_difference(forward[0], adapters)}
            elif kind == "loo":
                rows = spread(n, config.loo_rows)
                weights = np.ones((len(rows) + 1, n))
                weights[np.arange(1, len(rows) + 1), rows] = 0.0
                losses = retrain_losses(run, weights, _take(queries, qidx), chunk=config.retrain_chunk,
                                        cache=path[:-4] + "_retrains.npz", desc="leave-one-out")
                res = {"scores": (losses[1:] - losses[:1]).T, "queries": qidx, "rows": rows}
            elif kind == "lds_masked":
                masks = subset_masks(config, np.zeros(n) if groups is None else groups)
                losses = retrain_losses(run, masks, queries, chunk=config.retrain_chunk,
                                        cache=path[:-4] + "_subsets.npz", desc="LDS subsets (masked replays)")
                res = {"masks": masks, "losses": losses}
            elif kind == "lds":
                if config_for is None or init_for is None:
                    raise ValueError("ground truth 'lds' retrains from scratch: pass config_for and init_for "
                                     "(or use 'lds_masked', the weight-0 replays of this run)")
                masks = subset_masks(config, np.zeros(n) if groups is None else groups)
                seeds = [config.seed + s for s in range(config.lds_seeds)]
                per_seed = retrain_subsets(run, masks, queries, seeds, config_for, init_for,
                                           cache=path[:-4] + "_retrains.npz",
                                           desc=f"LDS retrains ({len(masks)} subsets x {len(seeds)} seeds)")
                res = {"masks": masks, "losses": per_seed.mean(0), "seed_losses": per_seed, "seeds": seeds}
            else:  # pbrf
                rows = spread(n, config.pbrf_rows)
                pb = pbrf_scores(run.fns, adapters, run.data, _take(queries, qidx), rows, eps=config.pbrf_eps,
                                 damping=config.pbrf_damping, iters=config.pbrf_iters)
                res = {"scores": pb["scores"], "grad_norm": pb["grad_norm"], "grad_norm_0": pb["grad_norm_0"],
                       "tol": config.pbrf_tol, "queries": qidx, "rows": rows}
            res["seconds"] = time.perf_counter() - start
            write_npz(path, **res)
        with np.load(path) as saved:
            out[kind] = {k: saved[k] for k in saved.files}
        if kind == "pbrf" and not pbrf_converged(out[kind]):
            progress.warn(f"PBRF did not converge: final gradient norm up to {_pbrf_relative(out[kind]).max():.3g} "
                          f"of the initial one (tolerance {config.pbrf_tol:g}) after {config.pbrf_iters} L-BFGS "
                          "steps; raise gt_pbrf_iters, eps or damping; its rows are flagged converged=false")
    return out


def _pbrf_relative(truth: dict) -> np.ndarray:
    g, g0 = np.asarray(truth["grad_norm"], np.float64), np.asarray(truth.get("grad_norm_0", np.nan), np.float64)
    return g / np.maximum(g0, np.finfo(np.float64).tiny)


def pbrf_converged(truth: dict) -> bool:
    """Whether every PBRF solve ended with ||grad|| <= tol x its initial ||grad|| (False when not recorded)."""
    if "grad_norm_0" not in truth:
        return False
    return bool(np.all(_pbrf_relative(truth) <= float(truth["tol"])))


def _max_difference(a: Any, b: Any) -> float:
    return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def truth_queries(kind: str, truth: dict, n_queries: int) -> np.ndarray:
    """The test rows a ground truth covers: all for the LDS kinds (a retrain's loss on every test row), else its
    "queries"."""
    return np.arange(n_queries) if kind in LDS_KINDS else np.asarray(truth["queries"], np.int64)


def common_queries(kind: str, truth: dict, score_matrices) -> np.ndarray:
    """The queries on which every one of `score_matrices` ([Q, N] each; NaN = not computed, as the ground truths
    scored as methods are outside their queries) and the ground truth are defined: one agreement table, one set
    of queries."""
    mats = [np.asarray(s, np.float64) for s in score_matrices]
    q = truth_queries(kind, truth, mats[0].shape[0])
    rows = slice(None) if kind in LDS_KINDS else np.asarray(truth["rows"], np.int64)
    ok = np.ones(len(q), bool)
    for s in mats:
        finite = np.isfinite(s[q][:, rows])
        ok &= finite.all(axis=1) if kind in LDS_KINDS else finite.any(axis=1)  # LDS sums a whole score row
    return q[ok]


def _score_truth_rows(s: np.ndarray, t: dict, queries: np.ndarray):
    """(method rows [Q', N'], truth rows [Q', N']) on `queries` (a subset of the truth's) and its rows."""
    pos = {int(i): j for j, i in enumerate(np.asarray(t["queries"]))}
    ref = np.asarray(t["scores"], np.float64)[[pos[int(i)] for i in queries]]
    return s[np.ix_(queries, np.asarray(t["rows"], np.int64))], ref


def agreement_with(scores: np.ndarray, truths: dict, *, n_boot: int = 1000, seed: int = 0,
                   queries: Optional[dict] = None) -> dict:
    """{kind: {"value", "ci", "n_queries", "per_query", "queries"}} of a method's score matrix [Q, N] against each
    ground truth: LDS for the LDS kinds, and for the others the mean per-query Spearman over the rows where both
    are finite (NaN marks entries a ground truth, used as a method via `as_method_scores`, did not compute).
    `queries` {kind: test rows}: score every method on the same ones (`common_queries`); default: the rows the
    ground truth covers where this method's scores are finite."""
    s = np.asarray(scores, np.float64)
    out = {}
    for kind, t in truths.items():
        q = common_queries(kind, t, [s]) if queries is None or kind not in queries else np.asarray(queries[kind])
        if kind in LDS_KINDS:
            res = agreement.lds(s[q], t["masks"], t["losses"][:, q], n_boot=n_boot, seed=seed)
        else:
            sub, ref = _score_truth_rows(s, t, q)
            both = np.isfinite(sub) & np.isfinite(ref)
            per_query = np.array([agreement._spearman(a[m], b[m]) if m.sum() > 2 else np.nan
                                  for a, b, m in zip(sub, ref, both)])
            res = agreement._summary(per_query, n_boot, seed)
        res["queries"] = [int(i) for i in q]
        out[kind] = res
    return out


def paired(scores: dict, truths: dict, queries: dict, *, against=("grad_dot", "exact"), n_boot: int = 1000,
           seed: int = 0) -> dict:
    """{kind: {method: {"vs_<b>": paired difference}}}: each method's agreement minus that of each method in
    `against` (when it was scored), on the same queries `queries[kind]` (and, for LDS, the same subsets):
    `agreement.paired_lds` (two-way bootstrap over subsets and queries) or `agreement.paired_rank`."""
    out = {}
    for kind, t in truths.items():
        q = np.asarray(queries[kind], np.int64)
        table = {}
        for name, s in scores.items():
            s = np.asarray(s, np.float64)
            entry = {}
            for b in against:
                if b == name or b not in scores:
                    continue
                sb = np.asarray(scores[b], np.float64)
                if kind in LDS_KINDS:
                    d = agreement.paired_lds(s[q], sb[q], t["masks"], t["losses"][:, q], n_boot=n_boot, seed=seed)
                else:
                    (a_rows, ref), (b_rows, _) = _score_truth_rows(s, t, q), _score_truth_rows(sb, t, q)
                    d = agreement.paired_rank(a_rows, b_rows, ref, n_boot=n_boot, seed=seed)
                entry[f"vs_{b}"] = d
            if entry:
                table[name] = entry
        out[kind] = table
    return out


def as_method_scores(kind: str, truth: dict, n_queries: int, n_rows: int) -> Optional[np.ndarray]:
    """A score ground truth as a full [Q, N] matrix (NaN outside its queries and rows), or None for LDS kinds."""
    if kind in LDS_KINDS:
        return None
    full = np.full((n_queries, n_rows), np.nan)
    full[np.ix_(truth["queries"], truth["rows"])] = truth["scores"]
    return full


def summary(truths: dict) -> dict:
    """JSON-able facts about each ground truth (sizes, seconds, checks)."""
    out = {}
    for kind, t in truths.items():
        d = {"seconds": float(t["seconds"])}
        if kind in LDS_KINDS:
            d.update(subsets=int(t["masks"].shape[0]), fraction=float(t["masks"].mean()),
                     retrain="from scratch on the kept rows" if kind == "lds" else
                     "weight-0 replay of the fine-tuning run (trajectory-conditional)")
            if "seed_losses" in t:
                sl = np.asarray(t["seed_losses"], np.float64)
                d["seeds"] = [int(s) for s in t["seeds"]]
                if sl.shape[0] >= 2:  # how alike two seeds' retrains rank the subsets, per query (seed noise)
                    d["seed_to_seed_spearman"] = float(np.nanmean(
                        agreement.row_spearman(-sl[0].T, -sl[1].T)))
        else:
            d.update(queries=[int(i) for i in t["queries"]], rows=int(len(t["rows"])))
        if "replay_error" in t:
            d["replay_error"] = float(t["replay_error"])
        if "grad_norm" in t:
            d["max_grad_norm"] = float(np.max(t["grad_norm"])) if t["grad_norm"].size else 0.0
        if kind == "pbrf":
            d["converged"] = pbrf_converged(t)
            if "grad_norm_0" in t and t["grad_norm"].size:
                d["max_relative_grad_norm"] = float(_pbrf_relative(t).max())
        out[kind] = d
    return json.loads(json.dumps(out))
