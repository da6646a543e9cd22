"""The fine-tuning run as one differentiable function of per-row weights, and its exact derivative.

`WeightedRun` replays `jaxinf.training.train` as a single `lax.scan`: the same data order
(`training.data_order`), schedule and optimiser (`training.make_optimizer`: AdamW, weight decay, clipping), the
same dropout keys (`training.step_rng`, micro-batch i: fold_in(rng, i)), the same gradient accumulation, and the
same step (`training.weighted_step`). Every training row n carries a weight w_n (default 1); optimiser step s
minimises

    (1/B) sum_{b < B} w[order[s, b]] * L_{order[s, b]}(theta),

the mean over the B batch slots. So w = 1 reproduces `training.train`, and w_n = 0 masks row n's slots while
every other row is seen at the same steps, in the same slots, with the same dropout masks (this is the
convention used for leave-one-out and LDS retraining too). `jax.checkpoint` on the step keeps the reverse pass's
memory at the scan carry per step (adapters + AdamW moments) plus one step's residuals.

Trajectory influence of row n on query q at step t is

    score_t(q, n) = - d L_q(theta_t(w)) / d w_n   at w = 1,

the exact derivative of the procedure that produced the model (no quadratic model, no inverse). Sign: larger =
up-weighting row n lowers the query loss more = the row helps the query more (the library's convention; up to
the positive factor B it is the first-order effect of training on row n once more wherever it was used).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import training
from jaxinf.models.loss import LMFunctions


# Inside AdamW's square root: finite derivatives where the second moment is 0 (see training.make_optimizer).
EPS_ROOT = 1e-30


@dataclasses.dataclass(frozen=True, eq=False)
class WeightedRun:
    """A fine-tuning run (model functions, initial adapters, training arrays, TrainConfig) as a pure function.

    `data` holds `training.BATCH_KEYS` arrays [N, T]; `order` is `training.data_order(config, N)` [S, B].
    """

    fns: LMFunctions
    init: Any
    data: dict
    config: training.TrainConfig

    @functools.cached_property
    def n_rows(self) -> int:
        return int(self.data["input_ids"].shape[0])

    @functools.cached_property
    def total_steps(self) -> int:
        self.config.validate(self.n_rows)
        return self.config.total_steps(self.n_rows)

    @functools.cached_property
    def order(self) -> np.ndarray:
        return training.data_order(self.config, self.n_rows)

    @functools.cached_property
    def _arrays(self) -> dict:
        return {k: jnp.asarray(np.asarray(self.data[k])) for k in training.BATCH_KEYS}

    def default_weights(self) -> jax.Array:
        return jnp.ones((self.n_rows,), jax.tree.leaves(self.init)[0].dtype)

    def final(self, weights: Optional[jax.Array] = None, steps: Optional[int] = None) -> Any:
        """Adapters after `steps` optimiser steps (default: all) of the run with row weights `weights` [N]."""
        return _run_jit(*self._static(), *self._dynamic(weights, steps))

    def query_losses(self, weights: jax.Array, queries: dict, steps: Optional[int] = None) -> jax.Array:
        """Per-example losses [Q] of the query rows (no dropout) at the adapters `final(weights, steps)`."""
        return _query_losses(*self._static(), *self._dynamic(weights, steps), queries)

    def _static(self):
        return self.fns, self.config, self.total_steps

    def _dynamic(self, weights, steps=None):
        """The arguments that enter compiled code as arrays (frozen base weights included: never constants)."""
        weights = self.default_weights() if weights is None else weights
        chex.assert_shape(weights, (self.n_rows,))
        steps = self.total_steps if steps is None else int(steps)
        if not 0 <= steps <= self.total_steps:
            raise ValueError(f"steps={steps} outside 0..{self.total_steps} of this run")
        return (self.fns.model.params, self.init, self._arrays, jnp.asarray(self.order), weights,
                jnp.asarray(steps, jnp.int32))


def _run(fns, config, total_steps, base, init, arrays, order, weights, stop):
    """Adapters after the first `stop` (traced) of `total_steps` steps: later steps are computed but not applied,
    so every intermediate step shares one compiled program."""
    optimizer = training.make_optimizer(config, total_steps, eps_root=EPS_ROOT)
    step_fn = jax.checkpoint(training.weighted_step(fns, optimizer, config.grad_accum))

    def body(carry, inputs):
        s, idx = inputs
        batch = {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()}
        new = step_fn(base, *carry, batch, weights[idx], training.step_rng(config.seed, s))[:2]
        return jax.tree.map(lambda a, b: jnp.where(s < stop, a, b), new, carry), None

    (final, _), _ = jax.lax.scan(body, (init, optimizer.init(init)), (jnp.arange(total_steps), order))
    return final


_run_jit = jax.jit(_run, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _query_losses(fns, config, total_steps, base, init, arrays, order, weights, stop, queries):
    final = _run(fns, config, total_steps, base, init, arrays, order, weights, stop)
    return fns.with_base(base).per_example_loss(final, queries)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _query_jacobian(fns, config, total_steps, base, init, arrays, order, weights, stop, queries):
    """d L_q / d w, [Q, N]: one forward scan, Q reverse passes (vmapped)."""
    return jax.jacrev(lambda w: _query_losses(fns, config, total_steps, base, init, arrays, order, w, stop,
                                              queries))(weights)


def trajectory_influence(run: WeightedRun, queries: dict, *, steps: Optional[int] = None,
                         query_chunk: Optional[int] = None) -> np.ndarray:
    """score[q, n] = -d L_q(theta_steps(w)) / d w_n at w = 1, shape [Q, N] (float64 on the host).

    One forward scan and one (vmapped) reverse pass per chunk of `query_chunk` queries (default: all at once);
    `steps` < total gives the derivative of the query loss at that intermediate step of the same run.
    """
    q = int(queries["input_ids"].shape[0])
    chunk = q if not query_chunk else int(query_chunk)
    w = run.default_weights()
    if q == 0:
        return np.zeros((0, run.n_rows))
    out = []
    for start in range(0, q, chunk):
        part = {k: jnp.asarray(np.asarray(queries[k])[start:start + chunk]) for k in training.BATCH_KEYS}
        out.append(np.asarray(_query_jacobian(*run._static(), *run._dynamic(w, steps), part)))
    return -np.concatenate(out, 0).astype(np.float64)


def trajectory_influence_steps(run: WeightedRun, queries: dict, steps: Sequence[int], **kw) -> dict[int, np.ndarray]:
    """{t: trajectory influence at step t} for each t in `steps` (one reverse pass per step and query chunk)."""
    return {int(t): trajectory_influence(run, queries, steps=int(t), **kw) for t in steps}
