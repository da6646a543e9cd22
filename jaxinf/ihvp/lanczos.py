"""Lanczos: top-k eigenpairs of the symmetric curvature C, then a low-rank damped inverse.

m steps of the symmetric Lanczos recurrence from a random unit q_1 (flat
parameter coordinates, inside ``lax.fori_loop``, no host round-trips):

    w = C q_j - alpha_j q_j - beta_{j-1} q_{j-1},  alpha_j = q_j^T C q_j,
    beta_j = ||w||,  q_{j+1} = w / beta_j,

give C Q_m = Q_m T_m + beta_m q_{m+1} e_m^T with T_m tridiagonal
(diag alpha, off-diagonal beta).  With ``reorthogonalize=True`` w is
additionally orthogonalised against all previous q (classical Gram-Schmidt,
twice), which keeps Q_m orthonormal in floating point; without it, expect
spurious copies of converged eigenvalues for m much beyond convergence.
On breakdown (beta_j ~ 0: an invariant subspace, e.g. a repeated
eigenvalue) the next q is a fresh random vector orthogonal to Q and the
coupling beta_j is set to 0, so the decomposition stays valid and m = n
steps reach every eigenvalue.

Ritz pairs: T_m = S diag(theta) S^T, u_i = Q_m s_i, residual
||C u_i - theta_i u_i|| = |beta_m| |S[m, i]|.  The k Ritz pairs of largest
|theta| define the inverse of ``jaxinf.ihvp.lowrank``:

    P v = U diag(1/(t(theta)+lambda)) U^T v + c (v - U U^T v)/lambda,

with t given by ``negative`` ("keep" | "abs" | "clip").  For m = k = n
(full rank, with reorthogonalisation) P = (C + lambda I)^{-1}.  lambda:
absolute or relative to tr(C)/n (``operator_damping``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec
from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.ihvp.base import IHVPSolver
from jaxinf.ihvp.damping import DampingLike
from jaxinf.ihvp.lowrank import krylov_solver, select_top_k


def flat_matvec(op: CurvatureOperator):
    """x -> ravel(C unravel(x)) in flat coordinates (traceable)."""
    spec = TreeSpec.of(op.params)
    return lambda x: spec.ravel(op.matvec(spec.unravel(x)))


def orthogonalize(w: jax.Array, basis: jax.Array, passes: int = 2) -> jax.Array:
    """w minus its projection on the rows of `basis` (classical Gram-Schmidt, repeated)."""
    for _ in range(passes):
        w = w - basis.T @ (basis @ w)
    return w


def next_krylov_vector(w, basis, key, j, wnorm):
    """(q_{j+1}, coupling): w/||w||, or a random unit vector orthogonal to `basis` on breakdown."""
    b = jnp.linalg.norm(w)
    eps = jnp.finfo(w.dtype).eps
    breakdown = b <= 10 * eps * jnp.maximum(wnorm, jnp.finfo(w.dtype).tiny)

    def restart(_):
        r = orthogonalize(jax.random.normal(jax.random.fold_in(key, j), w.shape, w.dtype), basis)
        return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(w.dtype).tiny)

    q = jax.lax.cond(breakdown, restart, lambda _: w / jnp.where(b > 0, b, 1.0), None)
    return q, jnp.where(breakdown, 0.0, b)


def krylov_start(op: CurvatureOperator, key: jax.Array, num_iters: int):
    """(flat matvec, basis [m+1, n] holding a random unit start vector in row 0, key for restarts)."""
    spec = TreeSpec.of(op.params)
    k_start, k_restart = jax.random.split(key)
    q0 = jax.random.normal(k_start, (spec.size,), spec.dtype)
    basis = jnp.zeros((num_iters + 1, spec.size), spec.dtype).at[0].set(q0 / jnp.linalg.norm(q0))
    return flat_matvec(op), basis, k_restart


def lanczos_tridiagonal(op: CurvatureOperator, key: jax.Array, num_iters: int, reorthogonalize: bool = True):
    """Run m = num_iters Lanczos steps; returns (Q [m+1, n], alpha [m], beta [m])."""
    return _lanczos_tridiagonal(op, key, int(num_iters), bool(reorthogonalize))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lanczos_tridiagonal(op, key, num_iters, reorthogonalize):
    mv, basis, k_restart = krylov_start(op, key, num_iters)
    dt, m = basis.dtype, num_iters

    def body(j, carry):
        basis, alpha, beta = carry
        q = basis[j]
        w = mv(q)
        wnorm = jnp.linalg.norm(w)
        a = jnp.vdot(q, w)
        b_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0)
        w = w - a * q - b_prev * basis[jnp.maximum(j - 1, 0)]
        if reorthogonalize:
            w = orthogonalize(w, basis)  # rows > j are still zero
        q_next, b = next_krylov_vector(w, basis, k_restart, j, wnorm)
        return basis.at[j + 1].set(q_next), alpha.at[j].set(a), beta.at[j].set(b)

    init = (basis, jnp.zeros((m,), dt), jnp.zeros((m,), dt))
    return jax.lax.fori_loop(0, m, body, init)


@functools.partial(jax.jit, static_argnames=("rank",))
def _lanczos_ritz(basis, alpha, beta, rank):
    m = alpha.shape[0]
    t = jnp.diag(alpha) + jnp.diag(beta[: m - 1], 1) + jnp.diag(beta[: m - 1], -1)
    theta, s = jnp.linalg.eigh(t)
    residuals = jnp.abs(beta[m - 1] * s[m - 1, :])
    top, s_top = select_top_k(theta, s, rank)
    return theta, residuals, top, basis[:m].T @ s_top


def lanczos(
    damping: DampingLike = 0.0,
    num_iters: int = 50,
    rank: int | None = None,
    reorthogonalize: bool = True,
    negative: str = "keep",
    trace_probes: int = 16,
    complement: str = "zero",
) -> IHVPSolver:
    """Lanczos low-rank inverse: `num_iters` C-products at fit, top-`rank` Ritz pairs (default all)."""

    def ritz(op, key, m, reorth, k):
        basis, alpha, beta = lanczos_tridiagonal(op, key, m, reorth)
        return _lanczos_ritz(basis, alpha, beta, k)

    return krylov_solver("lanczos", ritz, damping, num_iters, rank, reorthogonalize, negative, trace_probes,
                         complement)
