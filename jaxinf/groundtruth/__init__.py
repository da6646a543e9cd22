"""Ground truth for attribution: what the fine-tuning run actually does when its training data change.

  trajectory  exact derivative of the real fine-tuning w.r.t. per-row weights (`WeightedRun`, one lax.scan)
  retrain     leave-one-out and LDS subsets by retraining with 0/1 row weights (vmapped, cached)
  pbrf        the proximal Bregman response function (KL to the fine-tuned model + proximity, optax L-BFGS)
  agreement   LDS and per-query rank agreement of a method's scores with each ground truth
  study       all of them for a study run, cached in a directory, and `agreement_with` for every method

Sign everywhere: larger score = the training row helps the query more (lowers its loss).
"""

from jaxinf.groundtruth.agreement import lds, lds_per_query, rank_agreement, sign_agreement
from jaxinf.groundtruth.pbrf import pbrf_scores
from jaxinf.groundtruth.retrain import lds_masks, loo_scores, retrain_losses
from jaxinf.groundtruth.trajectory import WeightedRun, trajectory_influence, trajectory_influence_steps

__all__ = ["WeightedRun", "lds", "lds_masks", "lds_per_query", "loo_scores", "pbrf_scores", "rank_agreement",
           "retrain_losses", "sign_agreement", "trajectory_influence", "trajectory_influence_steps"]
