"""DataInf's closed-form approximate inverse (Kwon et al., 2024), per layer.

DataInf replaces the inverse of the average by the average of inverses,

    (1/N sum_i g_i g_i^T + lambda I)^{-1}  ~  1/N sum_i (g_i g_i^T + lambda I)^{-1},

and inverts each rank-one term with Sherman-Morrison, giving for layer l

    x_l = 1/(N lambda_l) sum_i ( v_l - (g_i,l^T v_l) / (lambda_l + ||g_i,l||^2) g_i,l ).

This is NOT the exact damped inverse (see ``woodbury`` for that); the error
grows with the spread of the ||g_i|| relative to lambda.  Default damping per
layer, as in the DataInf reference code (``lambda_const = mean_i mean(g_i^2)
/ 10``): lambda_l = 0.1 * mean_i ||g_i,l||^2 / d_l = relative(0.1).  Note the
reference code treats every weight tensor (lora_A, lora_B separately) as a
layer: that is ``by="leaf"``, the default here (``by="top"`` groups a
module's A and B into one block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.ihvp.base import IHVPSolver, state_dataclass
from jaxinf.ihvp.damping import Damping, DampingLike
from jaxinf.ihvp.layers import LayerPartition  # noqa: F401  (state field type)
from jaxinf.ihvp.woodbury import as_layer_damping, damped_layer_gradients


@state_dataclass(data_fields=["grads", "sq_norms", "dampings"], meta_fields=["partition"])
class DataInfState:
    grads: tuple  # per layer G_l [N, d_l]
    sq_norms: tuple  # per layer ||g_i,l||^2 [N]
    dampings: jax.Array  # [L]
    partition: LayerPartition

    @property
    def spec(self):
        return self.partition.spec


def _datainf_solve(state: DataInfState, v):
    blocks = state.partition.split(v)
    out = []
    for l, (x, g, sq) in enumerate(zip(blocks, state.grads, state.sq_norms)):
        lam = state.dampings[l]
        coef = (g @ x) / (lam + sq)  # [N]: (g_i^T v) / (lambda + ||g_i||^2)
        n = g.shape[0]
        # 1/(N lam) sum_i (v - coef_i g_i) = (v - (1/N) G^T coef) / lam
        out.append((x - (g.T @ coef) / n) / lam)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in out]))
    return state.partition.merge(out), {"ok": finite}


def _failure(name, state, info):
    return f"{name}: non-finite result (per-layer dampings min={float(state.dampings.min()):.3g}); damping must be > 0"


def datainf(damping: DampingLike = Damping(0.1, relative=True), by: str = "leaf") -> IHVPSolver:
    """DataInf's per-layer closed form; fit needs a 'fisher' operator (per-example gradients). One block per weight
    tensor (``by="leaf"``: lora_A and lora_B separately), as the DataInf reference code. damping: absolute /
    relative, or {block name: absolute lambda_l}."""
    damping = as_layer_damping(damping)

    def fit(op: CurvatureOperator, key=None) -> DataInfState:
        partition, grads, lams = damped_layer_gradients("datainf", op, damping, by)
        sq = tuple(jnp.sum(g * g, axis=1) for g in grads)
        return DataInfState(grads, sq, lams, partition)

    return IHVPSolver("datainf", fit, _datainf_solve, _failure)

