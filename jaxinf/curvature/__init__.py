"""Curvature operators (Hessian, Gauss-Newton, empirical Fisher) on parameter pytrees.

Public API:
  CurvatureOperator, hessian_operator, ggn_operator, fisher_operator, raw_hvp
  dense_matrix, dense_hessian, dense_ggn, dense_fisher, dense_per_example_grads
  largest_eigenvalue, hutchinson_trace, fisher_trace, gradient_trace, power_iteration_flat
  toy (tiny test problems)
  TreeSpec and tree_* vector helpers
"""

from jaxinf.curvature._tree import (
    TreeSpec,
    stack_trees,
    tree_add,
    tree_all_finite,
    tree_axpy,
    tree_norm,
    tree_scale,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)
from jaxinf.curvature.dense import (
    dense_fisher,
    dense_ggn,
    dense_hessian,
    dense_matrix,
    dense_per_example_grads,
)
from jaxinf.curvature.operators import (
    FISHER,
    GGN,
    HESSIAN,
    CurvatureOperator,
    fisher_operator,
    ggn_operator,
    hessian_operator,
    raw_hvp,
)
from jaxinf.curvature.spectrum import (fisher_trace, gradient_trace, hutchinson_trace, largest_eigenvalue,
                                      power_iteration_flat)

__all__ = [
    "CurvatureOperator",
    "FISHER",
    "GGN",
    "HESSIAN",
    "TreeSpec",
    "dense_fisher",
    "dense_ggn",
    "dense_hessian",
    "dense_matrix",
    "dense_per_example_grads",
    "fisher_operator",
    "fisher_trace",
    "gradient_trace",
    "ggn_operator",
    "hessian_operator",
    "hutchinson_trace",
    "largest_eigenvalue",
    "power_iteration_flat",
    "raw_hvp",
    "stack_trees",
    "tree_add",
    "tree_all_finite",
    "tree_axpy",
    "tree_norm",
    "tree_scale",
    "tree_sub",
    "tree_vdot",
    "tree_zeros_like",
]

# K-FAC / EK-FAC: layer capture (jaxinf.curvature.capture.capture) and factors (jaxinf.curvature.kfac).
from jaxinf.curvature import capture, kfac  # noqa: E402
from jaxinf.curvature.capture import Layer, lm_layers, restrict  # noqa: E402
from jaxinf.curvature.kfac import FitInterrupted, KFACFactors, fit_factors, load_factors, save_factors  # noqa: E402

__all__ += ["FitInterrupted", "KFACFactors", "Layer", "capture", "fit_factors",
            "kfac", "lm_layers", "load_factors", "restrict", "save_factors"]
