"""Curvature of a LoRA-fine-tuned LM at its adapters, and its spectrum by Lanczos (the study's second explanation).

`model_operator(kind, fns, adapters, batches)` is `jaxinf.curvature`'s Hessian / Gauss-Newton / empirical Fisher
operator of the mean training loss on the given batches, as a function of the adapters. The frozen base weights
travel as the operator's shared data (`CurvatureOperator.shared`, key "base"; held once, not per batch) instead of
being closed over, so the compiled products take them as an argument (closed-over weights become constants that
XLA folds: slow for SmolLM2's 49152 x 576 embedding), and one compilation serves every checkpoint; the study's
`--curvature=ggn|hessian` operators are built here too.

`lanczos_spectrum(op, key, num_iters, probes)` runs m Lanczos steps (full re-orthogonalisation,
`jaxinf.ihvp.lanczos_tridiagonal`) from `probes` random starts. Extreme Ritz values bound the spectrum from
inside: theta_max <= lambda_max and theta_min >= lambda_min, and converge to them first. Stochastic Lanczos
quadrature (Ubaru et al. 2017) turns each run into a quadrature of the spectral density: with T = S diag(theta)
S^T, the weights S[0, j]^2 put mass on theta_j so that E[sum_j S[0,j]^2 f(theta_j)] ~ (1/n) sum_i f(lambda_i);
`negative_share` is that estimate of the fraction of eigenvalues below zero (f = 1[lambda < 0]) and
`negative_mass` of sum_{lambda<0} |lambda| / sum_i |lambda_i|. With LoRA most of the n eigenvalues sit in a
near-null bulk (rank-limited curvature of 230k parameters from a few rows); one Ritz value near 0 then carries
almost all the quadrature weight, and its sign (often a rounding-level -1e-4) decides `negative_share`. Read
`negative_mass` (the null bulk contributes ~0 to it) and the extreme Ritz values; `negative_share` says little.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.curvature.operators import FISHER, GGN, HESSIAN, CurvatureOperator, fisher_operator, ggn_operator, \
    hessian_operator

KINDS = (FISHER, GGN, HESSIAN)


@dataclasses.dataclass(frozen=True)
class _LossFn:
    """(p, b) -> fns.<method>(p, b), the frozen base weights read from b["base"] when `base` (else fns as it is).

    A value, not a closure: two made from the same `fns` (compared by identity) and method are equal and hash
    alike, so operators rebuilt for the same model (each checkpoint, each study stage) have equal static loss
    functions and reuse one compilation, without a cache that would keep every model alive."""

    fns: Any
    method: str
    base: bool = True

    def __call__(self, p, b):
        return getattr(self.fns.with_base(b["base"]) if self.base else self.fns, self.method)(p, b)


def _operator_fns(fns, kind: str) -> tuple:
    """Loss functions of `kind` that read the frozen base weights from batch["base"] (equal for the same fns)."""
    if kind == HESSIAN:
        return (_LossFn(fns, "loss"),)
    if kind == GGN:
        return (_LossFn(fns, "logits"), _LossFn(fns, "output_loss", base=False))
    if kind == FISHER:
        return (_LossFn(fns, "per_example_loss"),)
    raise ValueError(f"curvature kind must be one of {KINDS}, got {kind!r}")


def model_operator(kind: str, fns, adapters, batches: list) -> CurvatureOperator:
    """C v = (1/B) sum_b C_b v, C in {hessian, ggn, fisher} of the LM loss w.r.t. the adapters, on `batches`
    (a list of dicts with input_ids / attention_mask / loss_mask [m, T], equal shapes)."""
    if not isinstance(batches, list) or not batches:
        raise ValueError("batches must be a non-empty list of batch dicts with equal shapes")
    data = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    shared = {"base": fns.model.params}  # held once, an argument of the compiled products (never a constant)
    f = _operator_fns(fns, kind)
    if kind == HESSIAN:
        return hessian_operator(f[0], adapters, data, shared)
    if kind == GGN:
        return ggn_operator(f[0], f[1], adapters, data, shared)
    return fisher_operator(f[0], adapters, data, shared)


def lanczos_spectrum(op: CurvatureOperator, key: jax.Array, num_iters: int = 16, probes: int = 1) -> dict:
    """Extreme Ritz values and quadrature estimates of the spectrum of C (see module docstring).

    Returns {"max", "min" (extreme Ritz values over probes), "ritz" (per probe, sorted), "negative_share",
    "negative_mass", "products" (C-products used), "dim"}.
    """
    from jaxinf.ihvp.lanczos import lanczos_tridiagonal

    if num_iters < 2 or probes < 1:
        raise ValueError(f"lanczos_spectrum needs num_iters >= 2 and probes >= 1, got {num_iters}, {probes}")
    m = min(int(num_iters), op.dim)
    ritz, share, mass = [], [], []
    for i in range(probes):
        _, alpha, beta = lanczos_tridiagonal(op, jax.random.fold_in(key, i), m)
        alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
        t = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
        theta, s = np.linalg.eigh(t)
        w = s[0] ** 2
        ritz.append(theta.tolist())
        share.append(float(np.sum(w[theta < 0])))
        absw = np.sum(w * np.abs(theta))
        mass.append(float(np.sum(w[theta < 0] * np.abs(theta[theta < 0])) / absw) if absw > 0 else 0.0)
    return {"max": float(max(r[-1] for r in ritz)), "min": float(min(r[0] for r in ritz)), "ritz": ritz,
            "negative_share": float(np.mean(share)), "negative_mass": float(np.mean(mass)),
            "products": m * probes, "dim": int(op.dim)}
