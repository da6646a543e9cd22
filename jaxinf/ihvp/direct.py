"""Direct solver: eigendecomposition of the dense curvature matrix.

Forms C (n x n, flat ravel_pytree coordinates) from n operator products,
decomposes C = U diag(theta) U^T (``eigh``) and applies

    x = U diag(1 / (t(theta) + lambda)) U^T v,

which is exactly (C + lambda I)^{-1} v for negative="keep" (the default); see
``jaxinf.ihvp.lowrank`` for "abs"/"clip".  lambda is the damping: absolute,
or relative = fraction * tr(C)/n with the exact trace.  Only for small n (the
reference "exact solve" for tests and error studies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.curvature._tree import TreeSpec
from jaxinf.curvature.dense import dense_matrix
from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.ihvp.base import IHVPSolver, state_dataclass
from jaxinf.ihvp.damping import DampingLike, as_damping
from jaxinf.ihvp.lowrank import check_negative, negative_code, negative_name, transform_eigenvalues


@state_dataclass(data_fields=["eigvecs", "eigvals", "damping", "negative"], meta_fields=["spec"])
class DirectState:
    eigvecs: jax.Array  # [n, n], columns orthonormal
    eigvals: jax.Array  # [n], ascending
    damping: jax.Array
    negative: jax.Array  # int32 code of the policy (jaxinf.ihvp.lowrank.negative_code)
    spec: TreeSpec


_eigh = jax.jit(jnp.linalg.eigh)


def _direct_solve(state: DirectState, v):
    x = state.spec.ravel(v)
    shifted = transform_eigenvalues(state.eigvals, state.negative) + state.damping
    out = state.eigvecs @ ((state.eigvecs.T @ x) / shifted)
    info = {"ok": jnp.all(jnp.isfinite(out)), "min_shifted_eigenvalue": jnp.min(shifted)}
    return state.spec.unravel(out), info


def _failure(name, state, info):
    return (
        f"{name}: non-finite result (damping={float(state.damping):.3g}, negative={negative_name(state.negative)!r}, "
        f"min eigenvalue+damping={float(info['min_shifted_eigenvalue'].min()):.3g}); increase the damping"
    )


def _refuse_singular(theta, lam, negative: str):
    """Raise when t(theta) + lambda has an eigenvalue at rounding level (e.g. zero damping on a singular C)."""
    shifted = np.asarray(transform_eigenvalues(theta, negative) + lam)
    theta = np.asarray(theta)
    floor = theta.shape[0] * np.finfo(theta.dtype).eps * max(float(np.max(np.abs(theta))), float(abs(lam)), 1e-300)
    worst = int(np.argmin(np.abs(shifted)))
    if abs(shifted[worst]) <= floor:
        raise ValueError(
            f"direct: C + lambda I is singular: eigenvalue {float(theta[worst]):.3g} + damping {float(lam):.3g} = "
            f"{float(shifted[worst]):.3g} (rounding level {floor:.3g}; smallest eigenvalue of C "
            f"{float(theta.min()):.3g}); pass a damping > 0, e.g. ihvp.relative(0.1) or an absolute value")


def direct(damping: DampingLike = 0.0, negative: str = "keep") -> IHVPSolver:
    """Exact (C + lambda I)^{-1} by dense eigendecomposition (small n only)."""
    damping = as_damping(damping)
    check_negative(negative)

    def fit(op: CurvatureOperator, key=None) -> DirectState:
        mat = dense_matrix(op)
        theta, u = _eigh(mat)
        lam = damping.resolve(jnp.sum(theta), theta.shape[0])
        _refuse_singular(theta, lam, negative)
        return DirectState(u, theta, jnp.asarray(lam, theta.dtype), negative_code(negative), TreeSpec.of(op.params))

    return IHVPSolver("direct", fit, _direct_solve, _failure)


def fit_matrix(matrix: jax.Array, spec: TreeSpec, damping: DampingLike = 0.0, negative: str = "keep") -> DirectState:
    """A DirectState from an already-formed symmetric matrix (flat coordinates of `spec`)."""
    damping = as_damping(damping)
    theta, u = _eigh(matrix)
    lam = damping.resolve(jnp.sum(theta), theta.shape[0])
    _refuse_singular(theta, lam, negative)
    return DirectState(u, theta, jnp.asarray(lam, theta.dtype), negative_code(negative), spec)
