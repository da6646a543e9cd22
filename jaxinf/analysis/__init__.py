"""Measurements for the study's three explanations of why influence fails (issue 11).

* `change`: how much LoRA adapters moved (Frobenius norms of the merged updates (alpha/r) A B) and how much the
  model's behaviour changed (refusal / attack success, label accuracy of greedy answers).
* `spectrum`: curvature of the fine-tuned model (Hessian / GGN / Fisher operators on the adapters, with the frozen
  base weights passed as data) and its extreme eigenvalues and negative share by Lanczos quadrature.
"""

from jaxinf.analysis.change import (
    REFUSAL_MARKERS,
    adapter_deltas,
    attack_success,
    correlations,
    example_losses,
    is_refusal,
    label_accuracy,
    parameter_change,
    parameter_distance,
)
from jaxinf.analysis.spectrum import lanczos_spectrum, model_operator

__all__ = ["REFUSAL_MARKERS", "adapter_deltas", "attack_success", "correlations", "example_losses", "is_refusal", "label_accuracy",
           "lanczos_spectrum", "model_operator", "parameter_change", "parameter_distance"]
