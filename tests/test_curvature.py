"""Curvature operators against dense matrices formed independently (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxinf import curvature as cv
from jaxinf.curvature import toy


def x64():
    """Scoped 64-bit mode (never flipped globally)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


@pytest.fixture(autouse=True)
def _x64():
    with x64():
        yield


@pytest.fixture(scope="module")
def mlp():
    with x64():
        return toy.mlp_problem(0)


@pytest.fixture(scope="module")
def linear():
    with x64():
        return toy.linear_problem(1)


def _vec(params, seed):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def _flat_fn(f, params):
    """f(params, ...) as a function of the flat parameter vector."""
    _, unravel = ravel_pytree(params)
    return lambda x, *a: f(unravel(x), *a)


def test_hvp_equals_dense_hessian_times_v(mlp):
    op = cv.hessian_operator(mlp.loss_fn, mlp.params, mlp.batches)
    # jax.hessian of the flat loss, batch by batch (independent of the jvp-of-grad path)
    hess = np.asarray(cv.dense_hessian(mlp.loss_fn, mlp.params, mlp.batches))
    v = _vec(mlp.params, 3)
    hv = op(v)
    assert jax.tree.structure(hv) == jax.tree.structure(mlp.params)
    assert _rel(_flat(hv), hess @ _flat(v)) < 1e-12
    # the dense oracle built from operator columns is the same matrix
    assert _rel(cv.dense_matrix(op), hess) < 1e-12
    # and the library HVP is the batch mean of the bare jvp(grad) composition
    raw = np.mean([_flat(cv.raw_hvp(mlp.loss_fn, mlp.params, b, v)) for b in mlp.batches], axis=0)
    assert _rel(_flat(hv), raw) < 1e-12


def test_ggn_equals_dense_jt_hout_j(mlp):
    op = cv.ggn_operator(mlp.model_fn, mlp.output_loss_fn, mlp.params, mlp.batches)
    flat = _flat(mlp.params)
    model = _flat_fn(mlp.model_fn, mlp.params)
    jacobian = jax.jit(jax.jacfwd(lambda x, b: model(x, b).ravel()))
    out_shape = mlp.model_fn(mlp.params, mlp.batches[0]).shape
    out_hessian = jax.jit(jax.hessian(lambda z, b: mlp.output_loss_fn(z.reshape(out_shape), b)))
    mats = []
    for b in mlp.batches:
        jac = np.asarray(jacobian(flat, b))  # [m c, n]
        h_out = np.asarray(out_hessian(model(flat, b).ravel(), b))  # [m c, m c]
        mats.append(jac.T @ h_out @ jac)
    ggn = np.mean(mats, axis=0)
    assert np.linalg.eigvalsh(ggn).min() > -1e-12  # PSD: convex output loss
    v = _vec(mlp.params, 4)
    assert _rel(_flat(op(v)), ggn @ _flat(v)) < 1e-12
    assert _rel(cv.dense_ggn(mlp.model_fn, mlp.output_loss_fn, mlp.params, mlp.batches), ggn) < 1e-12
    # for the non-linear MLP the GGN is a genuinely different matrix from the Hessian
    hess = cv.dense_hessian(mlp.loss_fn, mlp.params, mlp.batches)
    assert _rel(ggn, hess) > 1e-2


def test_fisher_equals_dense_mean_of_outer_products(mlp):
    op = cv.fisher_operator(mlp.per_example_loss_fn, mlp.params, mlp.batches)
    flat = _flat(mlp.params)
    grad = jax.jit(jax.grad(_flat_fn(mlp.loss_fn, mlp.params)))
    grads = []
    for b in mlp.batches:  # one example at a time: g_i = grad of the loss on a batch of size 1
        for i in range(b["y"].shape[0]):
            ex = jax.tree.map(lambda a: a[i : i + 1], b)
            grads.append(np.asarray(grad(flat, ex)))
    g = np.stack(grads)
    fisher = g.T @ g / g.shape[0]
    v = _vec(mlp.params, 5)
    assert _rel(_flat(op(v)), fisher @ _flat(v)) < 1e-12
    assert _rel(cv.dense_fisher(mlp.per_example_loss_fn, mlp.params, mlp.batches), fisher) < 1e-12
    assert _rel(cv.dense_matrix(op), fisher) < 1e-12
    # per-example gradients in pytree form, in batch order
    peg = op.per_example_grads()
    peg_flat = np.concatenate([np.asarray(x).reshape(g.shape[0], -1) for x in jax.tree.leaves(peg)], axis=1)
    assert _rel(peg_flat, g) < 1e-12


def test_ggn_equals_hessian_for_linear_model(linear):
    hess_op = cv.hessian_operator(linear.loss_fn, linear.params, linear.batches)
    ggn_op = cv.ggn_operator(linear.model_fn, linear.output_loss_fn, linear.params, linear.batches)
    ggn = np.asarray(cv.dense_matrix(ggn_op))
    assert _rel(ggn, cv.dense_matrix(hess_op)) < 1e-12
    assert np.linalg.eigvalsh(ggn).min() > -1e-12  # convex loss: PSD Hessian


def test_operator_averages_over_the_batch_list(mlp):
    v = _vec(mlp.params, 7)
    full = cv.fisher_operator(mlp.per_example_loss_fn, mlp.params, mlp.batches)
    each = [cv.fisher_operator(mlp.per_example_loss_fn, mlp.params, [b]) for b in mlp.batches]
    mean = np.mean([_flat(op(v)) for op in each], axis=0)
    assert _rel(_flat(full(v)), mean) < 1e-12
    assert full.num_batches == len(mlp.batches)
    assert full.dim == _flat(mlp.params).size


def test_spectral_estimates(mlp):
    op = cv.fisher_operator(mlp.per_example_loss_fn, mlp.params, mlp.batches)
    mat = np.asarray(cv.dense_matrix(op))
    evals = np.linalg.eigvalsh(mat)
    errs = [abs(float(cv.largest_eigenvalue(op, jax.random.key(0), num_iters=k)) - evals[-1]) for k in (5, 200)]
    assert errs[1] < 1e-6 * evals[-1] and errs[1] < errs[0]
    per_batch = float(cv.largest_eigenvalue(op, jax.random.key(0), num_iters=200, per_batch=True))
    assert per_batch >= evals[-1] * (1 - 1e-6)  # convexity: max_b lambda_max(C_b) >= lambda_max(mean)
    ggn = cv.ggn_operator(mlp.model_fn, mlp.output_loss_fn, mlp.params, mlp.batches)
    exact_tr = np.trace(np.asarray(cv.dense_matrix(ggn)))
    tr = float(cv.hutchinson_trace(ggn, jax.random.key(2), num_probes=256))
    assert abs(tr - exact_tr) / exact_tr < 0.1


def test_contracts(mlp):
    op = cv.hessian_operator(mlp.loss_fn, mlp.params, mlp.batches)
    bad = jax.tree.map(lambda x: jnp.zeros(x.shape + (1,), x.dtype), mlp.params)
    with pytest.raises(AssertionError):
        op(bad)
    with pytest.raises(AssertionError):  # wrong dtype
        op(jax.tree.map(lambda x: x.astype(jnp.float32), mlp.params))
    with pytest.raises(TypeError):
        cv.hessian_operator(mlp.loss_fn, mlp.params, tuple(mlp.batches))
    with pytest.raises(ValueError):
        cv.hessian_operator(mlp.loss_fn, mlp.params, [])
    with pytest.raises(ValueError):
        cv.ggn_operator(mlp.model_fn, mlp.output_loss_fn, mlp.params, mlp.batches).per_example_grads()
