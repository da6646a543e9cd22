"""Conjugate gradient on the damped operator A = C + lambda I.

Solves A x = v from x_0 = 0 with the standard recurrences (one C-product per
iteration, all inside ``lax.while_loop``, on pytrees):

    alpha_k = r_k^T r_k / p_k^T A p_k,   x_{k+1} = x_k + alpha_k p_k,
    r_{k+1} = r_k - alpha_k A p_k,       p_{k+1} = r_{k+1} + (r_{k+1}^T r_{k+1} / r_k^T r_k) p_k,

stopping when ||r_k|| <= tol * ||v|| or after maxiter iterations.  CG needs A
symmetric positive definite: a direction with p^T A p <= 0 (possible for an
indefinite Hessian with too little damping) stops it with a failure, unless
the residual is already at rounding level (||r|| <= sqrt(eps) ||v||), which
counts as convergence.  ``iterations`` = number of C-products applied.
lambda: absolute, or relative = fraction * tr(C)/n (``operator_damping``: exact
for the empirical Fisher, else a Hutchinson estimate that needs ``key`` at fit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec, tree_all_finite, tree_axpy, tree_vdot, tree_zeros_like
from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.ihvp.base import IHVPSolver, state_dataclass
from jaxinf.ihvp.damping import DampingLike, as_damping, operator_damping


@state_dataclass(data_fields=["op", "damping", "tol", "maxiter"], meta_fields=["spec"])
class CGState:
    op: CurvatureOperator
    damping: jax.Array
    tol: jax.Array
    maxiter: jax.Array
    spec: TreeSpec


def _cg_solve(state: CGState, b):
    op, lam = state.op, state.damping

    def apply_a(x):
        return tree_axpy(lam, x, op.matvec(x))

    rs0 = tree_vdot(b, b)
    bnorm = jnp.sqrt(rs0)
    # a breakdown (p^T A p <= 0) once the residual is at rounding level is just convergence
    noise = jnp.sqrt(jnp.finfo(rs0.dtype).eps) * bnorm
    init = (tree_zeros_like(b), b, b, rs0, jnp.zeros((), jnp.int32), jnp.array(False), jnp.array(False))

    def cond(carry):
        _, _, _, rs, k, stop, _ = carry
        return (k < state.maxiter) & (jnp.sqrt(rs) > state.tol * bnorm) & ~stop

    def body(carry):
        x, r, p, rs, k, _, _ = carry
        ap = apply_a(p)
        pap = tree_vdot(p, ap)
        stop = ~(pap > 0) | ~jnp.isfinite(pap)
        alpha = jnp.where(stop, 0.0, rs / jnp.where(stop, 1.0, pap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = jnp.where(stop, rs, tree_vdot(r, r))
        beta = rs_new / jnp.where(rs > 0, rs, 1.0)
        p = tree_axpy(beta, p, r)
        bad = stop & (jnp.sqrt(rs) > noise)
        return x, r, p, rs_new, k + 1, stop, bad

    x, _, _, rs, k, _, bad = jax.lax.while_loop(cond, body, init)
    rel = jnp.sqrt(rs) / jnp.where(bnorm > 0, bnorm, 1.0)
    info = {
        "ok": ~bad & tree_all_finite(x),
        "iterations": k,
        "relative_residual": rel,
        "converged": rel <= state.tol,
        "nonpositive_curvature": bad,
    }
    return x, info


def _failure(name, state, info):
    why = "hit p^T (C + lambda I) p <= 0 (operator not positive definite)" if info[
        "nonpositive_curvature"
    ].any() else "produced non-finite values"
    return (
        f"{name}: CG {why} with damping={float(state.damping):.3g} after "
        f"{int(info['iterations'].max())} iterations; increase the damping or use a PSD curvature (GGN/Fisher)"
    )


def cg(
    damping: DampingLike = 0.0,
    tol: float = 1e-6,
    maxiter: int = 100,
    trace_probes: int = 16,
) -> IHVPSolver:
    """CG for (C + lambda I) x = v to relative residual `tol` or `maxiter` C-products."""
    damping = as_damping(damping)

    def fit(op: CurvatureOperator, key=None) -> CGState:
        lam = operator_damping(damping, op, key, trace_probes, "cg")
        return CGState(op, lam, jnp.asarray(tol, lam.dtype), jnp.asarray(maxiter, jnp.int32), op.spec)

    return IHVPSolver("cg", fit, _cg_solve, _failure)
