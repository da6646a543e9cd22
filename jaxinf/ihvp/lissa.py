"""LiSSA: stochastic Neumann-series recursion for (C + lambda I)^{-1} v (Agarwal et al. 2017).

With scale s and v_0 = v, each step applies the curvature of one batch b_j:

    v_{j+1} = v + (1 - lambda/s) v_j - C_{b_j} v_j / s,      result x = v_J / s.

For a fixed C the fixed point is v* = s (C + lambda I)^{-1} v, and the error
contracts by max_i |1 - (theta_i + lambda)/s| per step, so it converges iff
C + lambda I > 0 and s > (theta_max + lambda)/2; the rate is ~1 - (theta_min +
lambda)/s, so larger damping converges faster and a needlessly large s slower.
With per-batch C_b the iterate ends in a noise ball around the solution;
``repeats`` independent recursions (different batch orders) are averaged.

Batch sequence per (repeat, step): "cycle" (b = (j + r) mod B), "random"
(uniform, from ``key``), or "full" (the averaged operator every step:
deterministic, converges to the exact damped inverse).  The scale, unless
given, is scale_safety * (|theta|_max + lambda) with |theta|_max from power
iteration (the max over per-batch operators unless sampling="full").

Damping lambda: absolute or relative to tr(C)/n (``operator_damping``).

Cached gradient Fisher (`jaxinf.curvature.cached`, F = G^T G / N from N stored rows, one batch): every
iterate lies in span{v} + span{g_n}, so the same recursion runs on coefficients, v_j = a_j v + G^T c_j:

    F v_j = G^T (a_j G v + K c_j) / N,   a_{j+1} = 1 + (1 - lambda/s) a_j,
    c_{j+1} = (1 - lambda/s) c_j - (a_j G v + K c_j) / (N s),   K = G G^T (formed once in fit),

O(N^2) per step instead of O(N D); same iterates and result (tests/test_ihvp.py compares both in float64).

Divergence: if any iterate is non-finite or ||v_j|| > max_growth (j+1) ||v||
(a non-expansive recursion satisfies ||v_j|| <= (j+1) ||v||), the jitted solve
returns ok=False and ``apply`` raises, naming the damping and scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec, tree_norm, tree_scale, tree_vdot, tree_zeros_like
from jaxinf.curvature.operators import CurvatureOperator
from jaxinf.curvature.spectrum import largest_eigenvalue
from jaxinf.ihvp.base import IHVPSolver, state_dataclass
from jaxinf.ihvp.damping import DampingLike, as_damping, operator_damping

SAMPLINGS = ("cycle", "random", "full")


@state_dataclass(
    data_fields=["op", "damping", "scale", "indices", "max_growth", "gram"], meta_fields=["spec", "full_batch"]
)
class LissaState:
    op: CurvatureOperator
    damping: jax.Array
    scale: jax.Array
    indices: jax.Array  # [repeats, depth] batch index per step
    max_growth: jax.Array
    spec: TreeSpec
    full_batch: bool
    gram: Any = None  # K = G G^T [N, N] when op is a cached gradient Fisher (the row-space recursion), else None


def _gradient_rows(op: CurvatureOperator):
    """G (leaves [N, ...]) when op is the cached gradient Fisher G^T G / N of one batch, else None."""
    from jaxinf.curvature.cached import linear_example_losses

    if op.kind == "fisher" and op.fns == (linear_example_losses,) and op.num_batches == 1:
        return jax.tree.map(lambda x: x[0], op.batches)
    return None


def _rows_dot(rows, v) -> jax.Array:
    """G v: [N] (rows leaves [N, ...], v a parameter pytree)."""
    return sum(jnp.tensordot(r, x, axes=x.ndim) for r, x in zip(jax.tree.leaves(rows), jax.tree.leaves(v)))


def _lissa_solve_rows(state: LissaState, g):
    """The recursion on coefficients (a, c) of v_j = a g + G^T c (module docstring); same result."""
    rows, k, lam, s = _gradient_rows(state.op), state.gram, state.damping, state.scale
    n = k.shape[0]
    decay = 1.0 - lam / s
    gq = _rows_dot(rows, g).astype(k.dtype)  # G g
    gg = tree_vdot(g, g).astype(k.dtype)
    gnorm = jnp.sqrt(gg)

    def step(carry, j):
        a, c, worst = carry
        u = (a * gq + k @ c) / n  # F v_j = G^T u
        a, c = 1.0 + decay * a, decay * c - u / s
        norm = jnp.sqrt(jnp.maximum(a * a * gg + 2.0 * a * (c @ gq) + c @ (k @ c), 0.0))
        ratio = norm / ((j + 2) * jnp.where(gnorm > 0, gnorm, 1.0))
        worst = jnp.maximum(worst, jnp.where(jnp.isfinite(ratio), ratio, jnp.inf))
        return (a, c, worst), None

    def repeat(carry, _):  # one batch: every repeat runs the same recursion, as the tree form does
        a_sum, c_sum, worst = carry
        steps = jnp.arange(state.indices.shape[1], dtype=k.dtype)
        (a, c, worst), _ = jax.lax.scan(step, (jnp.ones((), k.dtype), jnp.zeros((n,), k.dtype), worst), steps)
        return (a_sum + a, c_sum + c, worst), None

    zero = jnp.zeros((), k.dtype)
    (a, c, worst), _ = jax.lax.scan(repeat, (zero, jnp.zeros((n,), k.dtype), zero), None,
                                    length=state.indices.shape[0])
    scale = 1.0 / (state.indices.shape[0] * s)
    x = jax.tree.map(lambda gi, r: ((a * gi + jnp.tensordot(c, r, axes=1)) * scale).astype(gi.dtype), g, rows)
    return x, {"ok": worst <= state.max_growth, "max_growth_ratio": worst}


def _lissa_solve(state: LissaState, g):
    if state.gram is not None:
        return _lissa_solve_rows(state, g)
    op, lam, s = state.op, state.damping, state.scale
    decay = 1.0 - lam / s
    gnorm = tree_norm(g)

    def step(carry, idx):
        v, worst = carry
        cv = op.matvec(v) if state.full_batch else op.batch_matvec(v, idx[0])
        v = jax.tree.map(lambda gi, vi, ci: (gi + decay * vi - ci / s).astype(vi.dtype), g, v, cv)
        # v_{j+1} = sum_{i<=j+1} M^i v has norm <= (j+2)||v|| for a non-expansive M
        ratio = tree_norm(v) / ((idx[1] + 2) * jnp.where(gnorm > 0, gnorm, 1.0))
        worst = jnp.maximum(worst, jnp.where(jnp.isfinite(ratio), ratio, jnp.inf))
        return (v, worst), None

    def repeat(carry, idx_row):
        acc, worst = carry
        steps = jnp.arange(idx_row.shape[0], dtype=idx_row.dtype)
        (v, worst), _ = jax.lax.scan(step, (g, worst), jnp.stack([idx_row, steps], axis=1))
        return (jax.tree.map(jnp.add, acc, v), worst), None

    zero = jnp.zeros((), gnorm.dtype)
    (total, worst), _ = jax.lax.scan(repeat, (tree_zeros_like(g), zero), state.indices)
    x = tree_scale(total, 1.0 / (state.indices.shape[0] * s))
    ok = worst <= state.max_growth
    return x, {"ok": ok, "max_growth_ratio": worst}


def _failure(name, state, info):
    return (
        f"{name}: LiSSA diverged (non-finite iterate or ||v_j|| > max_growth*(j+1)*||v||, "
        f"worst ratio {float(jnp.max(info['max_growth_ratio'])):.3g} > {float(state.max_growth):.3g}) "
        f"with damping={float(state.damping):.3g}, scale={float(state.scale):.3g}. "
        "It converges only if C_b + damping > 0 and scale > (lambda_max(C_b) + damping)/2: "
        "increase the scale or the damping."
    )


def lissa(
    damping: DampingLike = 0.0,
    scale: float | None = None,
    depth: int = 100,
    repeats: int = 1,
    sampling: str = "cycle",
    scale_safety: float = 1.25,
    power_iters: int = 20,
    max_growth: float = 10.0,
    trace_probes: int = 16,
    row_space: bool = True,
) -> IHVPSolver:
    """LiSSA with `repeats` recursions of `depth` steps (depth * repeats batch products per query).

    `row_space`: on a cached gradient Fisher, run the recursion on coefficients over the N rows (module
    docstring; same iterates, O(N^2) a step); False forces the parameter-space form."""
    damping = as_damping(damping)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if depth < 1 or repeats < 1:
        raise ValueError("depth and repeats must be >= 1")

    def fit(op: CurvatureOperator, key=None) -> LissaState:
        if (scale is None or sampling == "random") and key is None:
            raise ValueError("lissa: fit needs a PRNG key (power iteration for the scale / random batches)")
        k_damp, k_pow, k_idx = jax.random.split(key, 3) if key is not None else (None, None, None)
        lam = operator_damping(damping, op, k_damp, trace_probes, "lissa")
        if scale is None:
            top = largest_eigenvalue(op, k_pow, num_iters=power_iters, per_batch=sampling != "full")
            s = scale_safety * (top + lam)
        else:
            s = jnp.asarray(scale, lam.dtype)
        if not bool(s > 0):
            raise ValueError(f"lissa: scale must be > 0, got {float(s)} (damping={float(lam):.3g})")
        nb = op.num_batches
        if sampling == "random":
            idx = jax.random.randint(k_idx, (repeats, depth), 0, nb, dtype=jnp.int32)
        else:
            idx = (jnp.arange(depth, dtype=jnp.int32)[None, :] + jnp.arange(repeats, dtype=jnp.int32)[:, None]) % nb
        rows = _gradient_rows(op) if row_space else None
        gram = None if rows is None else sum(jnp.tensordot(r, r, axes=(tuple(range(1, r.ndim)),) * 2)
                                              for r in jax.tree.leaves(rows)).astype(lam.dtype)
        return LissaState(
            op, lam, jnp.asarray(s, lam.dtype), idx, jnp.asarray(max_growth, lam.dtype), op.spec, sampling == "full",
            gram,
        )

    return IHVPSolver("lissa", fit, _lissa_solve, _failure)
