"""Attribution: per-example gradients, influence scores, query batching, TF-IDF filtering, baselines.

Sign convention. For a test (query) example q and a training example n,

    score(q, n) = <grad L_q, P grad L_n>,    P ~ (C + lambda I)^{-1}   (C: Hessian / GGN / Fisher, symmetric),

and LARGER = MORE HELPFUL / INFLUENTIAL. Up-weighting training example n by eps in the objective
(1/N) sum_i L_i moves the optimum by d theta / d eps = -(1/N) H^{-1} grad L_n, so the test loss changes by
dL_q / d eps = -(1/N) <grad L_q, H^{-1} grad L_n>: score(q, n) = -N dL_q / d eps (minus the first-order change
in test loss, times N). Gradient matching is P = I (score = <grad L_q, grad L_n>). Scores are computed as
<P grad L_q, grad L_n> (P symmetric): queries are preconditioned once, training gradients streamed.

Layout: a gradient is a parameter pytree; stacked gradients have a leading example axis; flat gradient
matrices [N, D] ravel each pytree in `jax.tree.leaves` order (as `jax.flatten_util.ravel_pytree`).
"""

from jaxinf.attribution.baselines import (
    POOLINGS,
    adam_preconditioners,
    adam_tracin_scores,
    cosine_matrix,
    gradient_cosine,
    gradient_dot,
    hidden_representations,
    load_trainables,
    read_convergence_log,
    repsim_scores,
    tracin_checkpoints,
    tracin_lr_weights,
    tracin_scores,
)
from jaxinf.attribution.gradients import (
    LazyGradients,
    as_matrix,
    flatten_rows,
    iter_per_example_gradients,
    num_rows,
    per_example_gradients,
    take_rows,
    unflatten_rows,
)
from jaxinf.attribution.query_batching import (
    LowRankQueries,
    QueryBatchedScores,
    low_rank_queries,
    low_rank_scores,
    query_batched_scores,
    rescore_top_k,
)
from jaxinf.attribution.scores import (
    candidate_scores,
    chunk_path,
    load_scores,
    pairwise_scores,
    per_token_losses,
    per_token_scores,
    precondition_queries,
    self_influence,
    top_k_indices,
)
from jaxinf.attribution.tfidf import TfidfIndex, row_texts, tfidf_candidates, token_id_docs, word_tokens
