"""Ground truths for a study run, computed once, cached in a directory, and every method's agreement with them.

Kinds (all scores in the library's sign: larger = the training row helps the query more):
  trajectory  -d L_q(theta_S(w)) / d w_n at w = 1, the exact derivative of the real fine-tuning (all rows)
  loo         L_q(without n) - L_q(full), by retraining, for `loo_rows` rows spread evenly over the training set
  pbrf        minus the PBRF response (L_q(theta*(eps)) - L_q(theta_s)) / eps for `pbrf_rows` rows
  lds         query losses of runs retrained on `lds_subsets` random subsets of fraction `lds_fraction`
Trajectory, LOO and PBRF cost a backward pass or a solve per query (or row), so they use `max_queries` test rows
spread evenly over the test set (all when None); LDS retrains cost the same for any number of queries and use all.
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
from jaxinf.groundtruth.retrain import lds_masks, retrain_losses
from jaxinf.groundtruth.trajectory import WeightedRun, forward_states, trajectory_influence

KINDS = ("trajectory", "lds", "loo", "pbrf")


@dataclasses.dataclass(frozen=True)
class GroundTruthConfig:
    kinds: tuple[str, ...] = ()
    max_queries: Optional[int] = None
    lds_subsets: int = 8
    lds_fraction: float = 0.5
    loo_rows: Optional[int] = 8
    pbrf_rows: Optional[int] = 8
    pbrf_eps: float = 1e-2
    pbrf_damping: float = 1e-3  # absolute lambda (the study binary sets it relative to the Fisher's mean eigenvalue)
    pbrf_iters: int = 50
    retrain_chunk: int = 1
    query_chunk: Optional[int] = None
    seed: int = 0

    def validate(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown ground truth {unknown}; choose from {list(KINDS)}")


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
    if kind == "lds":
        return f"m{config.lds_subsets}_a{config.lds_fraction:g}_s{config.seed}"
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


def compute(run: WeightedRun, adapters: Any, queries: dict, config: GroundTruthConfig, directory: str) -> dict:
    """{kind: ground truth} for each kind of `config`, cached in `directory` (<kind>.npz), resumable.

    Score kinds hold "scores" [Q', N'] with the indices "queries" [Q'] and "rows" [N'] they refer to; "lds"
    holds "masks" [M, N] and "losses" [M, Q]. Each holds "seconds" (wall time of its computation). Cache files
    are named by the sizes they depend on (`_key`); the directory must belong to one fine-tuning run.
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
            elif kind == "lds":
                masks = lds_masks(n, config.lds_subsets, config.lds_fraction, config.seed)
                losses = retrain_losses(run, masks, queries, chunk=config.retrain_chunk,
                                        cache=path[:-4] + "_subsets.npz", desc="LDS subsets")
                res = {"masks": masks, "losses": losses}
            else:  # pbrf
                rows = spread(n, config.pbrf_rows)
                pb = pbrf_scores(run.fns, adapters, run.data, _take(queries, qidx), rows, eps=config.pbrf_eps,
                                 damping=config.pbrf_damping, iters=config.pbrf_iters)
                res = {"scores": pb["scores"], "grad_norm": pb["grad_norm"], "queries": qidx, "rows": rows}
            res["seconds"] = time.perf_counter() - start
            write_npz(path, **res)
        with np.load(path) as saved:
            out[kind] = {k: saved[k] for k in saved.files}
    return out


def _max_difference(a: Any, b: Any) -> float:
    return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def agreement_with(scores: np.ndarray, truths: dict, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """{kind: {"value", "ci", "per_query"}} of a method's score matrix [Q, N] against each ground truth: LDS for
    "lds" (over the queries whose scores are all finite), and for the others the mean per-query Spearman over
    the ground truth's queries and the rows where both are finite (NaN marks entries a ground truth, used as a
    method via `as_method_scores`, did not compute)."""
    s = np.asarray(scores, np.float64)
    out = {}
    for kind, t in truths.items():
        if kind == "lds":
            keep = np.all(np.isfinite(s), axis=1)
            res = agreement.lds(s[keep], t["masks"], t["losses"][:, keep], n_boot=n_boot, seed=seed)
        else:
            sub, ref = s[np.ix_(t["queries"], t["rows"])], np.asarray(t["scores"], np.float64)
            both = np.isfinite(sub) & np.isfinite(ref)
            per_query = np.array([agreement._spearman(a[m], b[m]) if m.sum() > 2 else np.nan
                                  for a, b, m in zip(sub, ref, both)])
            res = agreement._summary(per_query, n_boot, seed)
        out[kind] = res
    return out


def as_method_scores(kind: str, truth: dict, n_queries: int, n_rows: int) -> Optional[np.ndarray]:
    """A score ground truth as a full [Q, N] matrix (NaN outside its queries and rows), or None for "lds"."""
    if kind == "lds":
        return None
    full = np.full((n_queries, n_rows), np.nan)
    full[np.ix_(truth["queries"], truth["rows"])] = truth["scores"]
    return full


def summary(truths: dict) -> dict:
    """JSON-able facts about each ground truth (sizes, seconds, checks)."""
    out = {}
    for kind, t in truths.items():
        d = {"seconds": float(t["seconds"])}
        if kind == "lds":
            d.update(subsets=int(t["masks"].shape[0]), fraction=float(t["masks"].mean()))
        else:
            d.update(queries=[int(i) for i in t["queries"]], rows=int(len(t["rows"])))
        if "replay_error" in t:
            d["replay_error"] = float(t["replay_error"])
        if "grad_norm" in t:
            d["max_grad_norm"] = float(np.max(t["grad_norm"])) if t["grad_norm"].size else 0.0
        out[kind] = d
    return json.loads(json.dumps(out))
