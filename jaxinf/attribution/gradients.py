"""Per-example gradients g_n = d L_n / d theta of the per-example loss on the trainable parameters.

L_n is the per-example loss of `jaxinf.models.loss` (mean NLL over the row's target tokens). Gradients are
`vmap(grad(L))` over rows, computed in chunks of a fixed size: the last chunk is padded (by repeating its last
row, whose extra gradients are dropped) so one jitted function is compiled once and reused for every chunk.

Two layouts:
  * stacked pytree: leaves [N, *leaf_shape] (what `solver.apply_batched` takes);
  * flat matrix [N, D]: each row the gradient pytree raveled in `jax.tree.leaves` order (the order of
    `jax.flatten_util.ravel_pytree`), so <g_q, g_n> = row_q . row_n.

`LazyGradients` is a gradient matrix that is never materialised: indexing it (`lazy[a:b]`, `lazy[idx]`)
computes exactly those rows, so pairwise scores can stream over training examples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import sharding
from jaxinf.models.loss import LMFunctions

PyTree = Any
ExampleLoss = Callable[[PyTree, dict], jax.Array]
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


# ----------------------------------------------------------------------------------------------- layouts
def flatten_rows(tree: PyTree) -> jax.Array:
    """Stacked pytree (leaves [B, ...]) -> [B, D], leaves raveled and concatenated in jax.tree order."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("flatten_rows: empty pytree")
    xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
    b = leaves[0].shape[0]
    return xp.concatenate([xp.reshape(x, (b, -1)) for x in leaves], axis=1)


def unflatten_rows(matrix, like: PyTree, *, stacked: bool = True) -> PyTree:
    """Inverse of `flatten_rows`: [B, D] -> pytree with the structure of `like`.

    `like` is a stacked pytree (leaves [*, ...], the leading axis is ignored) or, with `stacked=False`, a single
    parameter pytree (e.g. `trainable`).
    """
    leaves, treedef = jax.tree.flatten(like)
    shapes = [tuple(x.shape[1:]) if stacked else tuple(x.shape) for x in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    if matrix.shape[1] != sum(sizes):
        raise ValueError(f"unflatten_rows: matrix has {matrix.shape[1]} columns but the pytree has {sum(sizes)} entries")
    xp = np if isinstance(matrix, np.ndarray) else jnp
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(xp.reshape(matrix[:, start:start + size], (matrix.shape[0],) + shape))
        start += size
    return jax.tree.unflatten(treedef, out)


def is_source(x) -> bool:
    """A row source: `LazyGradients` or any object with __len__ and __getitem__ (slice / index array -> rows)
    that is neither an array nor a pytree container."""
    if isinstance(x, LazyGradients):
        return True
    return (hasattr(x, "__len__") and hasattr(x, "__getitem__")
            and not isinstance(x, (np.ndarray, jax.Array, dict, list, tuple)))


def num_rows(source) -> int:
    """Number of rows of a matrix, a stacked pytree or a row source (e.g. `LazyGradients`)."""
    if is_source(source):
        return len(source)
    leaves = jax.tree.leaves(source)
    if not leaves:
        raise ValueError("empty gradient source")
    return int(leaves[0].shape[0])


def take_rows(source, index) -> Any:
    """Rows `index` (slice or integer array) of a matrix, a stacked pytree or a row source."""
    if is_source(source):
        return source[index]
    return jax.tree.map(lambda x: x[index], source)


def as_matrix(source_rows) -> Any:
    """Flat [B, D] view of rows that may be a stacked pytree."""
    if isinstance(source_rows, (np.ndarray, jax.Array)):
        return source_rows
    return flatten_rows(source_rows)


# ----------------------------------------------------------------------------------------------- data
def batch_arrays(data, keys=BATCH_KEYS) -> dict:
    """numpy arrays [N, T] under `keys` from a dict of arrays or a `TokenizedRows`."""
    if isinstance(data, dict):
        missing = [k for k in keys if k not in data]
        if missing:
            raise KeyError(f"data lacks {missing}: tokenise rows with jaxinf.data.tokenize_rows")
        return {k: np.asarray(data[k]) for k in keys}
    return {k: np.asarray(getattr(data, k)) for k in keys}


def _padded_chunk(arrays: dict, index: np.ndarray, size: int) -> dict:
    """Rows `index` padded to `size` rows by repeating the last one (so shapes never change)."""
    if len(index) < size:
        index = np.concatenate([index, np.full(size - len(index), index[-1])])
    return {k: jnp.asarray(v[index]) for k, v in arrays.items()}


def _example_loss(loss) -> ExampleLoss:
    return loss.example_loss_fn() if isinstance(loss, LMFunctions) else loss


@functools.partial(jax.jit, static_argnums=(0, 4))
def _chunk_grads(loss, base, trainable, chunk, flatten):
    if base is not None:  # frozen weights as an argument, not as compile-time constants
        loss = loss.with_base(base)
    grads = jax.vmap(jax.grad(_example_loss(loss)), in_axes=(None, 0))(trainable, chunk)
    return flatten_rows(grads) if flatten else grads


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)


