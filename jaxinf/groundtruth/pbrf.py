"""The proximal Bregman response function (PBRF; Bae et al. 2022, Grosse et al. 2023 eq. 7-9).

From the fine-tuned adapters theta_s, up-weighting training row n by eps gives

    theta*(eps) = argmin_theta  (1/N) sum_i D_i(theta) + eps L_n(theta) + (lambda/2) ||theta - theta_s||^2,

with D_i the Bregman divergence of the cross-entropy in output space, i.e. the KL of the next-token
distributions over row i's loss tokens, averaged over them exactly as the loss is
(D_i = sum_t m_it KL(p(theta_s, x_i)_t || p(theta, x_i)_t) / max(1, sum_t m_it)). Its Hessian at theta_s is the
Gauss-Newton matrix G of the mean training loss (1/N) sum_i L_i, so for small eps

    theta*(eps) - theta_s ~ -eps (G + lambda I)^{-1} grad L_n,   and
    (L_q(theta*(eps)) - L_q(theta_s)) / eps ~ -grad L_q^T (G + lambda I)^{-1} grad L_n.

`pbrf_scores` returns minus that response (larger = row n helps query q more: the library's sign). The problem
is solved with optax L-BFGS (backtracking line search) in the scaled variable delta = (theta - theta_s) / eps,
whose objective J(theta_s + eps delta) / eps^2 (constant dropped) is O(1) for any eps; rows are batched with vmap.
The teacher distributions p(theta_s, x_i) are computed once ([N, T, V] log-probabilities held in memory), and
every objective evaluation runs the model on all N training rows (per vmapped row): meant for small N and
vocabularies (tiny models, a few rows of a LoRA run), not for a full SmolLM2 study set on a CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxinf import progress, training
from jaxinf.models.loss import LMFunctions


def _kl_per_example(logits: jax.Array, teacher_logp: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B]: mean over loss tokens t >= 1 of KL(teacher || model) of the distribution predicting token t."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(teacher_logp.dtype), axis=-1)
    kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), axis=-1)  # [B, T-1]
    mask = loss_mask.astype(kl.dtype)[:, 1:]
    return (kl * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


def _teacher(fns, base, theta_s, train):
    logits = fns.with_base(base).logits(theta_s, train)
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve(fns, iters, base, theta_s, train, teacher, rows, eps, damping):
    lm = fns.with_base(base)
    flat_s, unravel = ravel_pytree(theta_s)

    def solve_one(n):
        row = jax.tree.map(lambda x: jnp.take(x, n[None], axis=0), train)
        l_n_s = lm.per_example_loss(theta_s, row)[0]

        def objective(delta):  # J(theta_s + eps delta) / eps^2, minus its value at delta = 0
            theta = unravel(flat_s + eps * delta)
            kl = _kl_per_example(lm.logits(theta, train), teacher, train["loss_mask"]).mean()
            up = (lm.per_example_loss(theta, row)[0] - l_n_s) / eps
            return kl / eps ** 2 + up + 0.5 * damping * jnp.sum(delta ** 2)

        opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
            max_backtracking_steps=20, store_grad=True))
        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry, _):
            delta, state = carry
            value, grad = value_and_grad(delta, state=state)
            updates, state = opt.update(grad, state, delta, value=value, grad=grad, value_fn=objective)
            return (optax.apply_updates(delta, updates), state), None

        delta0 = jnp.zeros_like(flat_s)
        (delta, _), _ = jax.lax.scan(step, (delta0, opt.init(delta0)), None, length=iters)
        return delta, jnp.linalg.norm(jax.grad(objective)(delta)), jnp.linalg.norm(jax.grad(objective)(delta0))

    return jax.vmap(solve_one)(rows)


@functools.partial(jax.jit, static_argnums=0)
def _query_losses(fns, base, params, queries):
    return fns.with_base(base).per_example_loss(params, queries)


def pbrf_scores(fns: LMFunctions, theta_s: Any, train: dict, queries: dict, rows: Sequence[int], *,
                eps: float = 1e-3, damping: float = 1e-3, iters: int = 100, chunk: int = 8) -> dict:
    """PBRF influence {"scores": [Q, len(rows)], "grad_norm": [len(rows)], "grad_norm_0": [len(rows)]}.

    scores[q, j] = -(L_q(theta*(eps)) - L_q(theta_s)) / eps for row n = rows[j] (one-sided difference of the
    response, bias O(eps)); `damping` = lambda (absolute); `iters` L-BFGS steps; `chunk` rows vmapped at once.
    grad_norm is the final gradient norm of the scaled objective (0 at the exact minimiser), grad_norm_0 its
    norm at the start (delta = 0, where it is ||grad L_n(theta_s)||): their ratio says how far L-BFGS got.
    """
    train = {k: jnp.asarray(np.asarray(train[k])) for k in training.BATCH_KEYS}
    queries = {k: jnp.asarray(np.asarray(queries[k])) for k in training.BATCH_KEYS}
    base = fns.model.params
    teacher = jax.jit(_teacher, static_argnums=0)(fns, base, theta_s, train)
    flat_s, unravel = ravel_pytree(theta_s)
    l_q_s = _query_losses(fns, base, theta_s, queries)
    rows = np.asarray(rows, np.int64)
    scores, norms, norms_0 = [], [], []
    with progress.stage("PBRF", total=len(rows), unit="row") as bar:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part))])
            delta, gnorm, gnorm_0 = _solve(fns, int(iters), base, theta_s, train, teacher, jnp.asarray(padded), eps, damping)
            for j in range(len(part)):
                l_q = _query_losses(fns, base, unravel(flat_s + eps * delta[j]), queries)
                scores.append(-np.asarray(l_q - l_q_s, np.float64) / eps)
            norms.extend(np.asarray(gnorm, np.float64)[:len(part)].tolist())
            norms_0.extend(np.asarray(gnorm_0, np.float64)[:len(part)].tolist())
            bar.update(len(part))
    return {"scores": np.stack(scores, 1) if scores else np.zeros((queries["input_ids"].shape[0], 0)),
            "grad_norm": np.asarray(norms), "grad_norm_0": np.asarray(norms_0)}
