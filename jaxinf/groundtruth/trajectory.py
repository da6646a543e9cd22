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
memory at the scan carry per step (adapters + AdamW moments) plus one step's residuals. With a device `mesh`
(`jaxinf.sharding`) every replayed micro-batch is split over its data axis, as in `training.train`, and the base
weights are FSDP-sharded over its model axis: the same numbers up to summation order (tests/test_sharding.py).

Trajectory influence of row n on query q at step t is

    score_t(q, n) = - d L_q(theta_t(w)) / d w_n   at w = 1,

the exact derivative of the procedure that produced the model (no quadratic model, no inverse). Sign: larger =
up-weighting row n lowers the query loss more = the row helps the query more (the library's convention; up to
the positive factor B it is the first-order effect of training on row n once more wherever it was used).

Two exact ways to compute it (equal to float rounding; tests/test_groundtruth.py checks both against central
differences of whole runs):

- `method="adjoint"` (default): one forward scan that keeps every step's state (adapters, AdamW moments,
  gradient), then the chain rule backwards, one jitted step at a time. Step s maps
  (theta_s, opt_s) -> U(theta_s, opt_s, g_s) with g_s = grad_theta L_w(theta_s) the weighted batch gradient. With
  adjoints (a_theta, a_opt) of step s+1's state: (a_theta', a_opt', a_g) = U's VJP (elementwise optimiser maths,
  `jax.vjp`); the model enters only through g_s, whose Jacobian in theta is the Hessian H_s of the weighted batch
  loss (symmetric, so its VJP is the forward-over-reverse product H_s a_g) and whose derivative in w_b is
  grad L_b / B (so a_w[b] += <a_g, grad L_b> / B, one forward-mode `jvp` of the slot losses along a_g). Both
  come from one `jvp` of (g_s, slot losses) along a_g, vmapped over the queries (the primal pass is shared).
  Memory: S states of the adapters' size. Compiling it costs about what compiling one HVP costs.
- `method="autodiff"`: `jax.jacrev` of the query losses through the `lax.scan` of the run (reverse over reverse,
  `jax.checkpoint` per step). The same numbers, but XLA compiles the second-order reverse of a whole transformer
  step: minutes for SmolLM2-135M on a 2-core CPU, against seconds for the adjoint.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf import progress, sharding, training
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
    mesh: Any = None  # jaxinf.sharding mesh: each micro-batch split over `data`, base weights over `model`

    @functools.cached_property
    def n_rows(self) -> int:
        return int(self.data["input_ids"].shape[0])

    @functools.cached_property
    def total_steps(self) -> int:
        self.config.validate(self.n_rows)
        if self.mesh is not None:
            sharding.check_divisible(self.config.batch_size // self.config.grad_accum, self.mesh,
                                     "the micro-batch size (batch_size / grad_accum) of the replayed run")
        return self.config.total_steps(self.n_rows)

    @functools.cached_property
    def order(self) -> np.ndarray:
        return training.data_order(self.config, self.n_rows)

    @functools.cached_property
    def _arrays(self) -> dict:  # the whole training set (replicated on a mesh: each step gathers and splits its batch)
        return self.place({k: jnp.asarray(np.asarray(self.data[k])) for k in training.BATCH_KEYS})

    @functools.cached_property
    def _base(self):
        return sharding.shard_params(self.fns.model.params, self.mesh)

    def place(self, tree):
        """`tree` replicated over the mesh; unchanged without one (the single-device path as it always was)."""
        return tree if self.mesh is None else sharding.replicate(tree, self.mesh)

    def default_weights(self) -> jax.Array:
        return jnp.ones((self.n_rows,), jax.tree.leaves(self.init)[0].dtype)

    def final(self, weights: Optional[jax.Array] = None, steps: Optional[int] = None) -> Any:
        """Adapters after `steps` optimiser steps (default: all) of the run with row weights `weights` [N]."""
        return _run_jit(*self._static(), *self._dynamic(weights, steps))

    def query_losses(self, weights: jax.Array, queries: dict, steps: Optional[int] = None) -> jax.Array:
        """Per-example losses [Q] of the query rows (no dropout) at the adapters `final(weights, steps)`."""
        return _query_losses(*self._static(), *self._dynamic(weights, steps), queries)

    def _static(self):
        """Compile-time arguments: the config with seed 0, since the seed enters as an array (`_dynamic`)."""
        return self.fns, dataclasses.replace(self.config, seed=0), self.total_steps, self.mesh

    def _dynamic(self, weights, steps=None):
        """The arguments that enter compiled code as arrays (frozen base weights included: never constants)."""
        weights = self.default_weights() if weights is None else weights
        chex.assert_shape(weights, (self.n_rows,))
        steps = self.total_steps if steps is None else int(steps)
        if not 0 <= steps <= self.total_steps:
            raise ValueError(f"steps={steps} outside 0..{self.total_steps} of this run")
        if not 0 <= int(self.config.seed) < 2**32:  # it enters compiled code as a uint32 array
            raise ValueError(f"TrainConfig.seed={self.config.seed} must lie in [0, 2**32) for a replayed run")
        init, order, seed, weights = self.place((self.init, jnp.asarray(self.order),
                                                 jnp.asarray(self.config.seed, jnp.uint32), weights))
        return self._base, init, self._arrays, order, seed, weights, jnp.asarray(steps, jnp.int32)


