"""Cheap spectral estimates of a curvature operator: power iteration and traces."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec
from jaxinf.curvature.operators import FISHER, CurvatureOperator


def power_iteration_flat(matvec: Callable, x0: jax.Array, num_iters: int) -> jax.Array:
    """Estimate max_i |lambda_i(A)| by power iteration x <- A x / ||A x|| (traceable;
    num_iters may be a traced integer).

    Returns ||A x_k|| for the final unit vector x_k; it converges to the largest
    eigenvalue magnitude from below (for symmetric A).
    """
    x = x0 / jnp.linalg.norm(x0)

    def body(_, carry):
        x, _ = carry
        y = matvec(x)
        ny = jnp.linalg.norm(y)
        return jnp.where(ny > 0, y / jnp.where(ny > 0, ny, 1.0), x), ny

    _, est = jax.lax.fori_loop(0, num_iters, body, (x, jnp.zeros((), x.dtype)))
    return est


def _flat_batch_matvec(op: CurvatureOperator, index):
    spec = TreeSpec.of(op.params)
    if index is None:
        return lambda x: spec.ravel(op.matvec(spec.unravel(x)))
    return lambda x: spec.ravel(op.batch_matvec(spec.unravel(x), index))


def largest_eigenvalue(
    op: CurvatureOperator, key: jax.Array, num_iters: int = 20, per_batch: bool = False
) -> jax.Array:
    """Power-iteration estimate of max |eigenvalue| of C (or, per_batch=True, max over b of C_b).

    max_b lambda_max(C_b) >= lambda_max(C), which is the safe bound for
    stochastic recursions (LiSSA) that apply one C_b per step.  num_iters is
    traced (no recompilation when it changes).  Jitted.
    """
    return _largest_eigenvalue(op, key, num_iters, bool(per_batch))


@functools.partial(jax.jit, static_argnums=3)
def _largest_eigenvalue(op, key, num_iters, per_batch):
    spec = TreeSpec.of(op.params)
    x0 = jax.random.normal(key, (spec.size,), spec.dtype)
    if not per_batch:
        return power_iteration_flat(_flat_batch_matvec(op, None), x0, num_iters)
    ests = jax.lax.map(
        lambda b: power_iteration_flat(_flat_batch_matvec(op, b), x0, num_iters),
        jnp.arange(op.num_batches),
    )
    return jnp.max(ests)


def hutchinson_trace(op: CurvatureOperator, key: jax.Array, num_probes: int = 16) -> jax.Array:
    """Unbiased trace estimate tr(C) ~ (1/K) sum_k z_k^T C z_k with Rademacher z_k (jitted)."""
    return _hutchinson_trace(op, key, int(num_probes))


@functools.partial(jax.jit, static_argnums=2)
def _hutchinson_trace(op, key, num_probes):
    spec = TreeSpec.of(op.params)
    mv = _flat_batch_matvec(op, None)
    zs = jax.random.rademacher(key, (num_probes, spec.size), spec.dtype)
    quad = jax.lax.map(lambda z: jnp.vdot(z, mv(z)), zs)
    return jnp.mean(quad)


def gradient_trace(grads):
    """tr(G^T G / N) = (1/N) sum_i ||g_i||^2, the trace of the empirical Fisher of N per-example gradients: a matrix
    [N, d] or a stacked pytree (leaves [N, ...]), numpy or jax, computed in their dtype (numpy stays numpy). The
    package's one formula for it (`fisher_trace`, the study's cached-gradient trace, the per-block damping)."""
    sq = sum((x * x).reshape(x.shape[0], -1).sum(axis=1) for x in jax.tree.leaves(grads))  # ||g_i||^2 [N]
    return sq.mean()


def fisher_trace(op: CurvatureOperator) -> jax.Array:
    """Exact tr(F) = (1/N) sum_i ||g_i||^2 of a 'fisher' operator, one batch of gradients at a time (jitted)."""
    if op.kind != FISHER:
        raise ValueError(f"fisher_trace needs a 'fisher' operator, got {op.kind!r}")
    return _fisher_trace(op)


@jax.jit
def _fisher_trace(op):
    (per_example_loss_fn,) = op.fns

    def one(batch):
        return gradient_trace(jax.jacrev(per_example_loss_fn)(op.params, batch))  # leaves [m, *leaf]

    return jnp.mean(jax.lax.map(one, op.batches))
