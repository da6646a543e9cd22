"""iHVP solvers checked against the exact dense solve (float64, tiny MLP, 3 fixed batches)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.flatten_util import ravel_pytree

from jaxinf import curvature as cv
from jaxinf import attribution, ihvp
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


@dataclasses.dataclass
class Setup:
    prob: toy.Problem
    ops: dict
    dense: dict
    v: object
    vs: object


@pytest.fixture(scope="module")
def s():
    with x64():
        prob = toy.mlp_problem(0)
        ops = {
            "hessian": cv.hessian_operator(prob.loss_fn, prob.params, prob.batches),
            "ggn": cv.ggn_operator(prob.model_fn, prob.output_loss_fn, prob.params, prob.batches),
            "fisher": cv.fisher_operator(prob.per_example_loss_fn, prob.params, prob.batches),
        }
        dense = {k: np.asarray(cv.dense_matrix(op)) for k, op in ops.items()}
        flat, unravel = ravel_pytree(prob.params)
        rng = np.random.default_rng(123)
        v = unravel(jnp.asarray(rng.standard_normal(flat.shape)))
        vs = jax.vmap(unravel)(jnp.asarray(rng.standard_normal((8,) + flat.shape)))
        return Setup(prob, ops, dense, v, vs)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def exact(mat, lam, v):
    return np.linalg.solve(mat + lam * np.eye(len(mat)), flat(v))


def spectral(mat, lam, v, t):
    """U diag(1/(t(theta)+lam)) U^T v from numpy's eigh."""
    theta, u = np.linalg.eigh(mat)
    return u @ ((u.T @ flat(v)) / (t(theta) + lam))


def block_diag(mat, dims):
    out = np.zeros_like(mat)
    o = np.cumsum((0,) + tuple(dims))
    for a, b in zip(o[:-1], o[1:]):
        out[a:b, a:b] = mat[a:b, a:b]
    return out


def layer_order(params, by="top"):
    """Permutation from ravel_pytree order to layer-block order, and block sizes."""
    part = ihvp.LayerPartition.of(params, by=by)
    offsets = np.cumsum((0,) + part.spec.sizes)
    perm = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for g in part.groups for i in g])
    return perm, part.dims


KEY = jax.random.key(7)


# ----------------------------------------------------------------------------- direct


@pytest.mark.parametrize("kind,lam", [("hessian", 0.05), ("ggn", 1e-3), ("fisher", 1e-3)])
def test_direct_matches_dense_solve(s, kind, lam):
    solver = ihvp.direct(lam)
    x = solver.apply(solver.fit(s.ops[kind]), s.v)
    assert rel(flat(x), exact(s.dense[kind], lam, s.v)) < 1e-6


def test_direct_negative_eigenvalue_policies(s):
    mat, lam = s.dense["hessian"], 0.05
    assert np.linalg.eigvalsh(mat).min() < -lam  # genuinely indefinite after damping
    for mode, t in [("abs", np.abs), ("clip", lambda th: np.maximum(th, 0.0))]:
        solver = ihvp.direct(lam, negative=mode)
        x = solver.apply(solver.fit(s.ops["hessian"]), s.v)
        assert rel(flat(x), spectral(mat, lam, s.v, t)) < 1e-10
        assert rel(flat(x), exact(mat, lam, s.v)) > 1e-2  # and really differs from "keep"


def test_direct_refuses_an_undamped_singular_matrix(s):
    # the empirical Fisher has rank N = 48 < n: undamped it is singular
    theta = np.linalg.eigvalsh(s.dense["fisher"])
    assert abs(theta[0]) < 1e-12
    with pytest.raises(ValueError, match=r"singular.*smallest eigenvalue of C.*damping > 0"):
        ihvp.direct(0.0).fit(s.ops["fisher"])
    with pytest.raises(ValueError, match="singular"):
        ihvp.fit_matrix(jnp.asarray(s.dense["fisher"]), ihvp.direct(0.0).fit(s.ops["ggn"]).spec, 0.0)
    # damped, or a nonsingular indefinite matrix, is fine
    ihvp.direct(1e-3).fit(s.ops["fisher"])
    ihvp.direct(0.05).fit(s.ops["hessian"])


