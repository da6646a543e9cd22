"""The empirical Fisher of cached per-example gradients, as an ordinary `CurvatureOperator`.

Given stacked gradients G (leaves [N, ...], one row g_i per training example), define the linear per-example
"losses" l_i(p) = <g_i, p>. Their gradients are exactly g_i, so the Fisher operator of these losses is

    F v = (1/N) sum_i g_i <g_i, v> = G^T G v / N,

at a cost of two passes over G (no model forward). Every Fisher-based solver (LiSSA, CG, Lanczos, Arnoldi,
DataInf, Woodbury) then runs on LoRA-scale gradients computed once, which is what a CPU can afford.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.curvature.operators import CurvatureOperator, fisher_operator


def linear_example_losses(params: Any, grads: Any) -> jax.Array:
    """l_i(p) = <g_i, p> for every row i of the stacked pytree `grads`: shape [N]."""
    terms = jax.tree.map(lambda g, p: jnp.tensordot(g, p, axes=p.ndim), grads, params)
    return sum(jax.tree.leaves(terms))


def gradient_fisher_operator(grads: Any) -> CurvatureOperator:
    """F = (1/N) G^T G from stacked per-example gradients `grads` (leaves [N, ...]); one batch of N rows."""
    like = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    return fisher_operator(linear_example_losses, like, [jax.tree.map(jnp.asarray, grads)])
