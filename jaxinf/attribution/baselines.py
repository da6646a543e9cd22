"""Baselines: gradient dot product / cosine, TracIn over checkpoints, representation similarity (RepSim).

* gradient matching:  s(q, n) = <g_q, g_n>            (P = I; the study's "gradient match" baseline)
* gradient cosine:    s(q, n) = <g_q, g_n> / (||g_q|| ||g_n||)
* TracInCP (Pruthi et al. 2020):  s(q, n) = sum_c w_c <g_q(theta_c), g_n(theta_c)>, theta_c saved checkpoints and
  w_c the learning-rate mass the checkpoint stands for (`tracin_lr_weights`). TracIn's derivation assumes SGD;
  our fine-tuning uses AdamW, so this is the usual heuristic, not the exact first-order change.
* Adam-preconditioned TracIn (`adam_tracin_scores`): s(q, n) = sum_c w_c <g_q(theta_c), P_c g_n(theta_c)> with
  P_c = diag(1 / (sqrt(v_hat) + eps)) the per-coordinate step AdamW took at the end of checkpoint c's interval
  (the checkpoint the next one in the sum starts from, or the final one; v_hat = nu / (1 - b2^count) from the
  optimiser state saved there; the end, because the state at step 0 has no second moment yet). It follows the
  optimiser's path as the fine-tuning's own updates did, so it tells "a ground truth that rewards path-following
  methods" apart from "influence functions fail".
* RepSim: s(q, n) = cos(h_q, h_n), h = last hidden state (after the final norm) of the fine-tuned model at the
  final prompt token (`pooling="prompt_end"`, the study's choice) or averaged over the response tokens
  (`pooling="response_mean"`: positions t > prompt_end with attention_mask = 1).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.attribution.gradients import LazyGradients, as_matrix, batch_arrays, per_example_gradients
from jaxinf.attribution.scores import pairwise_scores
from jaxinf.models.loss import LMFunctions
from jaxinf.progress import stage

PyTree = Any


# ----------------------------------------------------------------------------------------------- gradient matching
def gradient_dot(query_grads, train, **kwargs) -> np.ndarray:
    """s[q, n] = <g_q, g_n> (kwargs go to `pairwise_scores`: chunk_size, out_dir, progress)."""
    return pairwise_scores(query_grads, train, **kwargs)


def gradient_cosine(query_grads, train, *, eps: float = 0.0, **kwargs) -> np.ndarray:
    """s[q, n] = <g_q, g_n> / (||g_q|| ||g_n||), streamed like `pairwise_scores`."""
    q = as_matrix(query_grads)
    xp = np if isinstance(q, np.ndarray) else jnp
    q = q / (xp.linalg.norm(q, axis=1, keepdims=True) + eps)
    return pairwise_scores(q, train, normalize_train=True, **kwargs)


# ----------------------------------------------------------------------------------------------- TracIn
def read_convergence_log(source: Union[str, Sequence[dict]]) -> list[dict]:
    """Rows of convergence.jsonl from a workdir, the file itself, or already-parsed rows."""
    if not isinstance(source, str):
        return list(source)
    path = os.path.join(source, "convergence.jsonl") if os.path.isdir(source) else source
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tracin_lr_weights(log: Union[str, Sequence[dict]], steps: Sequence[int], *, rule: str = "left") -> np.ndarray:
    """Learning-rate mass w_c of each checkpoint step c (sorted `steps` c_0 < c_1 < ... < c_K).

    In convergence.jsonl the row with "step": s carries lr_s, the learning rate of the update theta_{s-1} ->
    theta_s; the checkpoint at step c holds theta_c (step 0 = initial adapters).

      rule="left" (default; first-order Taylor expansion around the checkpoint that starts each interval):
          w_{c_i} = sum_{s = c_i + 1}^{c_{i+1}} lr_s,  and for the last checkpoint the sum runs to the last
          logged step (so a checkpoint at the final step gets 0).
      rule="right" (gradient at the end of the interval):
          w_{c_i} = sum_{s = c_{i-1} + 1}^{c_i} lr_s,  with c_{-1} = 0 (so a checkpoint at step 0 gets 0).

    Either way sum_c w_c = the total learning-rate mass of the logged steps covered by the checkpoints.
    """
    if rule not in ("left", "right"):
        raise ValueError(f"rule must be 'left' or 'right', got {rule!r}")
    rows = read_convergence_log(log)
    lr = {int(r["step"]): float(r["lr"]) for r in rows}
    if not lr:
        raise ValueError("the convergence log is empty")
    last = max(lr)
    steps = [int(s) for s in steps]
    if sorted(set(steps)) != steps:
        raise ValueError(f"checkpoint steps must be strictly increasing, got {steps}")

    def mass(a: int, b: int) -> float:  # sum of lr_s for a < s <= b
        missing = [s for s in range(a + 1, b + 1) if s not in lr]
        if missing:
            raise ValueError(f"the convergence log lacks steps {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return float(sum(lr[s] for s in range(a + 1, b + 1)))

    if rule == "left":
        ends = steps[1:] + [last]
        return np.array([mass(c, max(c, e)) for c, e in zip(steps, ends)])
    starts = [0] + steps[:-1]
    return np.array([mass(b, c) if c > 0 else 0.0 for b, c in zip(starts, steps)])


def load_trainables(workdir: str, like: PyTree, steps: Optional[Sequence[int]] = None) -> list[tuple[int, PyTree]]:
    """[(step, trainable)] restored from `workdir/checkpoints` (orbax; default: every step), cast like `like`."""
    import orbax.checkpoint as ocp

    from jaxinf.training import checkpoint_manager

    out = []
    with checkpoint_manager(workdir) as mngr:
        available = sorted(mngr.all_steps())
        steps = available if steps is None else [int(s) for s in steps]
        for s in steps:
            if s not in available:
                raise FileNotFoundError(f"no checkpoint at step {s} in {workdir}/checkpoints (have {available})")
            state = mngr.restore(s, args=ocp.args.StandardRestore())
            out.append((s, jax.tree.map(lambda l, x: jnp.asarray(x, l.dtype), like, state["trainable"])))
    return out


def tracin_checkpoints(workdir: str, like: PyTree, steps: Optional[Sequence[int]] = None, *,
                       rule: str = "left") -> list[tuple[PyTree, float]]:
    """[(trainable_c, w_c)] for TracIn from a fine-tuning workdir (checkpoints + convergence.jsonl)."""
    loaded = load_trainables(workdir, like, steps)
    weights = tracin_lr_weights(workdir, [s for s, _ in loaded], rule=rule)
    return [(t, float(w)) for (_, t), w in zip(loaded, weights)]


def tracin_scores(loss, checkpoints: Sequence[tuple], query_data, train_data, *,
                  chunk_size: int = 16, progress: bool = False) -> np.ndarray:
    """s[q, n] = sum_c w_c <P_c g_q(theta_c), g_n(theta_c)> over `checkpoints` = [(trainable_c, w_c)] (P_c = I)
    or [(trainable_c, w_c, P_c)] with P_c a diagonal preconditioner as a pytree like the trainable. numpy [Q, N].

    `loss`: `LMFunctions` or an example loss. Checkpoints with w_c = 0 are skipped.
    """
    from jaxinf.attribution.gradients import flatten_rows

    checkpoints = list(checkpoints)
    total = None
    with stage("TracIn checkpoints", len(checkpoints), unit="checkpoint", enabled=progress) as bar:
        for trainable, w, *precond in checkpoints:
            if w != 0.0:
                gq = per_example_gradients(loss, trainable, query_data, chunk_size=chunk_size)
                if precond:  # [1, D] in the gradients' flattening order
                    gq = as_matrix(gq) * flatten_rows(jax.tree.map(lambda x: x[None], precond[0]))
                train = LazyGradients(loss, trainable, train_data, chunk_size=chunk_size)
                s = w * pairwise_scores(gq, train, progress=False)
                total = s if total is None else total + s
            bar.update()
    if total is None:
        raise ValueError("every checkpoint has weight 0: nothing to sum")
    return total


def _adam_state(opt_state) -> Optional[dict]:
    """The {"count", "mu", "nu"} node of a raw (untyped) orbax restore of an optax AdamW state."""
    if isinstance(opt_state, dict):
        if {"count", "mu", "nu"} <= set(opt_state):
            return opt_state
        children = list(opt_state.values())
    elif isinstance(opt_state, (list, tuple)):
        children = list(opt_state)
    else:
        return None
    for child in children:
        found = _adam_state(child)
        if found is not None:
            return found
    return None


def adam_preconditioners(workdir: str, like: PyTree, steps: Sequence[int]) -> list[PyTree]:
    """[P_s] for each checkpoint step s: diag(1 / (sqrt(nu_s / (1 - b2^count_s)) + eps)) as a pytree like `like`,
    from the AdamW state saved with the checkpoint (b2, eps: `training.ADAM_B2`, `training.ADAM_EPS`)."""
    import orbax.checkpoint as ocp

    from jaxinf.training import ADAM_B2, ADAM_EPS, checkpoint_manager

    out = []
    with checkpoint_manager(workdir) as mngr:
        for s in steps:
            adam = _adam_state(mngr.restore(int(s), args=ocp.args.StandardRestore())["opt_state"])
            if adam is None or int(np.asarray(adam["count"])) == 0:
                raise ValueError(f"{workdir}/checkpoints step {s} holds no AdamW second moment (count 0 or no "
                                 "Adam state): Adam-TracIn needs a checkpoint after at least one step")
            bias = 1.0 - ADAM_B2 ** float(np.asarray(adam["count"]))
            out.append(jax.tree.map(lambda l, nu: jnp.asarray(1.0 / (np.sqrt(np.asarray(nu, np.float64) / bias)
                                                                      + ADAM_EPS), l.dtype), like, adam["nu"]))
    return out


def adam_tracin_scores(loss, checkpoints: Sequence[tuple[PyTree, float, PyTree]], query_data, train_data, *,
                       chunk_size: int = 16, progress: bool = False) -> np.ndarray:
    """s[q, n] = sum_c w_c <g_q(theta_c), P_c g_n(theta_c)> over `checkpoints` = [(trainable_c, w_c, P_c)] with
    P_c a diagonal preconditioner as a pytree like the trainable (`adam_preconditioners`). numpy [Q, N]."""
    if any(len(c) != 3 for c in checkpoints):
        raise ValueError("Adam-TracIn needs (trainable, weight, preconditioner) per checkpoint")
    return tracin_scores(loss, checkpoints, query_data, train_data, chunk_size=chunk_size, progress=progress)


# ----------------------------------------------------------------------------------------------- RepSim
POOLINGS = ("prompt_end", "response_mean")


@functools.partial(jax.jit, static_argnums=(0, 4))
def _pooled_hidden(fns, base, trainable, batch, pooling):
    _, h = fns.with_base(base).logits_and_hidden(trainable, batch)  # [B, T, H]; base weights are an argument
    if pooling == "prompt_end":
        return jnp.take_along_axis(h, batch["prompt_end"][:, None, None], axis=1)[:, 0]
    t = jnp.arange(h.shape[1])[None, :]
    w = ((t > batch["prompt_end"][:, None]) & (batch["attention_mask"] > 0)).astype(h.dtype)
    return jnp.einsum("bt,bth->bh", w, h) / jnp.maximum(w.sum(1, keepdims=True), 1.0)


def hidden_representations(fns: LMFunctions, trainable: PyTree, data, *, pooling: str = "prompt_end",
                           chunk_size: int = 16) -> np.ndarray:
    """h[n] [N, H]: last hidden state of row n at its final prompt token, or mean over its response tokens.

    `data`: `TokenizedRows` or a dict with input_ids, attention_mask, prompt_end.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    arrays = batch_arrays(data, ("input_ids", "attention_mask", "prompt_end"))
    n = len(arrays["input_ids"])
    out = []
    for s in range(0, n, chunk_size):
        idx = np.arange(s, min(n, s + chunk_size))
        pad = np.concatenate([idx, np.full(chunk_size - len(idx), idx[-1])])  # fixed shape: compile once
        batch = {k: jnp.asarray(v[pad]) for k, v in arrays.items()}
        out.append(np.asarray(_pooled_hidden(fns, fns.model.params, trainable, batch, pooling))[:len(idx)])
    return np.concatenate(out)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos[i, j] = <a_i, b_j> / (||a_i|| ||b_j||)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def repsim_scores(fns: LMFunctions, trainable: PyTree, query_data, train_data, *, pooling: str = "prompt_end",
                  chunk_size: int = 16) -> np.ndarray:
    """RepSim s[q, n] = cos(h_q, h_n) with the fine-tuned model's last hidden states. numpy [Q, N]."""
    hq = hidden_representations(fns, trainable, query_data, pooling=pooling, chunk_size=chunk_size)
    hn = hidden_representations(fns, trainable, train_data, pooling=pooling, chunk_size=chunk_size)
    return cosine_matrix(hq, hn)