def _run(fns, config, total_steps, mesh, base, init, arrays, order, seed, weights, stop):
    """Adapters after the first `stop` (traced) of `total_steps` steps: later steps are computed but not applied,
    so every intermediate step shares one compiled program. `seed` (traced) keys the dropout; `config` is the
    run's config with seed 0 (`WeightedRun._static`), so runs that differ only in their seed share the program."""
    optimizer = training.make_optimizer(config, total_steps, eps_root=EPS_ROOT)
    step_fn = jax.checkpoint(training.weighted_step(fns, optimizer, config.grad_accum, mesh))

    def body(carry, inputs):
        s, idx = inputs
        batch = {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()}
        new = step_fn(base, *carry, batch, weights[idx], training.step_rng(seed, s))[:2]
        return jax.tree.map(lambda a, b: jnp.where(s < stop, a, b), new, carry), None

    (final, _), _ = jax.lax.scan(body, (init, optimizer.init(init)), (jnp.arange(total_steps), order))
    return final


_run_jit = jax.jit(_run, static_argnums=(0, 1, 2, 3))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _query_losses(fns, config, total_steps, mesh, base, init, arrays, order, seed, weights, stop, queries):
    final = _run(fns, config, total_steps, mesh, base, init, arrays, order, seed, weights, stop)
    return fns.with_base(base).per_example_loss(final, queries)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _query_jacobian(fns, config, total_steps, mesh, base, init, arrays, order, seed, weights, stop, queries):
    """d L_q / d w, [Q, N]: one forward scan, Q reverse passes (vmapped)."""
    return jax.jacrev(lambda w: _query_losses(fns, config, total_steps, mesh, base, init, arrays, order, seed, w,
                                              stop, queries))(weights)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _forward_states(fns, config, total_steps, mesh, base, init, arrays, order, seed, weights):
    """(final adapters, states) of the run: states = (theta_s, opt_s, g_s) stacked over s < S (before step s)."""
    optimizer = training.make_optimizer(config, total_steps, eps_root=EPS_ROOT)
    step_fn = training.weighted_step(fns, optimizer, config.grad_accum, mesh)

    def body(carry, inputs):
        s, idx = inputs
        batch = {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()}
        theta, opt = carry
        new_theta, new_opt, _, grads, _ = step_fn(base, theta, opt, batch, weights[idx],
                                                   training.step_rng(seed, s))
        return (new_theta, new_opt), (theta, opt, grads)

    (final, _), states = jax.lax.scan(body, (init, optimizer.init(init)), (jnp.arange(total_steps), order))
    return final, states


def forward_states(run: WeightedRun):
    """(final adapters, states) of `run` at unit weights: states = (theta_s, opt_s, g_s) stacked over the steps
    s < S, each before step s (what the adjoint needs; S copies of the adapters' size, kept on the device)."""
    with progress.stage(f"trajectory: forward pass keeping the {run.total_steps} steps' states"):
        return jax.block_until_ready(_forward_states(*run._static(), *run._dynamic(None)[:-1]))


def _float_leaves(tree) -> list:
    """The differentiable (inexact) leaves of an optimiser state; step counters carry no derivative."""
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _adjoint_step(fns, config, total_steps, mesh, base, states, arrays, order, seed, weights, s, a_theta, a_opt,
                  a_w):
    """Adjoints of step s's input from those of its output, for a stack of Q queries (leading axis of a_theta, of
    every leaf of a_opt and of a_w [Q, N]); a_w gains d L_q / d w_n of the rows in step s's slots. The step's state,
    batch and key are taken inside, so a backward step is one dispatch with no host round-trip."""
    theta, opt, grads = jax.tree.map(lambda x: x[s], states)
    idx = order[s]
    batch = {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()}
    w_batch, rng = weights[idx], training.step_rng(seed, s)
    optimizer = training.make_optimizer(config, total_steps, eps_root=EPS_ROOT)
    leaves, treedef = jax.tree.flatten(opt)
    inexact = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def update(theta, floats, g):
        it = iter(floats)
        full = treedef.unflatten([next(it) if f else x for x, f in zip(leaves, inexact)])
        updates, new_opt = optimizer.update(g, full, theta)
        return optax.apply_updates(theta, updates), _float_leaves(new_opt)

    _, vjp = jax.vjp(update, theta, _float_leaves(opt), grads)
    a_theta_direct, a_floats, a_g = jax.vmap(vjp)((a_theta, a_opt))
    gradient = training.weighted_gradient(fns, config.grad_accum, mesh)

    def grad_and_slot_losses(th):
        _, g, slot_losses = gradient(base, th, batch, w_batch, rng)
        return g, slot_losses

    h_ag, d_slot = jax.vmap(lambda t: jax.jvp(grad_and_slot_losses, (theta,), (t,))[1])(a_g)
    a_w = a_w.at[:, idx].add((d_slot / w_batch.shape[0]).astype(a_w.dtype))
    return jax.tree.map(jnp.add, a_theta_direct, h_ag), a_floats, a_w


