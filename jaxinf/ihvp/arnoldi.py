"""Arnoldi iteration (Schioppa et al. 2022, "Scaling up influence functions").

m Arnoldi steps from a random unit q_1 (flat coordinates, ``lax.fori_loop``):

    w = C q_j,  h_{ij} = q_i^T w (i <= j),  w <- w - sum_i h_ij q_i,
    h_{j+1,j} = ||w||,  q_{j+1} = w / h_{j+1,j},

i.e. full (classical) Gram-Schmidt against every previous vector, repeated
once more with ``reorthogonalize=True`` (CGS2, "twice is enough"), giving
C Q_m = Q_m H_m + h_{m+1,m} q_{m+1} e_m^T with H_m upper Hessenberg.
Breakdown (h_{j+1,j} ~ 0) restarts with a random vector orthogonal to Q.

C is symmetric, so in exact arithmetic H_m is symmetric tridiagonal; the
paper takes a general eigendecomposition of H_m.  Here H_m is symmetrised,
(H_m + H_m^T)/2, and decomposed with ``eigh`` (real Ritz values, orthonormal
Ritz vectors, available on every backend); the discarded asymmetry is at
rounding level.  Ritz residual of pair i: |h_{m+1,m}| |S[m, i]|.  As in the
paper, the top-k Ritz pairs by |theta| ("distillation") give the inverse

    P v = U diag(1/(t(theta)+lambda)) U^T v + c (v - U U^T v)/lambda

(``jaxinf.ihvp.lowrank``; t from ``negative``).  lambda: absolute or relative
to tr(C)/n (``operator_damping``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.ihvp.base import IHVPSolver
from jaxinf.ihvp.damping import DampingLike
from jaxinf.ihvp.lanczos import krylov_start, next_krylov_vector
from jaxinf.ihvp.lowrank import krylov_solver, select_top_k


def arnoldi_hessenberg(op: CurvatureOperator, key: jax.Array, num_iters: int, reorthogonalize: bool = True):
    """Run m = num_iters Arnoldi steps; returns (Q [m+1, n], H [m+1, m])."""
    return _arnoldi_hessenberg(op, key, int(num_iters), bool(reorthogonalize))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _arnoldi_hessenberg(op, key, num_iters, reorthogonalize):
    mv, basis, k_restart = krylov_start(op, key, num_iters)
    dt, m = basis.dtype, num_iters

    def body(j, carry):
        basis, hess = carry
        w = mv(basis[j])
        wnorm = jnp.linalg.norm(w)
        h = basis @ w  # entries i > j vanish: those rows are still zero
        w = w - basis.T @ h
        if reorthogonalize:
            h2 = basis @ w
            w = w - basis.T @ h2
            h = h + h2
        q_next, b = next_krylov_vector(w, basis, k_restart, j, wnorm)
        return basis.at[j + 1].set(q_next), hess.at[:, j].set(h.at[j + 1].set(b))

    return jax.lax.fori_loop(0, m, body, (basis, jnp.zeros((m + 1, m), dt)))


@functools.partial(jax.jit, static_argnames=("rank",))
def _arnoldi_ritz(basis, hess, rank):
    m = hess.shape[1]
    hm = hess[:m, :m]
    theta, s = jnp.linalg.eigh(0.5 * (hm + hm.T))
    residuals = jnp.abs(hess[m, m - 1] * s[m - 1, :])
    top, s_top = select_top_k(theta, s, rank)
    return theta, residuals, top, basis[:m].T @ s_top


def arnoldi(
    damping: DampingLike = 0.0,
    num_iters: int = 50,
    rank: int | None = None,
    reorthogonalize: bool = True,
    negative: str = "keep",
    trace_probes: int = 16,
    complement: str = "zero",
) -> IHVPSolver:
    """Arnoldi low-rank inverse: `num_iters` C-products at fit, top-`rank` Ritz pairs by |theta|."""

    def ritz(op, key, m, reorth, k):
        basis, hess = arnoldi_hessenberg(op, key, m, reorth)
        return _arnoldi_ritz(basis, hess, k)

    return krylov_solver("arnoldi", ritz, damping, num_iters, rank, reorthogonalize, negative, trace_probes,
                         complement)