def test_relative_damping_refuses_a_nonpositive_hutchinson_trace():
    params = {"w": jnp.ones((6,), jnp.float64)}
    batches = [{"x": jnp.ones((2,), jnp.float64)}, {"x": 2 * jnp.ones((2,), jnp.float64)}]
    op = cv.hessian_operator(lambda p, b: -jnp.sum(p["w"] ** 2) * jnp.mean(b["x"]), params, batches)  # H = -3 I
    with pytest.raises(ValueError, match=r"tr\(C\) > 0.*-18"):
        ihvp.operator_damping(ihvp.relative(0.1), op, KEY)
    with pytest.raises(ValueError, match="Hutchinson"):
        ihvp.cg(ihvp.relative(0.1)).fit(op, KEY)


def test_relative_damping_is_fraction_of_mean_eigenvalue(s):
    mat = s.dense["ggn"]
    lam = 0.1 * np.trace(mat) / len(mat)
    solver = ihvp.direct(ihvp.relative(0.1))
    state = solver.fit(s.ops["ggn"])
    assert abs(float(state.damping) - lam) < 1e-12
    assert rel(flat(solver.apply(state, s.v)), exact(mat, lam, s.v)) < 1e-10
    # iterative solvers estimate tr(C) by Hutchinson (needs a key)
    est = float(ihvp.operator_damping(ihvp.relative(0.1), s.ops["ggn"], KEY, trace_probes=256))
    assert abs(est - lam) / lam < 0.1
    with pytest.raises(ValueError, match="key"):
        ihvp.cg(ihvp.relative(0.1)).fit(s.ops["ggn"])
    # for the empirical Fisher the trace is exact: mean_i ||g_i||^2
    fisher = s.dense["fisher"]
    got = float(ihvp.operator_damping(ihvp.relative(0.1), s.ops["fisher"]))
    assert abs(got - 0.1 * np.trace(fisher) / len(fisher)) < 1e-12 * got


def test_damping_helper():
    assert float(ihvp.resolve_damping(0.3)) == 0.3
    assert float(ihvp.absolute(0.3).resolve(100.0, 10)) == 0.3
    assert float(ihvp.relative(0.5).resolve(100.0, 10)) == 5.0
    assert ihvp.as_damping(2) == ihvp.absolute(2.0)
    with pytest.raises(ValueError):
        ihvp.relative(0.1).resolve()
    with pytest.raises(ValueError):
        ihvp.absolute(-1.0)


# ----------------------------------------------------------------------------- CG


def test_cg_matches_dense_solve(s):
    lam = 1e-3
    solver = ihvp.cg(lam, tol=1e-12, maxiter=1000)
    x, info = solver.apply_with_info(solver.fit(s.ops["fisher"]), s.v)
    assert bool(info["converged"]) and float(info["relative_residual"]) <= 1e-12
    assert 0 < int(info["iterations"]) < 1000
    assert rel(flat(x), exact(s.dense["fisher"], lam, s.v)) < 1e-6


def test_cg_iteration_cap(s):
    lam = 1e-3
    capped = ihvp.cg(lam, tol=1e-12, maxiter=3)  # same compiled solve: tol/maxiter are data
    x, info = capped.apply_with_info(capped.fit(s.ops["fisher"]), s.v)
    assert int(info["iterations"]) == 3 and not bool(info["converged"])
    assert rel(flat(x), exact(s.dense["fisher"], lam, s.v)) > 1e-3


