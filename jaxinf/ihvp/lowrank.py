"""Spectral inverses shared by the direct, Lanczos and Arnoldi solvers.

Given orthonormal eigen/Ritz vectors U = [u_1..u_k] (n x k) with eigen/Ritz
values theta_1..theta_k of C, the damped inverse is approximated by

    P v = U diag(1 / (t(theta) + lambda)) U^T v + c (v - U U^T v) / lambda,

exact on span(U); on its orthogonal complement the option ``complement``:

* "zero" (c = 0, the default): projection onto the top-k Ritz space only, as
  Schioppa et al. (2022). With k below the rank of C the complement holds
  unresolved curvature; 1/lambda there would dominate P v at small lambda.
* "damping" (c = 1): "curvature = 0, damping only" on the complement.

For k = n both are exactly (C + lambda I)^{-1} when t = id.

Negative eigenvalues (Hessians of non-convex losses are indefinite) are
handled by the explicit option ``negative``:

* "keep": t(theta) = theta  -- the exact damped inverse on span(U); blows up
          when theta is close to -lambda and flips sign below it.
* "abs":  t(theta) = |theta| -- inverse of the positive-definite |C| + lambda I
          (a saddle-free / absolute-value Newton choice).
* "clip": t(theta) = max(theta, 0) -- negative directions get 1/lambda, as if
          they had no curvature (the inverse of the PSD part of C, damped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec
from jaxinf.ihvp.base import state_dataclass

NEGATIVE_MODES = ("keep", "abs", "clip")


def check_negative(negative: str) -> str:
    if negative not in NEGATIVE_MODES:
        raise ValueError(f"negative must be one of {NEGATIVE_MODES}, got {negative!r}")
    return negative


def negative_code(negative: str) -> jax.Array:
    """The policy as an int32 array (state data, so switching policies does not recompile)."""
    return jnp.asarray(NEGATIVE_MODES.index(check_negative(negative)), jnp.int32)


def negative_name(code) -> str:
    return NEGATIVE_MODES[int(code)]


def transform_eigenvalues(theta: jax.Array, negative) -> jax.Array:
    """t(theta) for the negative-eigenvalue policy (a name or its int code)."""
    code = negative_code(negative) if isinstance(negative, str) else negative
    return jnp.where(code == 0, theta, jnp.where(code == 1, jnp.abs(theta), jnp.maximum(theta, 0.0)))


def select_top_k(theta: jax.Array, vecs: jax.Array, k: int):
    """The k eigenpairs of largest |theta| (columns of vecs), sorted by decreasing |theta|."""
    order = jnp.argsort(-jnp.abs(theta))[:k]
    return theta[order], vecs[:, order]


@state_dataclass(
    data_fields=["basis", "eigvals", "damping", "ritz_values", "ritz_residuals", "negative", "complement"],
    meta_fields=["spec"],
)
class LowRankState:
    """U (basis, n x k), selected Ritz values, lambda, and all Ritz values with residual norms."""

    basis: jax.Array
    eigvals: jax.Array
    damping: jax.Array
    ritz_values: jax.Array
    ritz_residuals: jax.Array
    negative: jax.Array  # int32 code of the policy, see negative_code
    complement: jax.Array  # c: 0.0 ("zero") or 1.0 ("damping")
    spec: TreeSpec


def lowrank_solve(state: LowRankState, v):
    """P v = U diag(1/(t(theta)+lambda)) U^T v + c (v - U U^T v)/lambda."""
    x = state.spec.ravel(v)
    u = state.basis
    coef = u.T @ x
    shifted = transform_eigenvalues(state.eigvals, state.negative) + state.damping
    out = u @ (coef / shifted) + state.complement * (x - u @ coef) / state.damping
    info = {
        "ok": jnp.all(jnp.isfinite(out)),
        "min_shifted_eigenvalue": jnp.min(shifted),
    }
    return state.spec.unravel(out), info


def lowrank_failure(name, state, info) -> str:
    return (
        f"{name}: non-finite result (damping={float(state.damping):.3g}, "
        f"negative={negative_name(state.negative)!r}, min t(theta)+damping={float(info['min_shifted_eigenvalue'].min()):.3g}); "
        "increase the damping or use negative='abs'/'clip'"
    )


COMPLEMENTS = ("zero", "damping")


def krylov_solver(name: str, ritz, damping, num_iters: int, rank, reorthogonalize: bool, negative: str,
                  trace_probes: int, complement: str = "zero"):
    """The IHVPSolver shared by Lanczos and Arnoldi: `ritz(op, key, num_iters, reorthogonalize, rank)` returns
    (all Ritz values, their residuals, the top-`rank` values, their Ritz vectors [n, rank]); the complement of
    their span gets 0 ("zero") or 1/lambda ("damping"), see `lowrank_solve`."""
    from jaxinf.ihvp.base import IHVPSolver
    from jaxinf.ihvp.damping import as_damping, operator_damping

    damping = as_damping(damping)
    check_negative(negative)
    if complement not in COMPLEMENTS:
        raise ValueError(f"{name}: complement must be one of {COMPLEMENTS}, got {complement!r}")
    rank = num_iters if rank is None else rank
    if not 1 <= rank <= num_iters:
        raise ValueError(f"need 1 <= rank <= num_iters, got rank={rank}, num_iters={num_iters}")

    def fit(op, key=None) -> LowRankState:
        if key is None:
            raise ValueError(f"{name}: fit needs a PRNG key (random start vector)")
        if num_iters > op.dim:
            raise ValueError(f"{name}: num_iters={num_iters} exceeds the dimension n={op.dim}")
        k_run, k_damp = jax.random.split(key)
        lam = operator_damping(damping, op, k_damp, trace_probes, name)
        theta, res, top, u = ritz(op, k_run, num_iters, reorthogonalize, rank)
        c = jnp.asarray(1.0 if complement == "damping" else 0.0, lam.dtype)
        return LowRankState(u, top, lam, theta, res, negative_code(negative), c, op.spec)

    return IHVPSolver(name, fit, lowrank_solve, lowrank_failure)
