"""Inverse-Hessian(-like) vector products behind one protocol.

Every solver factory returns an ``IHVPSolver``:

    solver = jaxinf.ihvp.cg(damping=1e-3, tol=1e-8, maxiter=200)
    state = solver.fit(operator, key)        # operator: jaxinf.curvature.CurvatureOperator
    x = solver.apply(state, v)               # ~ (C + lambda I)^{-1} v, v a parameter pytree
    xs = solver.apply_batched(state, vs)     # leading query axis, via vmap
    x, info = solver.solve(state, v)         # pure/traceable core

Solvers: direct, woodbury, cg, lissa, lanczos, arnoldi, datainf, identity.
Damping: a float (absolute) or ``absolute(a)`` / ``relative(fraction)``.
"""

from jaxinf.ihvp.arnoldi import arnoldi, arnoldi_hessenberg
from jaxinf.ihvp.base import IHVPSolver, SolverFailedError
from jaxinf.ihvp.cg import CGState, cg
from jaxinf.ihvp.damping import (Damping, absolute, as_damping, block_lambda, operator_damping, relative,
                                 relative_lambda, resolve_damping)
from jaxinf.ihvp.datainf import DataInfState, datainf
from jaxinf.ihvp.direct import DirectState, direct, fit_matrix
from jaxinf.ihvp.identity import IdentityState, identity
from jaxinf.ihvp.lanczos import lanczos, lanczos_tridiagonal
from jaxinf.ihvp.layers import LayerPartition
from jaxinf.ihvp.lissa import LissaState, lissa
from jaxinf.ihvp.lowrank import LowRankState, transform_eigenvalues
from jaxinf.ihvp.woodbury import WoodburyState, layer_gradients, woodbury

__all__ = [
    "CGState",
    "DataInfState",
    "Damping",
    "DirectState",
    "IHVPSolver",
    "IdentityState",
    "LayerPartition",
    "LissaState",
    "LowRankState",
    "SolverFailedError",
    "WoodburyState",
    "absolute",
    "arnoldi",
    "arnoldi_hessenberg",
    "as_damping",
    "block_lambda",
    "cg",
    "datainf",
    "direct",
    "fit_matrix",
    "identity",
    "lanczos",
    "lanczos_tridiagonal",
    "layer_gradients",
    "lissa",
    "operator_damping",
    "relative",
    "relative_lambda",
    "resolve_damping",
    "transform_eigenvalues",
    "woodbury",
]

# K-FAC / EK-FAC preconditioners (fit from LMFunctions + batches, or from jaxinf.curvature.kfac factors).
from jaxinf.ihvp.ekfac import KroneckerState, ekfac, kfac, state_from_factors  # noqa: E402

__all__ += ["KroneckerState", "ekfac", "kfac", "state_from_factors"]
