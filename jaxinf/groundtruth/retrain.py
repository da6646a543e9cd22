"""Counterfactual retraining: leave-one-out and LDS subsets, with the scanned trainer of `trajectory.WeightedRun`.

A retrain is the same run with 0/1 row weights: removed rows keep their batch slots, masked by weight 0, so every
kept row is seen at the same steps, in the same slots and with the same dropout keys as in the full run, and the
step still divides by the batch size B (see `jaxinf.training.weighted_step`). With chunk = 1 a retrain is the
trajectory's own forward program (`_forward_states`, already compiled when trajectory influence ran first) and a
query-loss pass; chunk > 1 vmaps one compiled training loop over the weight vectors. Retrains are cached:
`cache` (an .npz path) holds the weight vectors and query losses done so far, so an interrupted computation
resumes where it stopped.

Leave-one-out: loo(q, n) = L_q(theta(1 - e_n)) - L_q(theta(1)), larger = removing n hurts q more = n helps q
(the library's sign). LDS subsets: M masks, each keeping round(alpha N) rows drawn without replacement
(`lds_masks`, seeded by numpy's default_rng([seed, m])), or round(alpha N_g) rows of each group g
(`stratified_masks`: the group counts of every subset are fixed, so its outcome cannot be read off the labels).

Those weight-0 retrains are trajectory-conditional (`lds_masked`): the derivative of that function is trajectory
influence. `retrain_subsets` instead retrains each subset from scratch as a user would: training on the kept rows
only, with the data order, batch size and step count the fine-tuning's rule gives for that many rows
(`jaxinf.study.finetune_config`), new adapters from the seed's initialisation, once per seed; its query losses,
averaged over seeds, are the estimand of Park et al. (2023) and of kronfluence's LDS.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import progress, training
from jaxinf.workdir import write_npz
from jaxinf.groundtruth.trajectory import WeightedRun, _forward_states, _query_losses


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _batched_query_losses(fns, config, total_steps, mesh, base, init, arrays, order, seed, weights, stop, queries):
    return jax.vmap(lambda w: _query_losses(fns, config, total_steps, mesh, base, init, arrays, order, seed, w,
                                            stop, queries))(weights)


@functools.partial(jax.jit, static_argnums=(0,))
def _losses_at(fns, base, theta, queries):
    return fns.with_base(base).per_example_loss(theta, queries)


def _queries(queries: dict) -> dict:
    return {k: jnp.asarray(np.asarray(queries[k])) for k in training.BATCH_KEYS}


def retrain_losses(run: WeightedRun, weights: np.ndarray, queries: dict, *, chunk: int = 1,
                   cache: Optional[str] = None, desc: str = "retrain") -> np.ndarray:
    """Query losses [M, Q] after retraining with each row-weight vector weights[m] [N] (cached, resumable).

    `chunk` weight vectors are trained at once (vmap); the last chunk is padded by repeating its final vector.
    """
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[1] != run.n_rows:
        raise ValueError(f"weights must be [M, {run.n_rows}] (one weight per training row), got {weights.shape}")
    m, chunk = weights.shape[0], max(1, int(chunk))
    done = np.zeros((0, int(queries["input_ids"].shape[0])))
    if cache and os.path.exists(cache):
        saved = np.load(cache)
        k = saved["losses"].shape[0]
        if saved["weights"].shape[1] != run.n_rows or not np.array_equal(saved["weights"][:k], weights[:k]):
            raise ValueError(f"{cache} holds retrains of other weight vectors: delete it or use a new workdir")
        done = saved["losses"][:m]
    q = run.place(_queries(queries))
    dtype = run.default_weights().dtype
    static, (base, init, arrays, order, seed, _, stop) = run._static(), run._dynamic(None)
    out = [done]
    with progress.stage(desc, total=m, initial=done.shape[0], unit="run") as bar:
        for start in range(done.shape[0], m, chunk):
            part = weights[start:start + chunk]
            if chunk == 1:
                final, _ = _forward_states(*static, base, init, arrays, order, seed,
                                           run.place(jnp.asarray(part[0], dtype)))
                losses = np.asarray(_losses_at(static[0], base, final, q), np.float64)[None]
            else:
                padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)], 0)
                losses = np.asarray(_batched_query_losses(*static, base, init, arrays, order, seed,
                                                          run.place(jnp.asarray(padded, dtype)), stop, q),
                                    np.float64)[:len(part)]
            out.append(losses)
            bar.update(len(part))
            if cache:
                _save(cache, weights[:start + len(part)], np.concatenate(out, 0))
    return np.concatenate(out, 0)


def _save(path: str, weights: np.ndarray, losses: np.ndarray) -> None:
    write_npz(path, weights=weights, losses=losses)


def loo_scores(run: WeightedRun, queries: dict, rows: Sequence[int], *, chunk: int = 1,
               cache: Optional[str] = None) -> np.ndarray:
    """Leave-one-out [Q, len(rows)]: L_q(without row n) - L_q(full run), for n in `rows` (larger = n helps q)."""
    rows = np.asarray(rows, np.int64)
    weights = np.ones((len(rows) + 1, run.n_rows))
    weights[np.arange(1, len(rows) + 1), rows] = 0.0  # row 0: the full run
    losses = retrain_losses(run, weights, queries, chunk=chunk, cache=cache, desc="leave-one-out")
    return (losses[1:] - losses[:1]).T


def stratified_masks(groups, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """[M, N] 0/1 masks keeping round(fraction * N_g) rows (at least 1) of every group g; mask m, group g drawn from
    default_rng([seed, m, j]) for the j-th group in sorted order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"LDS subset fraction must lie in (0, 1), got {fraction}")
    groups = np.asarray(groups)
    masks = np.zeros((num_subsets, groups.size))
    for m in range(num_subsets):
        for j, g in enumerate(sorted(set(groups.tolist()))):
            idx = np.flatnonzero(groups == g)
            keep = max(1, int(round(fraction * idx.size)))
            masks[m, np.random.default_rng([seed, m, j]).choice(idx, keep, replace=False)] = 1.0
    return masks