def _diagonal_hessian(diag):
    """H = diag(d) exactly: the Hessian of 0.5 sum_i d_i w_i^2, whose products H v = d * v are exact in floating point
    for small integer d and v (no rounding anywhere, so the sign of p^T H p is exact on every CPU)."""
    d = jnp.asarray(diag, jnp.float64)
    return cv.hessian_operator(lambda p, b: 0.5 * jnp.sum(b["d"] * p["w"] ** 2), {"w": jnp.zeros_like(d)}, [{"d": d}])


@pytest.mark.parametrize(
    "diag, damping, why",
    [
        ([0.0, 1.0, 2.0, 4.0], 0.0, "exact null space: p^T H p = 0"),
        ([-1.0, 1.0, 2.0, 4.0], 0.0, "negative direction: p^T H p = -1"),
        ([-1.0, 1.0, 2.0, 4.0], 0.5, "too little damping: p^T (H + 0.5 I) p = -0.5"),
    ],
)
def test_cg_refuses_nonpositive_curvature(diag, damping, why):
    # the right-hand side e_0 makes the first search direction p = e_0, so p^T (H + lambda I) p = d_0 + lambda exactly
    op = _diagonal_hessian(diag)
    rhs = {"w": jnp.asarray([1.0, 0.0, 0.0, 0.0], jnp.float64)}
    solver = ihvp.cg(damping, tol=1e-12, maxiter=100)
    with pytest.raises(ihvp.SolverFailedError, match=rf"not positive definite\) with damping={damping:.3g} "):
        solver.apply(solver.fit(op), rhs)
    # the same operator with enough damping is positive definite and CG solves it exactly
    ok = ihvp.cg(2.0, tol=1e-12, maxiter=100)
    x, info = ok.apply_with_info(ok.fit(op), rhs)
    assert bool(info["converged"]) and not bool(info["nonpositive_curvature"]), why
    np.testing.assert_allclose(np.asarray(x["w"]), [1.0 / (diag[0] + 2.0), 0.0, 0.0, 0.0], rtol=1e-14)


# ----------------------------------------------------------------------------- Lanczos / Arnoldi


def test_lanczos_full_rank_matches_dense_solve(s):
    # indefinite Hessian, damping below |lambda_min|: "keep" must still give (H + lambda I)^{-1}
    lam = 0.05
    n = len(s.dense["hessian"])
    solver = ihvp.lanczos(lam, num_iters=n, reorthogonalize=True)
    state = solver.fit(s.ops["hessian"], KEY)
    assert rel(flat(solver.apply(state, s.v)), exact(s.dense["hessian"], lam, s.v)) < 1e-6
    # all n Ritz values are eigenvalues (including the 13-fold zero: needs breakdown restarts)
    np.testing.assert_allclose(
        np.sort(np.asarray(state.ritz_values)), np.linalg.eigvalsh(s.dense["hessian"]), atol=1e-10
    )


def test_lanczos_negative_policies(s):
    lam, n, mat = 0.05, len(s.dense["hessian"]), s.dense["hessian"]
    solver = ihvp.lanczos(lam, num_iters=n, negative="abs")
    state = solver.fit(s.ops["hessian"], KEY)
    x = solver.apply(state, s.v)
    assert rel(flat(x), spectral(mat, lam, s.v, np.abs)) < 1e-6
    # the policy is state data: the same Ritz pairs with "clip"
    clip = dataclasses.replace(state, negative=ihvp.lowrank.negative_code("clip"))
    x = solver.apply(clip, s.v)
    assert rel(flat(x), spectral(mat, lam, s.v, lambda th: np.maximum(th, 0.0))) < 1e-6


