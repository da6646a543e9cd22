"""Damping lambda for (C + lambda I)^{-1}: absolute, or relative to the mean eigenvalue.

* absolute(a):  lambda = a.
* relative(r):  lambda = r * tr(C_l) / d_l, i.e. r times the mean eigenvalue of
  the block being inverted (the whole operator for global solvers; each layer
  for the block-diagonal ones -- Woodbury, DataInf).  For the empirical Fisher
  of layer l, tr(F_l)/d_l = mean_i ||g_i,l||^2 / d_l, so relative(0.1) is
  DataInf's default lambda_l = 0.1 * mean_i ||g_i,l||^2 / d_l.

A bare float passed where a damping is expected means absolute(float).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax.numpy as jnp

from jaxinf.curvature.operators import FISHER
from jaxinf.curvature.spectrum import fisher_trace, gradient_trace, hutchinson_trace


def relative_lambda(fraction, trace, dim):
    """lambda = fraction * trace / dim: `fraction` times the mean eigenvalue of a block of dimension `dim`. The one
    place the relative rule is written (Python floats, numpy or jax, as given)."""
    return fraction * trace / dim


def block_lambda(fraction, grads):
    """lambda_l = fraction * tr(F_l) / d_l = fraction * mean_i ||g_i,l||^2 / d_l for one block's per-example
    gradients `grads` [N, d_l] (numpy or jax, in their dtype); fraction 0.1 is DataInf's default."""
    return relative_lambda(fraction, gradient_trace(grads), grads.shape[1])


@dataclasses.dataclass(frozen=True)
class Damping:
    """lambda = value (relative=False) or value * trace / dim (relative=True)."""

    value: float
    relative: bool = False

    def __post_init__(self):
        if not self.value >= 0:
            raise ValueError(f"damping value must be >= 0, got {self.value}")

    def resolve(self, trace=None, dim=None):
        """The numeric lambda; `trace` and `dim` are needed only for relative damping."""
        if not self.relative:
            return jnp.asarray(self.value)
        if trace is None or dim is None:
            raise ValueError("relative damping needs the trace and dimension of the block")
        return relative_lambda(self.value, jnp.asarray(trace), dim)

    def __str__(self):
        return f"relative({self.value})" if self.relative else f"absolute({self.value})"


DampingLike = Union[Damping, float, int]


def absolute(value: float) -> Damping:
    """lambda = value."""
    return Damping(float(value), relative=False)


def relative(fraction: float) -> Damping:
    """lambda = fraction * (mean eigenvalue) = fraction * trace / dim, per block."""
    return Damping(float(fraction), relative=True)


def as_damping(d: DampingLike) -> Damping:
    """Normalise a float (absolute) or a Damping."""
    if isinstance(d, Damping):
        return d
    if isinstance(d, (int, float)):
        return absolute(float(d))
    raise TypeError(f"damping must be a float or a Damping, got {type(d).__name__}")


def resolve_damping(d: DampingLike, trace=None, dim=None):
    """Shorthand for as_damping(d).resolve(trace, dim)."""
    return as_damping(d).resolve(trace, dim)


def operator_damping(damping: DampingLike, op, key=None, trace_probes: int = 16, solver: str = "solver"):
    """lambda for a solver acting on the whole parameter vector of a CurvatureOperator.

    Relative damping uses tr(C)/n: exact for the empirical Fisher
    (tr F = mean_i ||g_i||^2, one pass of per-example gradients), otherwise a
    Hutchinson estimate with ``trace_probes`` Rademacher probes (needs a key).
    """
    damping = as_damping(damping)
    dtype = op.spec.dtype
    if not damping.relative:
        return jnp.asarray(damping.value, dtype)
    if op.kind == FISHER:
        return jnp.asarray(damping.resolve(fisher_trace(op), op.dim), dtype)
    if key is None:
        raise ValueError(f"{solver}: relative damping needs a PRNG key at fit (Hutchinson trace estimate)")
    tr = hutchinson_trace(op, key, num_probes=trace_probes)
    if not float(tr) > 0:  # an indefinite Hessian can have tr <= 0: relative damping would be <= 0
        raise ValueError(f"{solver}: relative damping {damping} needs tr(C) > 0, but the Hutchinson estimate of the "
                         f"{op.kind} trace is {float(tr):.4g}; use an absolute damping, or a PSD curvature (GGN/Fisher)")
    return jnp.asarray(damping.resolve(tr, op.dim), dtype)
