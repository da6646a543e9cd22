"""Pairwise scores without training gradients: contract preconditioned query gradients with cached layer captures.

For queries q (preconditioned gradients P grad_q, e.g. from ``ekfac``) and training examples n,

    score[q, n] = <P grad_q, grad_n> = sum_l <Q_ql, G_nl>_F = sum_l sum_t a_nt^T Q_ql g_nt
                = sum_l einsum('qio,nti,nto->qn', Q_l, a_l, g_l),

where Q_ql [rows, d_out] is layer l's block of P grad_q as a gradient-shaped matrix (``capture.Layer.matrix``),
and (a_nt, g_nt) are the layer's inputs and output cotangents of example n's own loss (``capture.capture``), so
grad_n = sum_t a_nt g_nt^T, the gradient of L_n (the mean NLL over n's targets; padding contributes nothing).
The full [N, n_params] matrix of training gradients is never formed: training examples are processed in chunks
of ``chunk`` rows, and the einsum lets XLA choose the contraction order per layer (tokens first or a transient
per-chunk, per-layer gradient, whichever is cheaper).

Sign: this is the inner product. The influence of up-weighting n on the query loss is -score[q, n] when
P = (curvature + lambda)^{-1} (``jaxinf.attribution`` scores follow their own convention).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxinf import sharding
from jaxinf.curvature.capture import (Layer, base_params, capture_with_losses, layers_to_tree, lm_layers,
                                     per_example_layer_grads, restrict, select_layers)

if TYPE_CHECKING:
    from jaxinf.models.loss import LMFunctions

PyTree = Any


def layers_of(fns: LMFunctions, trainable: PyTree, vectors: PyTree) -> tuple[Layer, ...]:
    """The layers of ``trainable`` whose weights appear in ``vectors`` (a restricted pytree)."""
    keys = set(traverse_util.flatten_dict(vectors))
    return tuple(l for l in lm_layers(fns, trainable) if l.kernel in keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _query_grads(fns, layers, trainable, base, batch):
    cap, _ = capture_with_losses(fns, trainable, batch, layers, base=base)
    return layers_to_tree(layers, per_example_layer_grads(cap, layers), like=restrict(trainable, layers))


def query_gradients(fns: LMFunctions, trainable: PyTree, batch: dict, layers=None, *, mesh=None) -> PyTree:
    """Per-example gradients of the batch rows' losses for the chosen layers, leaves [B, *leaf], from one capture
    (formula grad_n = sum_t a_nt g_nt^T): the restricted-pytree form the iHVP solvers take (``apply_batched``).
    ``mesh``: rows (padded with all-masked rows, dropped) split over its data axis, base weights FSDP-sharded."""
    chosen = select_layers(lm_layers(fns, trainable), layers)
    if mesh is None:
        return _query_grads(fns, chosen, trainable, base_params(fns), _as_batch(batch))
    padded, n = sharding.pad_rows(_as_batch(batch), sharding.data_size(mesh))
    out = _query_grads(fns, chosen, sharding.replicate(trainable, mesh), sharding.shard_params(base_params(fns), mesh),
                       sharding.shard_rows(padded, mesh))
    return jax.tree.map(lambda x: x[:n], out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_scores(fns, layers, trainable, base, qmats, batch):
    cap, _ = capture_with_losses(fns, trainable, batch, layers, base=base)
    total = None
    for layer, q in zip(layers, qmats):
        a, g = cap[layer.name]
        wide = jnp.promote_types(a.dtype, jnp.float32)
        s = jnp.einsum("qio,nti,nto->qn", q.astype(wide), a.astype(wide), g.astype(wide))
        total = s if total is None else total + s
    return total


def _as_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}


def contracted_scores(fns: LMFunctions, trainable: PyTree, preconditioned: PyTree, train_batches: Sequence[dict],
                      *, chunk: Optional[int] = None, mesh=None) -> np.ndarray:
    """score [Q, N] = <preconditioned_q, grad_n> for every training row n of ``train_batches`` (in order).

    ``preconditioned``: the trainable pytree restricted to some layers (``capture.restrict``), leaves with a
    leading query axis Q (e.g. ``solver.apply_batched(state, query_gradients(...))``). ``chunk``: rows per
    capture (default: whole batches). ``mesh``: optional device mesh (``jaxinf.sharding``): each chunk, padded
    with all-masked rows to a multiple of its data axis (their columns dropped), is split over that axis; queries
    replicated, base weights FSDP-sharded over its model axis. The same scores.
    """
    layers = layers_of(fns, trainable, preconditioned)
    if not layers:
        raise ValueError("the preconditioned vectors contain no linear layer of the trainable pytree")
    qmats = tuple(layer.matrix_batched(preconditioned) for layer in layers)
    base = base_params(fns)
    if mesh is not None:
        base, trainable, qmats = (sharding.shard_params(base, mesh), sharding.replicate(trainable, mesh),
                                  sharding.replicate(qmats, mesh))
    out = []
    for batch in train_batches:
        batch = _as_batch(batch)
        n = batch["input_ids"].shape[0]
        step = n if chunk is None else int(chunk)
        for s in range(0, n, step):
            part = jax.tree.map(lambda x: x[s:s + step], batch)
            if mesh is None:
                out.append(np.asarray(_chunk_scores(fns, layers, trainable, base, qmats, part)))
                continue
            part, rows = sharding.pad_rows(part, sharding.data_size(mesh))
            block = _chunk_scores(fns, layers, trainable, base, qmats, sharding.shard_rows(part, mesh))
            out.append(np.asarray(block)[:, :rows])
    return np.concatenate(out, axis=1)


def pairwise_scores(fns: LMFunctions, trainable: PyTree, query_batches: Sequence[dict],
                    train_batches: Sequence[dict], solver, state, *, chunk: Optional[int] = None,
                    query_batches_per_pass: Optional[int] = None, mesh=None) -> np.ndarray:
    """[Q, N] scores <P grad_q, grad_n>: query gradients from captures, P = ``solver`` with fitted ``state``
    (any iHVP solver over the restricted pytree, e.g. ``ekfac``), training side contracted chunk by chunk.

    ``query_batches_per_pass``: how many query batches are preconditioned and held at once (default: all). Each
    pass re-runs the training captures, so fewer passes are faster; the preconditioned queries take
    Q x (number of parameters of the chosen layers) values, e.g. 34 GB for 100 queries on GPT-2 small in float32.
    ``mesh``: optional device mesh for the query captures and the training contraction (``contracted_scores``).
    """
    layers = getattr(state, "layers", None)
    per_pass = len(query_batches) if query_batches_per_pass is None else max(1, int(query_batches_per_pass))
    rows = []
    for start in range(0, len(query_batches), per_pass):
        pre = [solver.apply_batched(state, query_gradients(fns, trainable, batch, layers, mesh=mesh))
               for batch in query_batches[start:start + per_pass]]
        pre = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *pre)
        rows.append(contracted_scores(fns, trainable, pre, train_batches, chunk=chunk, mesh=mesh))
        del pre
    return np.concatenate(rows, axis=0)
