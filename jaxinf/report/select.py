"""The answer of an attribution: each query's top-k and bottom-k training rows, with per-token contributions.

Sign (as `jaxinf.attribution`): score(q, n) = <d_q, g_n>, larger = row n helps query q more (lowers its loss);
the lowest scores are the most harmful rows. For every method whose score is such an inner product the token
contributions of a training row b are

    s[b, t] = <grad l_bt, d_q>,   l_bt = the row's per-token losses (`attribution.per_token_losses`),

so sum_t s[b, t] = <grad L_b, d_q> = score(q, b) (Grosse et al. 2023). d_q is the method's preconditioned
query gradient (`study.METHODS[name].directions(inputs)`: P g_q for the iHVP and K-FAC methods, g_q for grad_dot);
grad_cos divides by ||g_q|| ||g_b|| (the record's unit_train); TracIn sums the contributions over its checkpoints
(w_c, g_q(theta_c), the record's checkpoints_fn). RepSim is not a gradient inner product: its rows carry no token
contributions (the record's per_token_note says why).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import chex
import jax
import numpy as np

from jaxinf import attribution, study
from jaxinf.progress import stage


def top_bottom(scores: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([M, k] indices of the k largest scores per row, best first; [M, k] of the k lowest, lowest first)."""
    scores = np.asarray(scores)
    chex.assert_rank(scores, 2)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (attribution.top_k_indices(scores, k, seed=seed), attribution.top_k_indices(-scores, k, seed=seed))


def method_directions(name: str, inputs: study.StudyInputs) -> Optional[np.ndarray]:
    """d_q [M, D] with score(q, n) = <d_q, g_n> for `inputs.test_grads` (grad_cos: g_q / ||g_q||), or None if the
    method has no such d. The method's fitted solver state is the study's (`study.StudyInputs._derived`)."""
    return study.METHODS[name].directions(inputs)