@pytest.mark.parametrize("method", ["lanczos", "arnoldi"])
def test_ritz_values_and_low_rank_inverse(s, method):
    mat, lam, m, k = s.dense["fisher"], 1e-2, 40, 10
    theta, u = np.linalg.eigh(mat)
    solver = getattr(ihvp, method)(lam, num_iters=m, rank=k)
    state = solver.fit(s.ops["fisher"], KEY)
    ritz, res = np.asarray(state.ritz_values), np.asarray(state.ritz_residuals)
    assert ritz.shape == res.shape == (m,)
    converged = res < 1e-8 * theta[-1]
    assert converged.sum() >= k  # at least the top-k have converged after 40 steps
    for r, r_res in zip(ritz[converged], res[converged]):
        # a Ritz value of a symmetric matrix lies within its residual of an eigenvalue; relative accuracy is
        # asked only where that eigenvalue is above the null space's rounding level (|theta| ~ 1e-16 there)
        nearest = theta[np.argmin(np.abs(theta - r))]
        assert abs(r - nearest) <= 1e-6 * abs(nearest) + r_res + 1e-12 * theta[-1]
    # the top-k Ritz values are the top-k eigenvalues ...
    np.testing.assert_allclose(np.sort(np.asarray(state.eigvals)), theta[-k:], rtol=1e-6)
    # ... and, truncated (k = 10 below the rank 48), the default inverse is the projection onto the top-k
    # eigenspace, U diag(1/(theta+lam)) U^T v (Schioppa et al. 2022), with the exact U
    uk, vf = u[:, -k:], flat(s.v)
    top = uk @ ((uk.T @ vf) / (theta[-k:] + lam))
    assert rel(flat(solver.apply(state, s.v)), top) < 1e-6
    # complement="damping" adds (v - U U^T v)/lam on the rest
    damped = getattr(ihvp, method)(lam, num_iters=m, rank=k, complement="damping")
    want = top + (vf - uk @ (uk.T @ vf)) / lam
    assert rel(flat(damped.apply(damped.fit(s.ops["fisher"], KEY), s.v)), want) < 1e-6
    assert rel(top, want) > 0.5  # the two rules really differ here
    # neither is the exact inverse (rank 10 of 48 nonzero directions)
    assert rel(want, exact(mat, lam, s.v)) > 1e-2 and rel(top, exact(mat, lam, s.v)) > 1e-2
    with pytest.raises(ValueError, match="complement"):
        getattr(ihvp, method)(lam, num_iters=m, complement="none")


# ----------------------------------------------------------------------------- LiSSA


def test_lissa_error_falls_with_depth_and_reaches_1e_3(s):
    mat = s.dense["fisher"]
    lam = 0.1  # well conditioned: (lambda_max + lam) / lam ~ 10
    want = exact(mat, lam, s.v)
    errs = []
    for depth in (20, 160):
        solver = ihvp.lissa(lam, depth=depth, sampling="full")
        state = solver.fit(s.ops["fisher"], KEY)
        top = np.linalg.eigvalsh(mat)[-1]
        assert abs(float(state.scale) - 1.25 * (top + lam)) < 1e-3 * top  # power-iteration scale
        errs.append(rel(flat(solver.apply(state, s.v)), want))
    assert errs[0] > 10 * errs[1]
    assert errs[-1] < 1e-3
    # stochastic: one batch per step (cycled), 2 repeats averaged -> close, not exact
    cyc = ihvp.lissa(lam, depth=40, repeats=2)  # same config as the batched test
    cyc_err = rel(flat(cyc.apply(cyc.fit(s.ops["fisher"], KEY), s.v)), want)
    assert errs[-1] < cyc_err < 0.5


