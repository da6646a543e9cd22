"""Query batching (Grosse et al. 2023, sec. 3.3): low-rank preconditioned query gradients, exact re-scoring.

Each preconditioned query gradient v_q = P g_q is a pytree. Every 2-D leaf is treated as one layer matrix
V [d_in, d_out] (LoRA: A [d_in, r] and B [r, d_out] are separate layers) and replaced by its best rank-k
approximation from the SVD V = U S W^T:

    V ~ L R,  L = U_k S_k [d_in, k],  R = W_k^T [k, d_out],

so storing a query costs k (d_in + d_out) numbers per layer instead of d_in d_out. Leaves of any other rank
(1-D biases, scalars) are kept exact. The approximate score of a training gradient G (same pytree) is

    s~(q, n) = sum_{2-D layers} <L R, G>_F + sum_{other leaves} <v, g>  =  sum_layers tr(L^T G R^T) + ...,

which equals the exact score when k >= min(d_in, d_out). Then the `top_k` training rows per query under s~ are
re-scored with the full-rank v_q (exact <v_q, g_n>).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.attribution.gradients import as_matrix, num_rows, take_rows, unflatten_rows
from jaxinf.attribution.scores import top_k_indices
from jaxinf.progress import stage

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LowRankQueries:
    """Per leaf (jax.tree order of the queries): ("lowrank", L [Q, d_in, k], R [Q, k, d_out]) or ("exact", V [Q, ...])."""

    parts: tuple
    treedef: Any
    rank: int
    n_queries: int

    def num_stored(self) -> int:
        """Numbers stored for all queries (compare with Q * D for the full-rank queries)."""
        return int(sum(sum(int(np.prod(a.shape)) for a in p[1:]) for p in self.parts))

    def dense(self) -> PyTree:
        """The rank-k queries as a stacked pytree (L R for 2-D leaves)."""
        leaves = [jnp.einsum("qik,qkj->qij", p[1], p[2]) if p[0] == "lowrank" else p[1] for p in self.parts]
        return jax.tree.unflatten(self.treedef, leaves)


def low_rank_queries(queries: PyTree, rank: int) -> LowRankQueries:
    """Rank-`rank` SVD truncation of every 2-D leaf of each query (stacked pytree, leaves [Q, ...])."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    leaves, treedef = jax.tree.flatten(queries)
    n_q = int(leaves[0].shape[0])
    parts = []
    for v in leaves:
        v = jnp.asarray(v)
        if v.ndim == 3:
            u, s, wt = jnp.linalg.svd(v, full_matrices=False)  # u [Q, m, p], s [Q, p], wt [Q, p, n]
            k = min(rank, s.shape[-1])
            parts.append(("lowrank", u[:, :, :k] * s[:, None, :k], wt[:, :k, :]))
        else:
            parts.append(("exact", v))
    return LowRankQueries(tuple(parts), treedef, rank, n_q)


def _score_block(lrq: LowRankQueries, train_leaves: list) -> jax.Array:
    total = 0.0
    for part, g in zip(lrq.parts, train_leaves):
        g = jnp.asarray(g)
        if part[0] == "lowrank":
            # <L R, G>_F = sum_{i,j,k} L[i,k] G[i,j] R[k,j]
            total = total + jnp.einsum("qik,nij,qkj->qn", part[1], g, part[2], precision=jax.lax.Precision.HIGHEST)
        else:
            v = part[1]
            total = total + jnp.matmul(v.reshape(v.shape[0], -1), g.reshape(g.shape[0], -1).T,
                                       precision=jax.lax.Precision.HIGHEST)
    return total


def _train_leaves(rows, lrq: LowRankQueries) -> list:
    if isinstance(rows, (np.ndarray, jax.Array)):  # flat [n, D]: unravel with the queries' layout
        like = jax.tree.unflatten(lrq.treedef, [p[1] if p[0] == "exact" else
                                                 jnp.zeros((1, p[1].shape[1], p[2].shape[2]), p[1].dtype)
                                                 for p in lrq.parts])
        rows = unflatten_rows(rows, like)
    leaves, treedef = jax.tree.flatten(rows)
    if treedef != lrq.treedef:
        raise ValueError(f"training gradients have structure {treedef}, queries {lrq.treedef}")
    return leaves


def low_rank_scores(lrq: LowRankQueries, train, *, chunk_size: Optional[int] = None,
                    progress: bool = False) -> np.ndarray:
    """Approximate scores s~[q, n] of the rank-k queries against every training row (streamed). numpy [Q, N].

    `train`: stacked pytree, flat [N, D] matrix or `LazyGradients` (either layout).
    """
    n = num_rows(train)
    if chunk_size is None:
        chunk_size = int(getattr(train, "chunk_size", 256))
    blocks = []
    with stage("low-rank scores", n, unit="row", enabled=progress) as bar:
        for s in range(0, n, chunk_size):
            rows = take_rows(train, slice(s, min(n, s + chunk_size)))
            blocks.append(np.asarray(_score_block(lrq, _train_leaves(rows, lrq))))
            bar.update(min(n, s + chunk_size) - s)
    return np.concatenate(blocks, axis=1)


def rescore_top_k(queries, train, candidates: np.ndarray, *, chunk_size: int = 256) -> np.ndarray:
    """Exact scores <v_q, g_n> for n in candidates[q] ([Q, k] -> [Q, k]); gradients only for the union of rows."""
    q = np.asarray(as_matrix(queries))
    union = np.unique(candidates)
    cols = [np.asarray(as_matrix(take_rows(train, union[s:s + chunk_size]))) for s in range(0, len(union), chunk_size)]
    g = np.concatenate(cols, axis=0)  # [U, D]
    pos = np.searchsorted(union, candidates)
    return np.einsum("qd,qkd->qk", q, g[pos])


@dataclasses.dataclass(frozen=True)
class QueryBatchedScores:
    """approx [Q, N] low-rank scores; top_indices / top_scores [Q, k]: the re-scored candidates (exact scores)."""

    approx: np.ndarray
    top_indices: np.ndarray
    top_scores: np.ndarray

    def scores(self) -> np.ndarray:
        """approx with the re-scored entries replaced by their exact scores."""
        out = self.approx.copy()
        rows = np.arange(out.shape[0])[:, None]
        out[rows, self.top_indices] = self.top_scores
        return out


def query_batched_scores(queries: PyTree, train, *, rank: int, top_k: int = 10, chunk_size: Optional[int] = None,
                         seed: int = 0, progress: bool = False) -> QueryBatchedScores:
    """Low-rank (rank-`rank`) scores of every pair, then exact re-scoring of the `top_k` best rows per query.

    `queries`: stacked pytree of preconditioned query gradients [Q, ...] (the full-rank ones are kept for the
    re-scoring). `train`: stacked pytree, flat matrix or `LazyGradients`.
    """
    lrq = low_rank_queries(queries, rank)
    approx = low_rank_scores(lrq, train, chunk_size=chunk_size, progress=progress)
    idx = top_k_indices(approx, top_k, seed=seed)
    exact = rescore_top_k(queries, train, idx, chunk_size=chunk_size or 256)
    return QueryBatchedScores(approx, idx, exact)
