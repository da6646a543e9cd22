"""Curvature operators v -> C v on parameter pytrees.

Every operator is the average over a fixed, ordered list of B batches
(all batches must have identical shapes; they are stacked on a leading axis):

    C v = (1/B) sum_b C_b v,

where C_b is one of, at the linearisation point theta (``params``):

* Hessian      H_b = d^2/dtheta^2 L(theta, batch_b), computed forward-over-reverse:
                H_b v = jvp(grad L(., batch_b), (theta,), (v,)).
* Gauss-Newton G_b = J_b^T H_out,b J_b with J_b = d f(theta, batch_b)/dtheta the
                Jacobian of the model output f and H_out,b = d^2 l(z, batch_b)/dz^2
                the Hessian of the output loss l at z = f(theta, batch_b):
                jvp of f (via ``jax.linearize``) -> hvp of l in output space ->
                transpose of the linearised f.  PSD whenever l is convex in z.
* Emp. Fisher  F_b = (1/m) sum_i g_i g_i^T with g_i = grad of the per-example loss
                l_i(theta) over the m examples of batch b.  F_b v = J^T (J v) / m with
                J the [m x n] Jacobian of the per-example loss vector (one jvp and
                one transpose; per-example gradients are never stored).

With equal batch sizes the Fisher average equals (1/N) sum_i g_i g_i^T over
all N = B m examples.

Operators are pytrees (params and stacked batches are data; loss functions
are static), so the same compiled code is reused for any params/batches of
the same shapes and the operator can be passed into ``jax.jit``-ed solvers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxinf.curvature._tree import TreeSpec, stack_trees, tree_index, tree_scale, tree_zeros_like

PyTree = Any

HESSIAN = "hessian"
GGN = "ggn"
FISHER = "fisher"


def _hessian_product(fns, params, batch, v):
    (loss_fn,) = fns
    return jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (v,))[1]


def _ggn_product(fns, params, batch, v):
    model_fn, output_loss_fn = fns
    out, f_jvp = jax.linearize(lambda p: model_fn(p, batch), params)
    jv = f_jvp(v)
    hjv = jax.jvp(jax.grad(lambda z: output_loss_fn(z, batch)), (out,), (jv,))[1]
    (jthjv,) = jax.linear_transpose(f_jvp, params)(hjv)
    return jthjv


def _fisher_product(fns, params, batch, v):
    (per_example_loss_fn,) = fns
    losses, f_jvp = jax.linearize(lambda p: per_example_loss_fn(p, batch), params)
    if losses.ndim != 1:
        raise ValueError(f"per_example_loss must return a [batch] vector, got shape {losses.shape}")
    jv = f_jvp(v)  # [m]: g_i^T v
    (jtjv,) = jax.linear_transpose(f_jvp, params)(jv)
    return tree_scale(jtjv, 1.0 / losses.shape[0])


_PRODUCTS = {HESSIAN: _hessian_product, GGN: _ggn_product, FISHER: _fisher_product}


@dataclasses.dataclass(frozen=True)
class CurvatureOperator:
    """C v = (1/B) sum_b C_b v for a curvature kind in {"hessian", "ggn", "fisher"}.

    Attributes:
      params: linearisation point theta (pytree of arrays).
      batches: the B batches stacked along a new leading axis.
      kind: "hessian" | "ggn" | "fisher" (static).
      fns: the loss functions defining C (static):
        hessian: (loss(params, batch) -> scalar,)
        ggn: (model(params, batch) -> outputs, output_loss(outputs, batch) -> scalar)
        fisher: (per_example_loss(params, batch) -> [m],)
      shared: optional data every batch needs but that is not differentiated (a dict, e.g. {"base": frozen
        weights}); each product sees batch | shared. Held once, not stacked per batch, and an argument of the
        compiled code, not a constant folded into it.
    """

    params: PyTree
    batches: PyTree
    kind: str
    fns: tuple
    shared: PyTree = None

    def _with_shared(self, batch):
        return batch if self.shared is None else {**batch, **self.shared}

    @functools.cached_property
    def spec(self) -> TreeSpec:
        """Static structure/shapes/dtypes of the parameters (and of every vector v)."""
        return TreeSpec.of(self.params)

    @property
    def dim(self) -> int:
        """n, the number of parameters."""
        return self.spec.size

    @property
    def num_batches(self) -> int:
        return int(jax.tree.leaves(self.batches)[0].shape[0])

    def batch_matvec(self, v: PyTree, index) -> PyTree:
        """C_index v for one batch (index may be a traced integer)."""
        batch = self._with_shared(tree_index(self.batches, index))
        return _PRODUCTS[self.kind](self.fns, self.params, batch, v)

    def matvec(self, v: PyTree) -> PyTree:
        """C v averaged over all batches (traceable; use __call__ for the jitted version)."""

        def body(acc, batch):
            cv = _PRODUCTS[self.kind](self.fns, self.params, self._with_shared(batch), v)
            return jax.tree.map(jnp.add, acc, cv), None

        acc, _ = jax.lax.scan(body, tree_zeros_like(v), self.batches)
        return tree_scale(acc, 1.0 / self.num_batches)

    def __call__(self, v: PyTree) -> PyTree:
        """Jitted C v (compiled once per operator kind/functions/shapes)."""
        self.spec.check(v, "v")
        return _jit_matvec(self, v)

    def per_example_grads(self) -> PyTree:
        """Per-example gradients g_i for all N = B m examples, leaves shaped [N, *leaf].

        Only for kind == "fisher" (needs the per-example loss).  Jitted.
        """
        if self.kind != FISHER:
            raise ValueError(f"per_example_grads needs a 'fisher' operator, got {self.kind!r}")
        return _jit_per_example_grads(self)


jax.tree_util.register_dataclass(
    CurvatureOperator, data_fields=["params", "batches", "shared"], meta_fields=["kind", "fns"]
)


@jax.jit
def _jit_matvec(op: CurvatureOperator, v: PyTree) -> PyTree:
    return op.matvec(v)


@jax.jit
def _jit_per_example_grads(op: CurvatureOperator) -> PyTree:
    (per_example_loss_fn,) = op.fns

    def one_batch(batch):
        return jax.jacrev(per_example_loss_fn)(op.params, op._with_shared(batch))  # leaves [m, *leaf]

    grads = jax.lax.map(one_batch, op.batches)  # leaves [B, m, *leaf]
    return jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grads)


def _stack(batches: Sequence[PyTree]) -> PyTree:
    if not isinstance(batches, list):
        raise TypeError(
            "batches must be a Python list of batch pytrees (identical shapes); "
            f"got {type(batches).__name__}"
        )
    return stack_trees(batches)


def hessian_operator(loss_fn: Callable, params: PyTree, batches: list, shared: PyTree = None) -> CurvatureOperator:
    """Exact Hessian product H v = (1/B) sum_b jvp(grad loss(., b), theta, v)."""
    return CurvatureOperator(params, _stack(batches), HESSIAN, (loss_fn,), shared)


def ggn_operator(
    model_fn: Callable, output_loss_fn: Callable, params: PyTree, batches: list, shared: PyTree = None
) -> CurvatureOperator:
    """Gauss-Newton product G v = (1/B) sum_b J_b^T H_out,b J_b v.

    model_fn(params, batch) -> outputs (any pytree, e.g. logits [m, T, V]);
    output_loss_fn(outputs, batch) -> scalar, so that the training loss is
    output_loss_fn(model_fn(params, batch), batch).
    """
    return CurvatureOperator(params, _stack(batches), GGN, (model_fn, output_loss_fn), shared)


def fisher_operator(per_example_loss_fn: Callable, params: PyTree, batches: list,
                    shared: PyTree = None) -> CurvatureOperator:
    """Empirical Fisher product F v = (1/N) sum_i g_i (g_i^T v), g_i = grad l_i(theta).

    per_example_loss_fn(params, batch) -> [m] losses (their mean is the batch loss).
    """
    return CurvatureOperator(params, _stack(batches), FISHER, (per_example_loss_fn,), shared)


@functools.partial(jax.jit, static_argnums=0)
def _raw_hvp(loss_fn, params, batch, v):
    return jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (v,))[1]


def raw_hvp(loss_fn: Callable, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """The bare jitted ``jax.jvp(jax.grad(loss), (p,), (v,))`` on one batch (a baseline)."""
    return _raw_hvp(loss_fn, params, batch, v)
