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
(`lds_masks`, seeded by numpy's default_rng([seed, m])).
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import progress, training
from jaxinf.workdir import write_npz
from jaxinf.groundtruth.trajectory import WeightedRun, _forward_states, _query_losses


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _batched_query_losses(fns, config, total_steps, mesh, base, init, arrays, order, weights, stop, queries):
    return jax.vmap(lambda w: _query_losses(fns, config, total_steps, mesh, base, init, arrays, order, w, stop,
                                            queries))(weights)


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
    static, (base, init, arrays, order, _, stop) = run._static(), run._dynamic(None)
    out = [done]
    with progress.stage(desc, total=m, initial=done.shape[0], unit="run") as bar:
        for start in range(done.shape[0], m, chunk):
            part = weights[start:start + chunk]
            if chunk == 1:
                final, _ = _forward_states(*static, base, init, arrays, order, run.place(jnp.asarray(part[0], dtype)))
                losses = np.asarray(_losses_at(static[0], base, final, q), np.float64)[None]
            else:
                padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)], 0)
                losses = np.asarray(_batched_query_losses(*static, base, init, arrays, order,
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


def lds_masks(n_rows: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """[M, N] 0/1 masks, each keeping round(fraction * N) rows (at least 1), mask m from default_rng([seed, m])."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"LDS subset fraction must lie in (0, 1), got {fraction}")
    keep = max(1, int(round(fraction * n_rows)))
    masks = np.zeros((num_subsets, n_rows))
    for m in range(num_subsets):
        masks[m, np.random.default_rng([seed, m]).choice(n_rows, keep, replace=False)] = 1.0
    return masks
