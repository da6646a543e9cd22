"""Influence scores from preconditioned query gradients and training gradients.

    score(q, n) = <P g_q, g_n>,   P ~ (C + lambda I)^{-1} (symmetric), g = per-example loss gradient,

larger = more helpful (see `jaxinf.attribution`). Query gradients are preconditioned once
(`precondition_queries`); training gradients are then streamed in chunks, so the [N, D] training gradient
matrix never has to exist at once. Chunks of the [Q, N] score matrix can be written to a directory and a run
resumed: chunks already on disk are loaded, not recomputed, so an interrupted and resumed run returns the same
matrix as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import sharding
from jaxinf.progress import stage
from jaxinf.workdir import guard, write_npy
from jaxinf.attribution.gradients import (as_matrix, flatten_rows, num_rows, take_rows,
                                          unflatten_rows)
from jaxinf.models.loss import LMFunctions, token_nll

PyTree = Any
_META = "meta.json"


# ----------------------------------------------------------------------------------------------- queries
def _stacked_like(tree: PyTree, like: Optional[PyTree]) -> PyTree:
    """A stacked pytree from a stacked pytree or a flat [B, D] matrix (unraveled with the single pytree `like`)."""
    if isinstance(tree, (np.ndarray, jax.Array)):
        if like is None:
            raise ValueError("a flat [B, D] gradient matrix needs `like` (the trainable pytree) to be unraveled")
        return unflatten_rows(tree, like, stacked=False)
    return tree


def precondition_queries(solver, state, query_grads, *, like: Optional[PyTree] = None,
                         chunk_size: Optional[int] = None, flatten: bool = True) -> Any:
    """P g_q for every query: `solver.apply_batched(state, .)` over chunks of the leading query axis.

    `query_grads`: stacked pytree [Q, ...] or flat [Q, D] (then `like` = the trainable pytree). Returns a numpy
    [Q, D] matrix (`flatten`) or a stacked pytree of numpy leaves.
    """
    tree = _stacked_like(query_grads, like)
    q = num_rows(tree)
    step = chunk_size or q
    parts = []
    for s in range(0, q, step):
        out = solver.apply_batched(state, jax.tree.map(lambda x: jnp.asarray(x[s:s + step]), tree))
        parts.append(jax.tree.map(np.asarray, flatten_rows(out) if flatten else out))
    return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *parts)


# ----------------------------------------------------------------------------------------------- pairwise
def _fingerprint(q: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(f"{q.shape}{q.dtype}".encode())
    h.update(np.ascontiguousarray(q).tobytes())
    return h.hexdigest()


def _prepare_store(out_dir: str, meta: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    guard(os.path.join(out_dir, _META), meta, what="score chunks of another computation",
          fix="use a new out_dir or the same queries, training set and chunk_size to resume")


def chunk_path(out_dir: str, start: int, stop: int) -> str:
    """File of the score columns [start, stop) in a score directory."""
    return os.path.join(out_dir, f"scores_{start:09d}_{stop:09d}.npy")


@functools.partial(jax.jit, static_argnums=2)
def _block_jax(q, g, normalize_train):
    if normalize_train:
        g = g / jnp.linalg.norm(g, axis=1, keepdims=True)
    return jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))  # bfloat16: float32 sums


def _block(q, g, normalize_train: bool, mesh=None) -> np.ndarray:
    if mesh is not None:  # training rows split over the data axis, queries replicated
        g, n = sharding.shard_padded_rows(jnp.asarray(g), mesh)
        return np.asarray(_block_jax(sharding.replicate(jnp.asarray(q), mesh), g, normalize_train))[:, :n]
    if isinstance(q, np.ndarray) and isinstance(g, np.ndarray):
        if normalize_train:
            g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return q @ g.T
    return np.asarray(_block_jax(jnp.asarray(q), jnp.asarray(g), normalize_train))


def pairwise_scores(query, train, *, chunk_size: Optional[int] = None, out_dir: Optional[str] = None,
                    progress: bool = True, normalize_train: bool = False, desc: str = "scores",
                    mesh=None) -> np.ndarray:
    """S[q, n] = <query_q, g_n>, streamed over chunks of training rows; returns numpy [Q, N].

    query: [Q, D] matrix or stacked pytree (usually P g_q from `precondition_queries`).
    train: [N, D] matrix, stacked pytree or `LazyGradients` (gradients computed chunk by chunk).
    chunk_size: training rows per chunk (default: the LazyGradients chunk size, else 1024).
    out_dir: if given, each chunk's columns go to `chunk_path(out_dir, start, stop)` (atomic write) with a
      `meta.json` fingerprint of the queries; chunks already there are loaded instead of recomputed (resume).
    normalize_train: divide each g_n by ||g_n|| first (for cosine scores).
    mesh: optional device mesh (``jaxinf.sharding``): each chunk's training rows are split over its data axis, queries
      replicated (build a `LazyGradients` with the same mesh to compute its rows there too); the same scores.
    """
    q = as_matrix(query)
    n = num_rows(train)
    if chunk_size is None:
        chunk_size = int(getattr(train, "chunk_size", 1024))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if out_dir is not None:
        qh = np.asarray(q)
        _prepare_store(out_dir, {"n_queries": int(q.shape[0]), "dim": int(q.shape[1]), "n_train": int(n),
                                 "chunk_size": int(chunk_size), "normalize_train": bool(normalize_train),
                                 "query_sha1": _fingerprint(qh)})
    blocks = []
    starts = range(0, n, chunk_size)
    with stage(desc, n, unit="row", enabled=progress) as bar:
        for start in starts:
            stop = min(n, start + chunk_size)
            path = chunk_path(out_dir, start, stop) if out_dir is not None else None
            if path is not None and os.path.exists(path):
                block = np.load(path)
                if block.shape != (q.shape[0], stop - start):
                    raise ValueError(f"{path} has shape {block.shape}, expected {(q.shape[0], stop - start)}")
            else:
                g = as_matrix(take_rows(train, slice(start, stop)))
                if g.shape[1] != q.shape[1]:
                    raise ValueError(f"training gradients have {g.shape[1]} entries, queries {q.shape[1]}")
                block = _block(q, g, normalize_train, mesh)
                if path is not None:
                    write_npy(path, block)
            blocks.append(block)
            bar.update(stop - start)
    return np.concatenate(blocks, axis=1)


def load_scores(out_dir: str) -> np.ndarray:
    """The [Q, N] matrix of a complete score directory written by `pairwise_scores`."""
    with open(os.path.join(out_dir, _META)) as f:
        meta = json.load(f)
    n, c = meta["n_train"], meta["chunk_size"]
    blocks = []
    for start in range(0, n, c):
        path = chunk_path(out_dir, start, min(n, start + c))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: the run was interrupted; call pairwise_scores again with "
                                    f"out_dir={out_dir!r} to finish it")
        blocks.append(np.load(path))
    return np.concatenate(blocks, axis=1)


def candidate_scores(query, train, candidates, *, chunk_size: int = 256, fill: float = -np.inf,
                     progress: bool = False) -> np.ndarray:
    """S[q, n] = <query_q, g_n> only for n in candidates[q] (e.g. from TF-IDF); other entries = `fill`.

    Gradients are computed only for the union of all candidate rows. Returns numpy [Q, N].
    """
    q = as_matrix(query)
    cand = np.asarray(candidates, np.int64)
    if cand.ndim != 2 or cand.shape[0] != q.shape[0]:
        raise ValueError(f"candidates must be [Q, M] with Q = {q.shape[0]}, got shape {cand.shape}")
    out = np.full((q.shape[0], num_rows(train)), fill)
    if cand.size == 0:
        return out
    union = np.unique(cand)
    blocks = []
    with stage("candidate scores", len(union), unit="row", enabled=progress) as bar:
        for s in range(0, len(union), chunk_size):
            rows = union[s:s + chunk_size]
            blocks.append(_block(q, as_matrix(take_rows(train, rows)), False))
            bar.update(len(rows))
    sub = np.concatenate(blocks, axis=1)
    out = out.astype(np.result_type(sub.dtype, np.float32))
    pos = np.searchsorted(union, cand)
    rows = np.arange(q.shape[0])[:, None]
    out[rows, cand] = sub[rows, pos]
    return out


def top_k_indices(scores: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """[Q, k] indices of the k largest scores per row, best first; ties ordered by a seeded random permutation."""
    scores = np.asarray(scores)
    k = min(int(k), scores.shape[1])
    tiebreak = np.random.default_rng(seed).permutation(scores.shape[1])
    # primary key: -score (descending); secondary: a random rank shared by all rows (never the index order)
    order = np.lexsort((np.broadcast_to(tiebreak, scores.shape), -scores), axis=-1)
    return order[:, :k].astype(np.int64)


# ----------------------------------------------------------------------------------------------- self-influence
def self_influence(train, solver=None, state=None, *, like: Optional[PyTree] = None, chunk_size: int = 64,
                   progress: bool = False) -> np.ndarray:
    """s_n = <g_n, P g_n> for every training row (P = I, i.e. ||g_n||^2, when `solver` is None). numpy [N].

    `train`: [N, D] matrix, stacked pytree or `LazyGradients`; flat rows are unraveled with `like` (default: the
    LazyGradients' trainable) for `solver.apply_batched`.
    """
    if like is None:
        like = getattr(train, "trainable", None)
    n = num_rows(train)
    out = []
    with stage("self-influence", n, unit="row", enabled=progress) as bar:
        for s in range(0, n, chunk_size):
            g = take_rows(train, slice(s, min(n, s + chunk_size)))
            flat = as_matrix(g)
            if solver is None:
                pg = flat
            else:
                pg = flatten_rows(solver.apply_batched(state, jax.tree.map(jnp.asarray, _stacked_like(g, like))))
            out.append(np.sum(np.asarray(flat) * np.asarray(pg), axis=1))
            bar.update(min(n, s + chunk_size) - s)
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- per token
def per_token_losses(fns: LMFunctions, trainable: PyTree, batch: dict) -> jax.Array:
    """l[b, t] = m[b, t] * nll[b, t] / max(1, sum_t m[b, t]), m = loss_mask with m[:, 0] = 0; sum_t l = L_b. [B, T]."""
    nll = token_nll(fns.logits(trainable, batch), batch["input_ids"])
    mask = jnp.asarray(batch["loss_mask"]).astype(nll.dtype).at[:, 0].set(0.0)
    return nll * mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _token_jvp(fns, base, trainable, batch, directions):
    fns = fns.with_base(base)  # frozen weights as an argument, not as compile-time constants
    f = lambda p: per_token_losses(fns, p, batch)  # noqa: E731
    return jax.vmap(lambda v: jax.jvp(f, (trainable,), (v,))[1])(directions)


def per_token_scores(fns: LMFunctions, trainable: PyTree, batch: dict, directions) -> np.ndarray:
    """Token contributions of training rows to the score along v = P g_q: s[q, b, t] = <grad l_bt, v_q>.

    sum_t s[q, b, t] = <grad L_b, P g_q> = score(q, b). One forward-mode (jvp) pass gives every token of every
    row; queries are vmapped. `directions`: a single pytree like `trainable` (returns [B, T]), a stacked
    pytree [Q, ...] or a flat [Q, D] / [D] matrix (returns [Q, B, T] / [B, T]).
    """
    single = False
    if isinstance(directions, (np.ndarray, jax.Array)):
        single = directions.ndim == 1
        directions = unflatten_rows(directions[None] if single else directions, trainable, stacked=False)
    else:
        lead = jax.tree.leaves(trainable)[0]
        single = jax.tree.leaves(directions)[0].ndim == lead.ndim
        if single:
            directions = jax.tree.map(lambda x: x[None], directions)
    batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    directions = jax.tree.map(lambda x, p: jnp.asarray(x, p.dtype), directions, trainable)
    out = np.asarray(_token_jvp(fns, fns.model.params, trainable, batch, directions))
    return out[0] if single else out