def scores_and_directions(name: str, inputs: study.StudyInputs) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(scores [M, N] as the study computes them, directions or None); the preconditioner is fitted once."""
    if name not in study.METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(study.METHODS)}")
    method = study.METHODS[name]
    scores, _, directions = method.run(inputs)
    if directions is None:  # a method that scores its own way (exact's push-through, grad_cos, TracIn, RepSim)
        directions = method.directions(inputs)
    return scores, directions


def _batch(tokenized, rows: Sequence[int]) -> dict:
    sel = tokenized.select(np.asarray(rows, np.int64))
    return {k: np.asarray(getattr(sel, k)) for k in ("input_ids", "attention_mask", "loss_mask")}


def token_scores(name: str, inputs: study.StudyInputs, directions: Optional[np.ndarray], query: int,
                 rows: Sequence[int]) -> Optional[np.ndarray]:
    """s [R, T]: contribution of each token of training rows `rows` to score(query, row); None for RepSim.

    Each row sums to the method's score (module doc). Runs in the adapters' dtype.
    """
    method = study.METHODS[name]
    rows = [int(r) for r in rows]
    batch = _batch(inputs.train, rows)
    t = batch["input_ids"].shape[1]
    if method.checkpoints_fn is not None:
        out = np.zeros((len(rows), t))
        qdata = inputs.test.select(np.array([query]))
        for trainable, w, precond in method.checkpoints_fn(inputs):
            if w == 0.0:
                continue
            # the study's chunk size: the query is padded to the gradient program TracIn already compiled
            gq = attribution.per_example_gradients(inputs.fns, trainable, qdata, chunk_size=inputs.preset.grad_chunk)[0]
            if precond is not None:  # <P g_q, g_n> split over g_n's tokens
                gq = gq * attribution.flatten_rows(jax.tree.map(lambda x: x[None], precond))[0]
            out += w * attribution.per_token_scores(inputs.fns, trainable, batch, gq)
    elif directions is None:
        return None
    else:
        out = np.asarray(attribution.per_token_scores(inputs.fns, inputs.adapters, batch, directions[query]),
                         np.float64)
        if method.unit_train:
            g = np.asarray(attribution.flatten_rows(attribution.take_rows(inputs.train_grads, np.array(rows))),
                           np.float64)
            out = out / np.linalg.norm(g, axis=1, keepdims=True)
    chex.assert_shape(out, (len(rows), t))
    return out


def _pieces(tokenizer, ids: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def _row_entry(tokenizer, tokenized, n: int, text_rows: Sequence[dict], score: Optional[float],
               contributions: Optional[np.ndarray]) -> dict:
    keep = np.asarray(tokenized.attention_mask[n]) > 0
    ids = np.asarray(tokenized.input_ids[n])[keep]
    row = text_rows[n] if text_rows is not None else {}
    entry = {
        "index": int(n), "group": str(tokenized.groups[n]),
        "prompt": str(row.get("prompt", "")), "response": str(row.get("response", "")),
        "tokens": _pieces(tokenizer, ids),
        "target": [bool(x) for x in (np.asarray(tokenized.loss_mask[n])[keep] > 0)],
        "prompt_end": int(tokenized.prompt_end[n]),
    }
    if score is not None:
        entry["score"] = float(score)
    if contributions is not None:
        c = np.asarray(contributions)[keep]
        entry["token_scores"] = [float(x) for x in c]
        entry["token_sum"] = float(np.sum(contributions))
    return entry


def explain(methods: Sequence[str], inputs: study.StudyInputs, *, tokenizer, train_rows: Sequence[dict],
            test_rows: Sequence[dict], k: int = 5, queries: Optional[Sequence[int]] = None,
            scores: Optional[dict] = None, per_token: bool = True, seed: int = 0,
            progress: bool = True) -> list[dict]:
    """Explanations of test rows `queries` (default: all of `inputs.test`), one dict per query:

    {"query": {index, group, prompt, response, tokens, target}, "methods": {name: {"top": [row], "bottom":
    [row], "per_token": bool, "note": str}}}, a row = {index, group, score, prompt, response, tokens, target,
    token_scores, token_sum}. `scores` ({name: [M, N]}) reuses score matrices already computed (e.g. the
    study's cache); otherwise each method runs here. `per_token=False` skips the token contributions.
    """
    m = attribution.num_rows(inputs.test_grads)
    queries = list(range(m)) if queries is None else [int(q) for q in queries]
    if not queries or min(queries) < 0 or max(queries) >= m:
        raise ValueError(f"queries must be test row indices in [0, {m}), got {queries}")
    out = [{"query": _row_entry(tokenizer, inputs.test, q, test_rows, None, None), "methods": {}} for q in queries]
    # the methods run on the chosen queries only (a preconditioner applied to a few vectors, not to every test row)
    sel = np.asarray(queries)
    sub = dataclasses.replace(inputs, test=inputs.test.select(sel),
                              test_grads=attribution.take_rows(inputs.test_grads, sel))
    n = attribution.num_rows(inputs.train_grads)
    for name in methods:
        with stage(f"explain {name}", total=len(queries), unit="query", enabled=progress) as bar:
            if scores is not None and name in scores:
                chex.assert_shape(scores[name], (m, n))
                s = np.asarray(scores[name], np.float64)[sel]
                directions = method_directions(name, sub) if per_token else None
            else:
                s, directions = scores_and_directions(name, sub)
            chex.assert_shape(s, (len(queries), n))
            top, bottom = top_bottom(s, k, seed=seed)
            for i in range(len(queries)):
                rows = list(top[i]) + list(bottom[i])
                contrib = token_scores(name, sub, directions, i, rows) if per_token else None
                entries = [_row_entry(tokenizer, inputs.train, r, train_rows, s[i, r],
                                      None if contrib is None else contrib[j]) for j, r in enumerate(rows)]
                out[i]["methods"][name] = drop_imprecise({
                    "top": entries[:len(top[i])], "bottom": entries[len(top[i]):],
                    "per_token": contrib is not None,
                    "note": study.METHODS[name].per_token_note if per_token else
                            "per-token contributions not computed",
                })
                bar.update(1)
    return out


def drop_imprecise(result: dict, rtol: float = 1e-3) -> dict:
    """Drop a method's token contributions when any shown row's sum misses its score by more than rtol.

    The identity sum_t s_t = score is exact, but with small damping d_q = P g_q is dominated by directions
    orthogonal to every training gradient: single tokens then carry large contributions that cancel in the sum,
    and a float32 model loses the sum. Shading such rows would mislead; the note says why they have none.
    """
    rows = result["top"] + result["bottom"]
    worst = max((abs(r["token_sum"] - r["score"]) / max(abs(r["score"]), 1e-30) for r in rows if "token_sum" in r),
                default=0.0)
    if worst <= rtol:
        return result
    for r in rows:
        r.pop("token_scores", None)
        r.pop("token_sum", None)
    note = (f"token contributions cancel beyond the model's precision (a row's sum missed its score by "
            f"{100 * worst:.3g}%): not shown; load the model in float64 for exact token shares")
    return dict(result, per_token=False, note=note)


def top_rows_table(scores: np.ndarray, train_groups: Sequence[str], k: int, *, seed: int = 0) -> list[dict]:
    """Per test row: its k highest and k lowest training rows as [{"index", "group", "score"}] (for results.json)."""
    scores = np.asarray(scores, np.float64)
    top, bottom = top_bottom(scores, k, seed=seed)

    def rows(q, idx):
        return [{"index": int(n), "group": str(train_groups[n]), "score": float(scores[q, n])} for n in idx]

    return [{"top": rows(q, top[q]), "bottom": rows(q, bottom[q])} for q in range(scores.shape[0])]