def test_lissa_cycles_batches_as_documented(s):
    """Cycled LiSSA equals the hand-built recursion v_{j+1} = v + (1 - lam/s) v_j - C_{b_j} v_j / s with
    b_j = (j + r) mod B, averaged over repeats r, to rounding: a wrong batch index (e.g. always 0) fails."""
    op, lam, depth, repeats = s.ops["fisher"], 0.1, 7, 2
    solver = ihvp.lissa(lam, depth=depth, repeats=repeats)
    state = solver.fit(op, KEY)
    sc, nb, vf = float(state.scale), op.num_batches, flat(s.v)
    unravel = ravel_pytree(s.prob.params)[1]
    total = np.zeros_like(vf)
    for r in range(repeats):
        x = vf.copy()
        for j in range(depth):
            cx = flat(op.batch_matvec(unravel(jnp.asarray(x)), (j + r) % nb))
            x = vf + (1 - lam / sc) * x - cx / sc
        total += x
    want = total / (repeats * sc)
    got = flat(solver.apply(state, s.v))
    wrong = np.zeros_like(vf)  # the same recursion with batch 0 at every step
    x = vf.copy()
    for j in range(depth):
        x = vf + (1 - lam / sc) * x - flat(op.batch_matvec(unravel(jnp.asarray(x)), 0)) / sc
    assert rel(got, want) < 1e-10
    assert rel(x / sc, want) > 1e-3  # batch 0 alone is far from it: the check can tell them apart


def test_lissa_divergence_raises_naming_damping_and_scale(s):
    # scale below (lambda_max + damping)/2: the top eigendirection is amplified every step
    too_small = ihvp.lissa(0.1, scale=0.2, depth=160, sampling="full")
    with pytest.raises(ihvp.SolverFailedError, match=r"diverged.*damping=0\.1.*scale=0\.2"):
        too_small.apply(too_small.fit(s.ops["fisher"]), s.v)


def test_lissa_row_space_equals_the_parameter_space_recursion():
    """On a cached gradient Fisher G^T G / N, LiSSA's coefficient recursion (v_j = a g + G^T c) gives the
    parameter-space iterates: same result in float64 for several queries, and the same divergence verdict."""
    from jaxinf.curvature.cached import gradient_fisher_operator

    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        grads = {"a": jnp.asarray(rng.standard_normal((6, 4, 3))), "b": jnp.asarray(rng.standard_normal((6, 5)))}
        qs = {"a": jnp.asarray(rng.standard_normal((3, 4, 3))), "b": jnp.asarray(rng.standard_normal((3, 5)))}
        op = gradient_fisher_operator(grads)
        g = np.concatenate([np.asarray(grads["a"]).reshape(6, -1), np.asarray(grads["b"])], 1)
        q = np.concatenate([np.asarray(qs["a"]).reshape(3, -1), np.asarray(qs["b"])], 1)
        lam = 0.05
        want = np.linalg.solve(g.T @ g / 6 + lam * np.eye(17), q.T).T
        for depth, repeats in ((30, 1), (400, 2)):
            fast, slow = ihvp.lissa(lam, depth=depth, repeats=repeats), ihvp.lissa(
                lam, depth=depth, repeats=repeats, row_space=False)
            fs, ss = fast.fit(op, KEY), slow.fit(op, KEY)
            assert fs.gram is not None and ss.gram is None
            x_fast = np.asarray(attribution.flatten_rows(fast.apply_batched(fs, qs)))
            x_slow = np.asarray(attribution.flatten_rows(slow.apply_batched(ss, qs)))
            assert rel(x_fast, x_slow) < 1e-12
        deep = ihvp.lissa(lam, depth=5000)  # and it is LiSSA: deep enough, the damped inverse
        assert rel(np.asarray(attribution.flatten_rows(deep.apply_batched(deep.fit(op, KEY), qs))), want) < 1e-4
        bad = ihvp.lissa(lam, scale=0.5, depth=200)  # scale far below lambda_max / 2
        with pytest.raises(ihvp.SolverFailedError, match="diverged"):
            bad.apply(bad.fit(op), jax.tree.map(lambda x: x[0], qs))


# ----------------------------------------------------------------------------- Woodbury / DataInf


def _fisher_blocks(s, by):
    perm, dims = layer_order(s.prob.params, by)
    return s.dense["fisher"][np.ix_(perm, perm)], perm, dims