def iter_per_example_gradients(loss: Union[LMFunctions, ExampleLoss], trainable: PyTree, data, *,
                               chunk_size: int = 16, indices=None, flatten: bool = True,
                               mesh=None) -> Iterator[tuple]:
    """Yield (row indices, gradients of those rows) chunk by chunk, gradients as device arrays.

    `loss` is an `LMFunctions` (its per-example loss) or a function loss(trainable, example) of one example
    (a dict of [T] arrays). `data` is a `TokenizedRows` or a dict with input_ids / attention_mask / loss_mask
    [N, T]. Every chunk is padded to `chunk_size` rows, so the jitted vmap(grad) compiles once. With a `mesh`
    (`jaxinf.sharding`) chunks hold `chunk_size` rounded up to a multiple of its data axis, split over it (the
    extra rows are padding, dropped), and the base weights are FSDP-sharded over its model axis.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    arrays = batch_arrays(data)
    n = len(next(iter(arrays.values())))
    idx = np.arange(n) if indices is None else np.asarray(indices, np.int64).reshape(-1)
    chunk_size = sharding.round_up(chunk_size, mesh)
    base = sharding.shard_params(loss.model.params if isinstance(loss, LMFunctions) else None, mesh)
    trainable = sharding.replicate(trainable, mesh)
    for s in range(0, len(idx), chunk_size):
        rows = idx[s:s + chunk_size]
        chunk = sharding.shard_rows(_padded_chunk(arrays, rows, chunk_size), mesh)
        grads = _chunk_grads(loss, base, trainable, chunk, flatten)
        yield rows, jax.tree.map(lambda x: x[:len(rows)], grads)


def per_example_gradients(loss: Union[LMFunctions, ExampleLoss], trainable: PyTree, data, *, chunk_size: int = 16,
                          indices=None, flatten: bool = True, dtype=None, mesh=None,
                          progress: Union[bool, str] = False) -> Any:
    """All per-example gradients g_n = grad_theta L_n, n in `indices` (default all rows), on the host.

    Returns a numpy [N, D] matrix (`flatten=True`) or a stacked pytree of numpy leaves [N, ...]. `dtype`
    (e.g. np.float32 / np.float64) casts the result; the computation runs in the parameters' dtype (load the
    model in float64 under `jax.enable_x64(True)` for float64 gradients). `mesh`: see `iter_per_example_gradients`.
    `progress`: show the pass as a `jaxinf.progress` stage (a string names it).
    """
    from jaxinf.progress import stage

    total = len(batch_arrays(data)["input_ids"]) if indices is None else len(np.asarray(indices).reshape(-1))
    parts = []
    with stage(progress if isinstance(progress, str) else "gradients", total, unit="row",
               enabled=bool(progress)) as bar:
        for rows, g in iter_per_example_gradients(loss, trainable, data, chunk_size=chunk_size, indices=indices,
                                                  flatten=flatten, mesh=mesh):
            parts.append(jax.tree.map(np.asarray, g))
            bar.update(len(rows))
    if not parts:
        raise ValueError("per_example_gradients: no rows")
    return _cast(jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts), dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class LazyGradients:
    """A per-example gradient matrix [N, D] (or stacked pytree) computed on demand, rows by rows.

    `lazy[a:b]` or `lazy[index_array]` returns the gradients of those rows as device arrays (computed in
    padded chunks of `chunk_size` with one compiled function). Nothing is cached: each access recomputes.
    `mesh` (optional): chunks split over its data axis (see `iter_per_example_gradients`).
    """

    loss: Union[LMFunctions, ExampleLoss]
    trainable: PyTree
    data: Any
    chunk_size: int = 16
    flatten: bool = True
    dtype: Any = None
    mesh: Any = None

    def __post_init__(self):
        object.__setattr__(self, "data", batch_arrays(self.data))

    def __len__(self) -> int:
        return int(self.data["input_ids"].shape[0])

    def __getitem__(self, index):
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64).reshape(-1)
        if len(rows) == 0:
            raise IndexError("LazyGradients: empty selection")
        parts = [g for _, g in iter_per_example_gradients(self.loss, self.trainable, self.data,
                                                           chunk_size=self.chunk_size, indices=rows,
                                                           flatten=self.flatten, mesh=self.mesh)]
        out = parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *parts)
        return out if self.dtype is None else jax.tree.map(lambda x: x.astype(self.dtype), out)
