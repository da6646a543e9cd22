"""Partition of a parameter pytree into layers, for block-diagonal (per-layer) solvers.

A "layer" is by default a top-level key of the parameter pytree (``by="top"``):
for LoRA adapters stored as {"model/layers/0/self_attn/q_proj": {"A": .., "B": ..}, ...}
each adapter (A and B together) is one block.  ``by="leaf"`` makes every leaf
(array) its own block -- what the DataInf reference code does (one block per
lora_A / lora_B weight); ``by="all"`` is a single block (no block-diagonal
approximation).  The curvature is then approximated block-diagonally:
C ~ diag(C_1, ..., C_L), each block acting on the flattened layer vector.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.curvature._tree import TreeSpec

PyTree = Any


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


@dataclasses.dataclass(frozen=True)
class LayerPartition:
    """Static grouping of the leaves of a pytree into named blocks."""

    spec: TreeSpec
    names: tuple  # block names
    groups: tuple  # tuple (per block) of tuples of leaf indices (jax.tree order)

    @classmethod
    def of(cls, tree: PyTree, by: str = "top") -> "LayerPartition":
        if by not in ("top", "leaf", "all"):
            raise ValueError(f"by must be 'top', 'leaf' or 'all', got {by!r}")
        spec = TreeSpec.of(tree)
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        names, groups = [], []
        for i, path in enumerate(paths):
            if by == "all":
                name = "all"
            elif by == "top":
                name = _key_name(path[0]) if path else ""
            else:
                name = "/".join(_key_name(k) for k in path)
            if name in names:
                groups[names.index(name)].append(i)
            else:
                names.append(name)
                groups.append([i])
        return cls(spec, tuple(names), tuple(tuple(g) for g in groups))

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def dims(self) -> tuple:
        """d_l, the number of parameters of each block."""
        sizes = self.spec.sizes
        return tuple(int(sum(sizes[i] for i in g)) for g in self.groups)

    def split(self, tree: PyTree) -> list:
        """Pytree -> list of flat block vectors [d_l]."""
        leaves = self.spec.treedef.flatten_up_to(tree)
        dt = self.spec.dtype
        return [jnp.concatenate([jnp.ravel(leaves[i]).astype(dt) for i in g]) for g in self.groups]

    def split_batched(self, tree: PyTree) -> list:
        """Pytree with leaves [N, *leaf] -> list of [N, d_l] matrices."""
        leaves = self.spec.treedef.flatten_up_to(tree)
        dt = self.spec.dtype
        return [
            jnp.concatenate([leaves[i].reshape(leaves[i].shape[0], -1).astype(dt) for i in g], axis=1)
            for g in self.groups
        ]

    def merge(self, blocks: Sequence[jax.Array]) -> PyTree:
        """Inverse of split: list of flat block vectors -> pytree."""
        out = [None] * len(self.spec.leaves)
        for g, x in zip(self.groups, blocks):
            offsets = np.cumsum((0,) + tuple(self.spec.sizes[i] for i in g))
            for j, i in enumerate(g):
                s = self.spec.leaves[i]
                out[i] = x[offsets[j] : offsets[j + 1]].reshape(s.shape).astype(s.dtype)
        return jax.tree.unflatten(self.spec.treedef, out)