@pytest.mark.parametrize("by", ["top", "all"])
def test_woodbury_equals_dense_block_diagonal_inverse(s, by):
    fisher, perm, dims = _fisher_blocks(s, by)
    solver = ihvp.woodbury(ihvp.relative(0.1), by=by)
    state = solver.fit(s.ops["fisher"])
    o = np.cumsum((0,) + tuple(dims))
    lams = np.array([0.1 * np.trace(fisher[a:b, a:b]) / (b - a) for a, b in zip(o[:-1], o[1:])])
    np.testing.assert_allclose(np.asarray(state.dampings), lams, rtol=1e-12)
    damped = block_diag(fisher, dims) + np.diag(np.repeat(lams, dims))
    want = np.linalg.solve(damped, flat(s.v)[perm])
    assert rel(flat(solver.apply(state, s.v))[perm], want) < 1e-10


def test_woodbury_single_block_equals_full_damped_fisher_inverse(s):
    lam = 1e-3
    solver = ihvp.woodbury(lam, by="all")
    x = solver.apply(solver.fit(s.ops["fisher"]), s.v)
    assert rel(flat(x), exact(s.dense["fisher"], lam, s.v)) < 1e-10
    # the per-layer (block-diagonal) inverse is a different matrix
    per_layer = ihvp.woodbury(lam, by="top")
    assert rel(flat(per_layer.apply(per_layer.fit(s.ops["fisher"]), s.v)), flat(x)) > 1e-2


def _datainf_naive(grads, v, lam):
    """1/(n lam) sum_i (v - (g_i^T v)/(lam + ||g_i||^2) g_i), one example at a time."""
    out = np.zeros_like(v)
    for g in grads:
        out += (v - (g @ v) / (lam + g @ g) * g) / (len(grads) * lam)
    return out


@pytest.mark.parametrize("by", ["top", "leaf"])
def test_datainf_equals_naive_formula_and_differs_from_exact(s, by, record_property):
    fisher, perm, dims = _fisher_blocks(s, by)
    g = cv.dense_per_example_grads(s.prob.per_example_loss_fn, s.prob.params, s.prob.batches)
    g = np.asarray(g)[:, perm]
    vf = flat(s.v)[perm]
    solver = ihvp.datainf(by=by)  # default damping: lambda_l = 0.1 * mean_i ||g_i,l||^2 / d_l
    state = solver.fit(s.ops["fisher"])
    got = flat(solver.apply(state, s.v))[perm]
    o = np.cumsum((0,) + tuple(dims))
    want, exact_x = [], []
    for l, (a, b) in enumerate(zip(o[:-1], o[1:])):
        lam = 0.1 * np.mean(np.sum(g[:, a:b] ** 2, axis=1)) / (b - a)
        assert abs(float(state.dampings[l]) - lam) <= 1e-12 * lam
        want.append(_datainf_naive(g[:, a:b], vf[a:b], lam))
        exact_x.append(np.linalg.solve(fisher[a:b, a:b] + lam * np.eye(b - a), vf[a:b]))
    want, exact_x = np.concatenate(want), np.concatenate(exact_x)
    assert rel(got, want) < 1e-10
    gap = rel(got, exact_x)  # DataInf's approximation error against the exact damped block inverse
    record_property("datainf_vs_exact_rel_error", gap)
    print(f"DataInf ({by}) relative error vs exact per-layer inverse: {gap:.3f}")
    assert gap > 0.05


def test_identity_is_gradient_matching(s):
    state = ihvp.identity().fit(s.ops["ggn"])
    assert rel(flat(ihvp.identity().apply(state, s.v)), flat(s.v)) == 0.0
    half = ihvp.identity(scale=2.0)
    assert rel(flat(half.apply(half.fit(s.prob.params), s.v)), flat(s.v) / 2) < 1e-15


# ----------------------------------------------------------------------------- protocol


