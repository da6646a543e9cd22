"""Identity "solver": x = v / scale (gradient matching, i.e. C replaced by scale * I).

With scale = 1 the influence g_test^T x_train reduces to the gradient dot
product (TracIn-style gradient matching); it is the lambda -> infinity limit
of lambda (C + lambda I)^{-1}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec, tree_all_finite, tree_scale
from jaxinf.ihvp.base import IHVPSolver, state_dataclass


@state_dataclass(data_fields=["scale"], meta_fields=["spec"])
class IdentityState:
    scale: jax.Array
    spec: TreeSpec


def _identity_solve(state: IdentityState, v):
    out = tree_scale(v, 1.0 / state.scale)
    return out, {"ok": tree_all_finite(out)}


def identity(scale: float = 1.0) -> IHVPSolver:
    """x = v / scale; fit only records the parameter spec (any operator, or a params pytree)."""

    def fit(op, key=None) -> IdentityState:
        params = getattr(op, "params", op)
        spec = TreeSpec.of(params)
        return IdentityState(jnp.asarray(scale, spec.dtype), spec)

    return IHVPSolver("identity", fit, _identity_solve)
