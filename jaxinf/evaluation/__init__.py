"""Evaluation of attribution scores: Acc / Cover (the study's metrics), ROC-AUC, recall@k, bootstrap CIs."""

from jaxinf.evaluation.metrics import (
    TIES,
    accuracy,
    bootstrap_ci,
    cover,
    evaluate,
    expected_hits,
    harmful_evaluation,
    harmful_labels,
    per_row_metrics,
    recall_at_k,
    roc_auc,
    roc_auc_rows,
)
