"""Exact per-layer inverse of the damped empirical Fisher via the Woodbury identity.

For layer l with per-example gradients stacked as G_l (N x d_l, row i = g_i,l),
the block F_l = G_l^T G_l / N and

    (G_l^T G_l / N + lambda_l I)^{-1} v_l
        = (v_l - G_l^T (N lambda_l I + G_l G_l^T)^{-1} G_l v_l) / lambda_l,

which needs one N x N Cholesky factorisation per layer (cheap when N << d_l or
d_l small, as for LoRA).  The result is the block-diagonal approximation
diag(F_1 + lambda_1 I, ..., F_L + lambda_L I)^{-1} (exact when there is one
layer).  lambda_l: absolute, or relative = fraction * tr(F_l)/d_l with
tr(F_l) = mean_i ||g_i,l||^2.  Layers are top-level keys of the parameter
pytree (``by="top"``), single leaves (``by="leaf"``) or one block (``by="all"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.ihvp.base import IHVPSolver, state_dataclass
from jaxinf.ihvp.damping import Damping, DampingLike, as_damping, block_lambda
from jaxinf.ihvp.layers import LayerPartition


@state_dataclass(data_fields=["grads", "chol", "dampings"], meta_fields=["partition"])
class WoodburyState:
    grads: tuple  # per layer G_l [N, d_l]
    chol: tuple  # per layer lower Cholesky factor of N lambda_l I + G_l G_l^T
    dampings: jax.Array  # [L]
    partition: LayerPartition

    @property
    def spec(self):
        return self.partition.spec


def layer_gradients(op: CurvatureOperator, by: str = "top"):
    """(partition, [G_l of shape (N, d_l)]) from a 'fisher' operator's per-example gradients."""
    partition = LayerPartition.of(op.params, by=by)
    return partition, partition.split_batched(op.per_example_grads())


def layer_dampings(damping, grads, names=None) -> jax.Array:
    """lambda_l per layer: relative = fraction * mean_i ||g_i,l||^2 / d_l; absolute = the value; a mapping
    {block name: absolute lambda_l} gives each block its own value (every block must be named)."""
    if isinstance(damping, Mapping):
        missing = [n for n in names if n not in damping]
        if missing:
            raise ValueError(f"per-block damping has no value for blocks {missing}; its keys: {list(damping)}")
        lams = [damping[n] for n in names]
    else:
        lams = [block_lambda(damping.value, g) if damping.relative else damping.resolve() for g in grads]
    return jnp.stack([jnp.asarray(x, grads[0].dtype) for x in lams])


def as_layer_damping(damping):
    """A Damping, or a {block name: absolute lambda} mapping kept as is."""
    return dict(damping) if isinstance(damping, Mapping) else as_damping(damping)


def damped_layer_gradients(name: str, op: CurvatureOperator, damping, by: str):
    """(partition, per-layer gradients G_l, per-layer dampings lambda_l > 0) for the per-layer Fisher methods."""
    partition, grads = layer_gradients(op, by)
    lams = layer_dampings(damping, grads, partition.names)
    if not bool(jnp.all(lams > 0)):
        raise ValueError(f"{name} needs a positive damping per layer, got {lams} from {damping}")
    return partition, tuple(grads), lams


@jax.jit
def _factor(grads, dampings):
    chols = []
    for l, g in enumerate(grads):
        n = g.shape[0]
        k = g @ g.T + n * dampings[l] * jnp.eye(n, dtype=g.dtype)
        chols.append(jnp.linalg.cholesky(k))
    return tuple(chols)


def _woodbury_solve(state: WoodburyState, v):
    blocks = state.partition.split(v)
    out = []
    for l, (x, g, c) in enumerate(zip(blocks, state.grads, state.chol)):
        s = jsl.cho_solve((c, True), g @ x)
        out.append((x - g.T @ s) / state.dampings[l])
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in out]))
    return state.partition.merge(out), {"ok": finite}


def _failure(name, state, info):
    return (
        f"{name}: non-finite result (per-layer dampings min={float(state.dampings.min()):.3g}); "
        "the damping must be > 0 for the Woodbury form"
    )


def woodbury(damping: DampingLike = Damping(0.1, relative=True), by: str = "top") -> IHVPSolver:
    """Exact block-diagonal (F_l + lambda_l I)^{-1} of the empirical Fisher; fit needs a 'fisher' operator.
    damping: absolute / relative, or {block name: absolute lambda_l} (names of ``LayerPartition.of(params, by)``)."""
    damping = as_layer_damping(damping)

    def fit(op: CurvatureOperator, key=None) -> WoodburyState:
        partition, grads, lams = damped_layer_gradients("woodbury", op, damping, by)
        return WoodburyState(grads, _factor(grads, lams), lams, partition)

    return IHVPSolver("woodbury", fit, _woodbury_solve, _failure)