BATCH_SOLVERS = {
    "direct": lambda: ihvp.direct(1e-2),
    "cg": lambda: ihvp.cg(1e-2, tol=1e-10, maxiter=300),
    "lissa": lambda: ihvp.lissa(0.1, depth=40, repeats=2),
    "lanczos": lambda: ihvp.lanczos(1e-2, num_iters=40, rank=10),  # shapes shared with the Ritz test
    "arnoldi": lambda: ihvp.arnoldi(1e-2, num_iters=40, rank=10),
    "woodbury": lambda: ihvp.woodbury(),
    "datainf": lambda: ihvp.datainf(),
    "identity": lambda: ihvp.identity(),
}


@pytest.mark.parametrize("name", sorted(BATCH_SOLVERS))
def test_batched_apply_equals_python_loop(s, name):
    solver = BATCH_SOLVERS[name]()
    state = solver.fit(s.ops["fisher"], KEY)
    xs = solver.apply_batched(state, s.vs)
    assert jax.tree.structure(xs) == jax.tree.structure(s.vs)
    for i in range(8):
        xi = solver.apply(state, jax.tree.map(lambda a: a[i], s.vs))
        assert rel(flat(jax.tree.map(lambda a: a[i], xs)), flat(xi)) < 1e-9


def test_contracts(s):
    solver = ihvp.direct(1e-2)
    state = solver.fit(s.ops["ggn"])
    with pytest.raises(AssertionError):  # wrong shape
        solver.apply(state, jax.tree.map(lambda a: a[:1], s.vs))
    with pytest.raises(AssertionError):  # wrong dtype
        solver.apply(state, jax.tree.map(lambda a: a.astype(jnp.float32), s.v))
    with pytest.raises(AssertionError):  # no query axis
        solver.apply_batched(state, s.v)
    with pytest.raises(ValueError, match="key"):
        ihvp.lanczos(1e-2, num_iters=5).fit(s.ops["ggn"])
    with pytest.raises(ValueError):
        ihvp.lanczos(1e-2, num_iters=5, negative="flip")
    with pytest.raises(ValueError, match="fisher"):
        ihvp.woodbury().fit(s.ops["ggn"])
    cg = ihvp.cg(1e-2)
    x, info = jax.eval_shape(cg.solve, cg.fit(s.ops["fisher"]), s.v)  # the pure core traces
    assert set(info) >= {"ok", "iterations", "relative_residual"}
    assert jax.tree.structure(x) == jax.tree.structure(s.v)


# ----------------------------------------------------------------------------- the pure core, with and without jit


class PureSolveVariantsTest(chex.TestCase):
    """`solver.solve(state, v)` is the traceable core users jit/vmap themselves: it must give the exact damped
    solve both traced under `jax.jit` and run op by op (chex.variants), for the solvers whose answer is exact."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with x64():
            cls.prob = toy.mlp_problem(0)
            cls.op = cv.fisher_operator(cls.prob.per_example_loss_fn, cls.prob.params, cls.prob.batches)
            cls.dense = np.asarray(cv.dense_matrix(cls.op))
            flat_p, unravel = ravel_pytree(cls.prob.params)
            cls.v = unravel(jnp.asarray(np.random.default_rng(7).standard_normal(flat_p.shape)))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("direct", lambda: ihvp.direct(1e-2)),
        ("cg", lambda: ihvp.cg(1e-2, tol=1e-12, maxiter=1000)),
        ("lanczos_full_rank", lambda: ihvp.lanczos(1e-2, num_iters=173, reorthogonalize=True)),  # 173 parameters
    )
    def test_pure_solve_equals_dense_solve(self, make):
        with x64():
            solver = make()
            state = solver.fit(self.op, KEY)
            x, info = self.variant(solver.solve)(state, self.v)
            chex.assert_trees_all_equal_shapes_and_dtypes(x, self.v)
            assert bool(info["ok"])
            assert rel(flat(x), exact(self.dense, 1e-2, self.v)) < 1e-6
