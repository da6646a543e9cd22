"""Dense oracles: form curvature matrices explicitly for small parameter counts.

Flat coordinates are those of ``jax.flatten_util.ravel_pytree(params)``.
Meant for tests and error studies with n up to a few thousand parameters
(the matrix is n x n, built from n operator products or from Jacobians).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxinf.curvature.operators import CurvatureOperator

PyTree = Any


def dense_matrix(op: CurvatureOperator, chunk: int = 64, symmetrize: bool = True) -> jax.Array:
    """Materialise C as an [n, n] array by applying it to the n basis vectors.

    Column j is C e_j; ``symmetrize`` returns (M + M^T)/2 (C is symmetric, so
    this only removes rounding asymmetry).  ``chunk`` basis vectors are pushed
    through the operator at once (vmap inside ``lax.map``; padded to a multiple).
    Jitted.
    """
    return _dense_matrix(op, int(chunk), bool(symmetrize))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dense_matrix(op, chunk, symmetrize):
    flat, unravel = ravel_pytree(op.params)
    n = flat.shape[0]

    def column(e):
        return ravel_pytree(op.matvec(unravel(e)))[0]

    c = min(chunk, n)
    num_chunks = -(-n // c)
    eye = jnp.eye(num_chunks * c, n, dtype=flat.dtype).reshape(num_chunks, c, n)  # zero-padded
    rows = jax.lax.map(jax.vmap(column), eye).reshape(num_chunks * c, n)[:n]
    m = rows.T  # rows[j] = C e_j
    return 0.5 * (m + m.T) if symmetrize else m


def _mean_over(batches: list, fn: Callable) -> jax.Array:
    mats = [fn(b) for b in batches]
    return sum(mats[1:], mats[0]) / len(mats)


@functools.partial(jax.jit, static_argnums=0)
def _hessian_one(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: loss_fn(unravel(x), batch))(flat)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ggn_one(model_fn, output_loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    out_flat, out_unravel = ravel_pytree(model_fn(params, batch))
    jac = jax.jacfwd(lambda x: ravel_pytree(model_fn(unravel(x), batch))[0])(flat)  # [k, n]
    h_out = jax.hessian(lambda z: output_loss_fn(out_unravel(z), batch))(out_flat)  # [k, k]
    return jac.T @ h_out @ jac


@functools.partial(jax.jit, static_argnums=0)
def _per_example_grads_one(per_example_loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(lambda x: per_example_loss_fn(unravel(x), batch))(flat)  # [m, n]


def dense_hessian(loss_fn: Callable, params: PyTree, batches: list) -> jax.Array:
    """(1/B) sum_b d^2 L(theta, b)/dtheta^2 via ``jax.hessian`` of the flat loss."""
    return _mean_over(batches, lambda b: _hessian_one(loss_fn, params, b))


def dense_ggn(model_fn: Callable, output_loss_fn: Callable, params: PyTree, batches: list) -> jax.Array:
    """(1/B) sum_b J_b^T H_out,b J_b with J_b = jacfwd of the flat model output and
    H_out,b = hessian of the output loss w.r.t. the flat outputs."""
    return _mean_over(batches, lambda b: _ggn_one(model_fn, output_loss_fn, params, b))


def dense_per_example_grads(per_example_loss_fn: Callable, params: PyTree, batches: list) -> jax.Array:
    """[N, n] matrix whose row i is the flat gradient g_i of example i (batches in order)."""
    return jnp.concatenate([_per_example_grads_one(per_example_loss_fn, params, b) for b in batches], axis=0)


def dense_fisher(per_example_loss_fn: Callable, params: PyTree, batches: list) -> jax.Array:
    """(1/N) sum_i g_i g_i^T over all examples of all batches (equal batch sizes)."""
    g = dense_per_example_grads(per_example_loss_fn, params, batches)
    return g.T @ g / g.shape[0]
