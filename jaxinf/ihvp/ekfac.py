"""K-FAC and EK-FAC preconditioners: (Kronecker-factored Fisher + lambda_l I)^{-1}, block-diagonal over layers.

For each linear layer l (``jaxinf.curvature.capture.Layer``; LoRA A and B are separate layers) the block of the
parameter vector is the gradient-shaped matrix V_l [rows, d_out] (kernel rows, then the bias row), and

    x_l = Q_A [ (Q_A^T V_l Q_S) / (Lambda_l + lambda_l) ] Q_S^T                (elementwise division)

with Q_A, Q_S the eigenvectors of the factors A, S (``jaxinf.curvature.kfac``) and
  * kfac:  Lambda_l[i, o] = lambda_A[i] lambda_S[o]      -> exactly (A (x) S + lambda_l I)^{-1} vec(V_l),
  * ekfac: Lambda_l[i, o] = (1/N) sum_n (Q_A^T G_n Q_S)[i, o]^2   (the eigenvalue-corrected diagonal).
Damping lambda_l: absolute, or relative(r) = r * mean(Lambda_l) (r times the mean eigenvalue of the layer's
Kronecker-factored block). Layers not chosen are not part of the preconditioned vector: the solver's vectors are
the trainable pytree restricted to the chosen layers (``capture.restrict``; all of it for LoRA adapters).

    solver = ekfac(damping=relative(0.1), fisher="empirical")
    state = solver.fit(fns, trainable, batches)           # or solver.fit(factors) with fitted KFACFactors
    x = solver.apply(state, v)                             # v = restrict(trainable-shaped vector, layers)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.curvature._tree import TreeSpec
from jaxinf.curvature.capture import layers_to_tree, restrict
from jaxinf.curvature.kfac import EMPIRICAL, KFACFactors, fit_factors
from jaxinf.ihvp.base import IHVPSolver, state_dataclass
from jaxinf.ihvp.damping import Damping, DampingLike, as_damping

PyTree = Any


@state_dataclass(data_fields=["q_a", "q_s", "eigvals", "dampings"], meta_fields=["layers", "spec", "kind"])
class KroneckerState:
    q_a: tuple  # per layer [rows, rows]
    q_s: tuple  # per layer [d_out, d_out]
    eigvals: tuple  # per layer Lambda_l [rows, d_out]
    dampings: jax.Array  # [L]
    layers: tuple  # Layer per block
    spec: TreeSpec  # of restrict(trainable, layers)
    kind: str  # "kfac" | "ekfac"


def precondition_matrices(state: KroneckerState, mats) -> list:
    """Per-layer x_l for per-layer matrices V_l [..., rows, d_out] (any leading axes, e.g. queries)."""
    out = []
    for l, v in enumerate(mats):
        qa, qs, lam = state.q_a[l], state.q_s[l], state.eigvals[l]
        rot = jnp.einsum("ij,...io,op->...jp", qa, v.astype(qa.dtype), qs)
        rot = rot / (lam + state.dampings[l])
        out.append(jnp.einsum("ij,...jp,op->...io", qa, rot, qs))
    return out


def _solve(state: KroneckerState, v):
    mats = [layer.matrix(v) for layer in state.layers]
    xs = precondition_matrices(state, mats)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    return layers_to_tree(state.layers, xs, like=v), {"ok": finite}


def _failure(name, state, info):
    return (f"{name}: non-finite result (per-layer dampings min={float(np.min(state.dampings)):.3g}); "
            "increase the damping (relative damping needs a nonzero curvature)")


def _spec_for(layers, trainable, param_dtype) -> TreeSpec:
    if trainable is not None:
        return TreeSpec.of(restrict(trainable, layers))
    dtype = jnp.dtype(param_dtype)
    mats = [jnp.zeros((l.rows, l.d_out), dtype) for l in layers]
    return TreeSpec.of(layers_to_tree(layers, mats))


def state_from_factors(factors: KFACFactors, kind: str, damping: DampingLike, trainable: Optional[PyTree] = None,
                       dtype=None) -> KroneckerState:
    """KroneckerState for "kfac" or "ekfac" from fitted factors; arrays in ``dtype`` (default: the parameter dtype
    promoted to at least float32). damping: absolute / relative, or {layer name: absolute lambda_l}."""
    if isinstance(damping, Mapping):
        missing = [l.name for l in factors.layers if l.name not in damping]
        if missing:
            raise ValueError(f"{kind}: per-layer damping has no value for layers {missing}")
    else:
        damping = as_damping(damping)
    if kind == "ekfac" and factors.corrected is None:
        raise ValueError("ekfac needs eigenvalue-corrected factors: fit them with correct=True")
    spec = _spec_for(factors.layers, trainable, factors.param_dtype)
    dtype = dtype or jnp.promote_types(spec.dtype, jnp.float32)
    q_a, q_s, lams, damps = [], [], [], []
    for j in range(len(factors.layers)):
        lam = factors.corrected[j] if kind == "ekfac" else factors.kfac_eigenvalues(j)
        lam = np.maximum(lam, 0.0)  # rounding can leave tiny negative eigenvalues of PSD factors
        damps.append(float(damping[factors.layers[j].name]) if isinstance(damping, Mapping)
                     else float(damping.resolve(lam.sum(), lam.size)))
        q_a.append(jnp.asarray(factors.a_eig[j][1], dtype))
        q_s.append(jnp.asarray(factors.s_eig[j][1], dtype))
        lams.append(jnp.asarray(lam, dtype))
    singular = [l.name for l, lam, d in zip(factors.layers, lams, damps) if not float(jnp.min(lam)) + d > 0]
    if singular:
        raise ValueError(f"{kind}: Lambda + lambda has a zero in layers {singular} (damping {damping}); a layer with "
                         "zero curvature has zero relative damping: use an absolute damping or drop those layers")
    return KroneckerState(tuple(q_a), tuple(q_s), tuple(lams), jnp.asarray(damps, dtype), tuple(factors.layers),
                          spec, kind)


def _make(kind: str, damping, layers, fisher, num_samples, directory, checkpoint_every) -> IHVPSolver:
    damping = as_damping(damping)

    def fit(source, trainable=None, batches=None, key=None) -> KroneckerState:
        """fit(KFACFactors[, trainable]) or fit(fns: LMFunctions, trainable, batches, key=None)."""
        if isinstance(source, KFACFactors):
            return state_from_factors(source, kind, damping, trainable)
        if trainable is None or batches is None:
            raise TypeError(f"{kind}.fit takes fitted KFACFactors, or (fns, trainable, batches[, key])")
        factors = fit_factors(source, trainable, batches, layers=layers, fisher=fisher, key=key,
                              num_samples=num_samples, correct=(kind == "ekfac"), directory=directory,
                              checkpoint_every=checkpoint_every)
        return state_from_factors(factors, kind, damping, trainable)

    return IHVPSolver(kind, fit, _solve, _failure)


def kfac(damping: DampingLike = Damping(0.1, relative=True), *, layers=None, fisher: str = EMPIRICAL,
         num_samples: int = 1, directory: Optional[str] = None, checkpoint_every: int = 8) -> IHVPSolver:
    """(A_l (x) S_l + lambda_l I)^{-1} per layer; see the module docstring and ``jaxinf.curvature.kfac``."""
    return _make("kfac", damping, layers, fisher, num_samples, directory, checkpoint_every)


def ekfac(damping: DampingLike = Damping(0.1, relative=True), *, layers=None, fisher: str = EMPIRICAL,
          num_samples: int = 1, directory: Optional[str] = None, checkpoint_every: int = 8) -> IHVPSolver:
    """Eigenvalue-corrected K-FAC: Q diag(1 / (Lambda_l + lambda_l)) Q^T per layer, Q = Q_A (x) Q_S."""
    return _make("ekfac", damping, layers, fisher, num_samples, directory, checkpoint_every)
