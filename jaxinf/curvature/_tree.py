"""Vector-space operations on parameter pytrees, and a static spec of a pytree.

A parameter pytree is treated as one vector in R^n (n = total number of
entries).  All operations are pure and traceable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """<a, b> = sum over leaves of sum(a * b) (real inner product)."""
    parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x.ravel(), y.ravel()), a, b))
    return sum(parts[1:], parts[0]) if parts else jnp.zeros(())


def tree_norm(a: PyTree) -> jax.Array:
    """||a||_2 over all leaves."""
    return jnp.sqrt(tree_vdot(a, a))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a: PyTree, s) -> PyTree:
    """s * a, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (s * x).astype(x.dtype), a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y, keeping each leaf's dtype."""
    return jax.tree.map(lambda u, w: (alpha * u + w).astype(w.dtype), x, y)


def tree_zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def tree_all_finite(a: PyTree) -> jax.Array:
    """True iff every entry of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_index(tree: PyTree, i) -> PyTree:
    """tree[i] along the leading axis of every leaf (i may be traced)."""
    return jax.tree.map(lambda x: x[i], tree)


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
    """Stack a list of identically-shaped pytrees along a new leading axis."""
    if not isinstance(trees, (list, tuple)) or len(trees) == 0:
        raise ValueError("expected a non-empty list of pytrees")
    if len(trees) > 1:
        chex.assert_trees_all_equal_shapes_and_dtypes(*trees)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """Static (hashable) description of a pytree of arrays: structure, shapes, dtypes.

    Used to check vectors at public boundaries and to map a pytree to/from a
    flat vector x in R^n (leaves raveled in `jax.tree` order and concatenated;
    this is the same order as `jax.flatten_util.ravel_pytree`).
    """

    treedef: Any
    leaves: tuple  # tuple of jax.ShapeDtypeStruct

    @classmethod
    def of(cls, tree: PyTree) -> "TreeSpec":
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves))

    @property
    def sizes(self) -> tuple:
        return tuple(int(np.prod(s.shape, dtype=np.int64)) for s in self.leaves)

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    @property
    def dtype(self):
        return jnp.result_type(*[s.dtype for s in self.leaves])

    def zeros(self) -> PyTree:
        return jax.tree.unflatten(self.treedef, [jnp.zeros(s.shape, s.dtype) for s in self.leaves])

    def ravel(self, tree: PyTree) -> jax.Array:
        """Pytree -> flat vector of length n."""
        leaves = self.treedef.flatten_up_to(tree)
        return jnp.concatenate([jnp.ravel(x).astype(self.dtype) for x in leaves])

    def unravel(self, x: jax.Array) -> PyTree:
        """Flat vector of length n -> pytree with this spec's shapes and dtypes."""
        offsets = np.cumsum((0,) + self.sizes)
        leaves = [
            x[offsets[i] : offsets[i + 1]].reshape(s.shape).astype(s.dtype)
            for i, s in enumerate(self.leaves)
        ]
        return jax.tree.unflatten(self.treedef, leaves)

    def check(self, tree: PyTree, name: str = "vector") -> None:
        """Assert `tree` has this spec's structure, shapes and dtypes (chex errors on mismatch)."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise AssertionError(f"{name}: pytree structure {treedef} != expected {self.treedef}")
        for x, s in zip(leaves, self.leaves):
            if jnp.shape(x) != s.shape or jnp.result_type(x) != s.dtype:  # fast path; chex explains
                chex.assert_shape(x, s.shape)
                chex.assert_type(x, s.dtype)

    def check_batched(self, tree: PyTree, name: str = "vectors") -> int:
        """Assert `tree` stacks vectors of this spec on a leading axis (same size for all leaves)."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise AssertionError(f"{name}: pytree structure {treedef} != expected {self.treedef}")
        if not leaves:
            return 0
        if jnp.ndim(leaves[0]) == 0:
            raise AssertionError(f"{name}: expected a leading query axis")
        q = jnp.shape(leaves[0])[0]
        for x, s in zip(leaves, self.leaves):
            chex.assert_shape(x, (q,) + tuple(s.shape))
            chex.assert_type(x, s.dtype)
        return int(q)