@functools.partial(jax.jit, static_argnums=(0,))
def _query_gradients(fns, base, theta, queries):
    """grad_theta L_q(theta) for each query row, stacked [Q, ...] (no dropout)."""
    return jax.jacrev(lambda p: fns.with_base(base).per_example_loss(p, queries))(theta)


def _adjoint(run: WeightedRun, queries: dict, stop: int, final, states, desc: str) -> np.ndarray:
    """d L_q(theta_stop) / d w [Q, N] by the chain rule backwards from step `stop` (see the module docstring)."""
    fns, config, total, mesh = run._static()
    base, _, arrays, order, seed, weights, _ = run._dynamic(None)
    theta = final if stop == total else jax.tree.map(lambda x: x[stop], states[0])
    a_theta = _query_gradients(fns, base, theta, queries)
    q = int(queries["input_ids"].shape[0])
    a_opt = sharding.replicate([jnp.zeros((q,) + x.shape[1:], x.dtype) for x in _float_leaves(states[1])], mesh)
    a_theta = sharding.replicate(a_theta, mesh)  # committed like the step's outputs: one compilation
    a_w = sharding.replicate(jnp.zeros((q, run.n_rows), jax.tree.leaves(a_theta)[0].dtype), mesh)
    with progress.stage(desc, total=stop, unit="step") as bar:
        for s in range(stop - 1, -1, -1):
            a_theta, a_opt, a_w = _adjoint_step(fns, config, total, mesh, base, states, arrays, order, seed,
                                                weights, jnp.asarray(s, jnp.int32), a_theta, a_opt, a_w)
            jax.block_until_ready(a_w)  # the bar counts finished steps, not dispatched ones (jit is asynchronous)
            bar.update(1)
    return np.asarray(a_w, np.float64)


def _chunks(queries: dict, chunk: int):
    q = int(queries["input_ids"].shape[0])
    for start in range(0, q, chunk):
        yield {k: jnp.asarray(np.asarray(queries[k])[start:start + chunk]) for k in training.BATCH_KEYS}


def trajectory_influence(run: WeightedRun, queries: dict, *, steps: Optional[int] = None,
                         query_chunk: Optional[int] = None, method: str = "adjoint", forward=None) -> np.ndarray:
    """score[q, n] = -d L_q(theta_steps(w)) / d w_n at w = 1, shape [Q, N] (float64 on the host).

    `steps` < total gives the derivative of the query loss at that intermediate step of the same run;
    `query_chunk` queries go through one backward pass at once (default: all); `method`: "adjoint" (default) or
    "autodiff" (see the module docstring: the same derivative, slower to compile); `forward`: the adjoint's
    `forward_states(run)` when already computed.
    """
    return trajectory_influence_steps(run, queries, [run.total_steps if steps is None else steps],
                                      query_chunk=query_chunk, method=method, forward=forward)[run.total_steps if steps is None
                                                                            else int(steps)]


def trajectory_influence_steps(run: WeightedRun, queries: dict, steps: Sequence[int], *,
                               query_chunk: Optional[int] = None, method: str = "adjoint",
                               forward=None) -> dict[int, np.ndarray]:
    """{t: trajectory influence at step t} for each t in `steps` (one forward scan shared by every t with the
    adjoint; one backward pass per step t and chunk of queries)."""
    if method not in ("adjoint", "autodiff"):
        raise ValueError(f"trajectory influence method {method!r}: choose 'adjoint' or 'autodiff'")
    q = int(queries["input_ids"].shape[0])
    chunk = q if not query_chunk else int(query_chunk)
    steps = [int(t) for t in steps]
    for t in steps:
        run._dynamic(None, t)  # validates 0 <= t <= total
    if q == 0:
        return {t: np.zeros((0, run.n_rows)) for t in steps}
    if method == "autodiff":
        w = run.default_weights()
        return {t: -np.concatenate([np.asarray(_query_jacobian(*run._static(), *run._dynamic(w, t), part))
                                    for part in _chunks(queries, chunk)], 0).astype(np.float64) for t in steps}
    final, states = forward_states(run) if forward is None else forward
    out = {}
    for t in steps:
        parts = [_adjoint(run, part, t, final, states, f"trajectory: backward from step {t}")
                 for part in _chunks(queries, chunk)]
        out[t] = -np.concatenate(parts, 0)
    return out