def subset_run(run: WeightedRun, rows, config: training.TrainConfig, init: Any) -> WeightedRun:
    """The run a user would make on training rows `rows` only: their data, `config` (its own order, batch size,
    steps and seed) and initial adapters `init`."""
    rows = np.asarray(rows, np.int64)
    return WeightedRun(run.fns, init, {k: np.asarray(v)[rows] for k, v in run.data.items()}, config, mesh=run.mesh)


def retrain_subsets(run: WeightedRun, masks: np.ndarray, queries: dict, seeds: Sequence[int], config_for,
                    init_for, *, cache: Optional[str] = None, desc: str = "LDS retrains") -> np.ndarray:
    """Query losses [S, M, Q] of every subset m retrained from scratch with every seed s (cached, resumable).

    config_for(n_rows, seed) -> TrainConfig and init_for(seed) -> initial adapters give the fine-tuning a user
    would run on n_rows rows with that seed (the study passes `study.finetune_config` and the adapters'
    initialisation, so the retrain with the study's seed on all rows is the study's own fine-tuning). Retrains of
    one seed and subset size share one compiled program. `cache` (.npz) holds the masks, seeds and losses done so
    far, in order seed-major; a cache of other masks or seeds is refused.
    """
    masks, seeds = np.asarray(masks, np.float64), [int(s) for s in seeds]
    if masks.ndim != 2 or masks.shape[1] != run.n_rows:
        raise ValueError(f"masks must be [M, {run.n_rows}] (one 0/1 entry per training row), got {masks.shape}")
    m, nq = masks.shape[0], int(queries["input_ids"].shape[0])
    done = np.zeros((0, nq))
    if cache and os.path.exists(cache):
        saved = np.load(cache)
        if not (np.array_equal(saved["masks"], masks) and list(saved["seeds"]) == seeds):
            raise ValueError(f"{cache} holds retrains of other subsets or seeds: delete it or use a new workdir")
        done = saved["losses"]
    q = _queries(queries)
    out = [done]
    total = len(seeds) * m
    with progress.stage(desc, total=total, initial=done.shape[0], unit="retrain") as bar:
        for k in range(done.shape[0], total):
            seed, mask = seeds[k // m], masks[k % m]
            rows = np.flatnonzero(mask > 0)
            sub = subset_run(run, rows, config_for(len(rows), seed), init_for(seed))
            final = sub.final()
            out.append(np.asarray(_losses_at(run.fns, sub._base, final, sub.place(q)),
                                  np.float64)[None])
            bar.update(1)
            if cache:
                write_npz(cache, masks=masks, seeds=np.asarray(seeds), losses=np.concatenate(out, 0))
    return np.concatenate(out, 0).reshape(len(seeds), m, nq)


def lds_masks(n_rows: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """[M, N] 0/1 masks, each keeping round(fraction * N) rows (at least 1), mask m from default_rng([seed, m])."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"LDS subset fraction must lie in (0, 1), got {fraction}")
    keep = max(1, int(round(fraction * n_rows)))
    masks = np.zeros((num_subsets, n_rows))
    for m in range(num_subsets):
        masks[m, np.random.default_rng([seed, m]).choice(n_rows, keep, replace=False)] = 1.0
    return masks
