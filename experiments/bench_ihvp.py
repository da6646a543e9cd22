"""Benchmark curvature products and iHVP solvers; writes JSON to --out.

1. Timing (one model, one batch): the library's jitted Hessian-vector product
   against the bare jitted ``jax.jvp(jax.grad(loss), (p,), (v,))`` on the same
   batch and vector (repeats interleaved, medians, ratio), and the ratios of
   HVP / GGN / Fisher product time to gradient time.
2. Error study (small model, a fixed list of batches): for each curvature
   (Hessian, GGN if the model/output-loss split is given, empirical Fisher),
   each damping lambda = fraction * tr(C)/n, and each solver setting, the
   relative error ||x - x*|| / ||x*|| against the exact solve x* = (C + lambda I)^{-1} g
   (float64 eigendecomposition of the dense C), with the number of curvature
   products each setting used (in units of a full product over all batches).

The model-facing entry points take the loss functions and parameters as
arguments, so any model exposing ``loss(params, batch) -> scalar`` and
``per_example_loss(params, batch) -> [B]`` can be plugged in:
``time_products(...)``, ``error_study(...)`` and ``run_benchmark(...)``.
By default a tiny 2-layer MLP language model over random tokens is built here.

Usage: python -m experiments.bench_ihvp [--out results/bench_ihvp.json] [--quick]
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from jaxinf import curvature as cv
from jaxinf import ihvp, runtime
from jaxinf.workdir import write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/bench_ihvp.json", "where to write the JSON results")
flags.DEFINE_integer("seed", 0, "seed for the model, data and solver keys")
flags.DEFINE_integer("repeats", 30, "timed repeats per function (interleaved)")
flags.DEFINE_bool("quick", False, "smaller sweeps (smoke test)")
# timing model
flags.DEFINE_list("lm_timing", [], "also time HVPs on LoRA adapters of these jaxinf models "
                  "(e.g. tiny-llama,smollm2-135m-instruct) on lm_batch x lm_seq random tokens")
flags.DEFINE_integer("lm_batch", 4, "LM timing: batch size")
flags.DEFINE_integer("lm_seq", 64, "LM timing: sequence length")
flags.DEFINE_integer("time_vocab", 512, "timing model: vocabulary size")
flags.DEFINE_integer("time_embed", 64, "timing model: embedding width")
flags.DEFINE_integer("time_hidden", 256, "timing model: hidden width")
flags.DEFINE_integer("time_seq", 64, "timing model: sequence length")
flags.DEFINE_integer("time_batch", 16, "timing model: batch size")
# error-study model (dense n x n must fit: n ~ 2k)
flags.DEFINE_integer("vocab", 32, "error-study model: vocabulary size")
flags.DEFINE_integer("embed", 16, "error-study model: embedding width")
flags.DEFINE_integer("hidden", 24, "error-study model: hidden width")
flags.DEFINE_integer("seq", 12, "error-study model: sequence length")
flags.DEFINE_integer("batch", 16, "error-study model: batch size")
flags.DEFINE_integer("num_batches", 3, "error-study model: number of batches")
flags.DEFINE_integer("num_queries", 4, "error study: query gradients (held-out batches)")

PyTree = Any


# ----------------------------------------------------------------------------- tiny MLP LM


def mlp_lm_init(key, vocab: int, embed: int, hidden: int, dtype=jnp.float32) -> dict:
    """Params of a next-token MLP LM: embedding -> tanh hidden layer -> vocabulary logits."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": {"table": jax.random.normal(k1, (vocab, embed), dtype)},
        "hidden": {
            "w": jax.random.normal(k2, (embed, hidden), dtype) / np.sqrt(embed),
            "b": jnp.zeros((hidden,), dtype),
        },
        "out": {
            "w": jax.random.normal(k3, (hidden, vocab), dtype) / np.sqrt(hidden),
            "b": jnp.zeros((vocab,), dtype),
        },
    }


def mlp_lm_logits(params, batch):
    """Logits [B, T-1, V] predicting tokens[:, 1:] from tokens[:, :-1]."""
    x = params["embed"]["table"][batch["tokens"][:, :-1]]
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def lm_token_losses(logits, batch):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]  # [B, T-1]


def lm_output_loss(logits, batch):
    return jnp.mean(lm_token_losses(logits, batch))


def mlp_lm_loss(params, batch):
    return lm_output_loss(mlp_lm_logits(params, batch), batch)


def mlp_lm_per_example_loss(params, batch):
    return jnp.mean(lm_token_losses(mlp_lm_logits(params, batch), batch), axis=-1)


def random_token_batches(key, num: int, batch: int, seq: int, vocab: int) -> list:
    return [
        {"tokens": jax.random.randint(k, (batch, seq), 0, vocab, dtype=jnp.int32)}
        for k in jax.random.split(key, num)
    ]


# ----------------------------------------------------------------------------- timing


def _interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time (s) of each zero-arg function, calls interleaved and order rotated."""
    for f in fns.values():  # compile + warm up
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k]())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_products(
    loss_fn: Callable,
    params: PyTree,
    batch: PyTree,
    repeats: int = 30,
    per_example_loss_fn: Optional[Callable] = None,
    model_fn: Optional[Callable] = None,
    output_loss_fn: Optional[Callable] = None,
    seed: int = 0,
) -> dict:
    """Median times of library HVP vs raw jvp(grad), gradient, and GGN/Fisher products (one batch)."""
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))
    hess = cv.hessian_operator(loss_fn, params, [batch])
    grad = jax.jit(jax.grad(loss_fn))
    fns = {
        "library_hvp": lambda: hess(v),
        "raw_jvp_grad": lambda: cv.raw_hvp(loss_fn, params, batch, v),
        "gradient": lambda: grad(params, batch),
    }
    if per_example_loss_fn is not None:
        fisher = cv.fisher_operator(per_example_loss_fn, params, [batch])
        fns["fisher_product"] = lambda: fisher(v)
    if model_fn is not None and output_loss_fn is not None:
        ggn = cv.ggn_operator(model_fn, output_loss_fn, params, [batch])
        fns["ggn_product"] = lambda: ggn(v)
    # correctness of what is being timed
    lib, raw = ravel_pytree(hess(v))[0], ravel_pytree(cv.raw_hvp(loss_fn, params, batch, v))[0]
    med = _interleaved_medians(fns, repeats)
    out = {
        "num_params": int(flat.size),
        "repeats": repeats,
        "median_seconds": med,
        "library_over_raw_hvp": med["library_hvp"] / med["raw_jvp_grad"],
        "hvp_over_gradient": med["library_hvp"] / med["gradient"],
        "raw_hvp_over_gradient": med["raw_jvp_grad"] / med["gradient"],
        "library_vs_raw_max_abs_diff": float(jnp.max(jnp.abs(lib - raw))),
    }
    for k in ("fisher_product", "ggn_product"):
        if k in med:
            out[f"{k.split('_')[0]}_over_gradient"] = med[k] / med["gradient"]
    return out


# ----------------------------------------------------------------------------- error study


def _reference(kind: str, fns: tuple, params: PyTree, batches: list) -> tuple:
    """Float64 eigendecomposition (theta, U) of the dense curvature matrix."""
    with jax.enable_x64(True):
        cast = lambda t: jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, t
        )
        op = cv.CurvatureOperator(params=cast(params), batches=cv.stack_trees(cast(batches)), kind=kind, fns=fns)
        mat = np.asarray(cv.dense_matrix(op), np.float64)
    theta, u = np.linalg.eigh(mat)
    return theta, u


def _rel_errors(xs: PyTree, exact: np.ndarray) -> list:
    got = np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda a: a[i], xs))[0], np.float64) for i in range(len(exact))])
    return [float(np.linalg.norm(g - e) / np.linalg.norm(e)) for g, e in zip(got, exact)]


def _record(rows: list, base: dict, solver: ihvp.IHVPSolver, op, key, queries, exact, products: float, **extra):
    row = dict(base, products=products, **extra)
    t0 = time.perf_counter()
    try:
        state = solver.fit(op, key)
        xs = solver.apply_batched(state, queries)
        jax.block_until_ready(xs)
        errs = _rel_errors(xs, exact)
        row.update(rel_error_median=float(np.median(errs)), rel_error_max=float(np.max(errs)))
    except ihvp.SolverFailedError as e:
        row.update(failed=str(e))
    row["seconds"] = time.perf_counter() - t0
    rows.append(row)


def error_study(
    loss_fn: Callable,
    params: PyTree,
    batches: list,
    queries: PyTree,
    per_example_loss_fn: Optional[Callable] = None,
    model_fn: Optional[Callable] = None,
    output_loss_fn: Optional[Callable] = None,
    damping_fractions=(1e-3, 1e-2, 1e-1),
    cg_iters=(1, 2, 4, 8, 16, 32, 64, 128),
    lissa_depths=(8, 32, 128, 512, 2048),
    krylov_iters=(8, 16, 32, 64, 128),
    seed: int = 0,
) -> dict:
    """Relative iHVP error of every solver vs the exact damped solve, per curvature and damping.

    queries: pytree of Q query vectors stacked on a leading axis (e.g. test-loss gradients).
    Damping lambda = fraction * tr(C)/n, the same absolute value for every solver.
    `products` counts curvature products in units of one full (all-batch) product.
    """
    kinds = {"hessian": (cv.HESSIAN, (loss_fn,))}
    if model_fn is not None and output_loss_fn is not None:
        kinds["ggn"] = (cv.GGN, (model_fn, output_loss_fn))
    if per_example_loss_fn is not None:
        kinds["fisher"] = (cv.FISHER, (per_example_loss_fn,))
    nb = len(batches)
    key = jax.random.key(seed)
    q_flat = np.stack(
        [np.asarray(ravel_pytree(jax.tree.map(lambda a: a[i], queries))[0], np.float64) for i in range(jax.tree.leaves(queries)[0].shape[0])]
    )
    out = {"num_params": int(q_flat.shape[1]), "num_batches": nb, "num_queries": len(q_flat), "curvatures": {}}
    for name, (kind, fns) in kinds.items():
        theta, u = _reference(kind, fns, params, batches)
        op = cv.CurvatureOperator(params=params, batches=cv.stack_trees(batches), kind=kind, fns=fns)
        mean_eig = float(theta.sum() / theta.size)
        info = {
            "eigenvalue_min": float(theta[0]),
            "eigenvalue_max": float(theta[-1]),
            "mean_eigenvalue": mean_eig,
            "num_negative": int((theta < -1e-8 * abs(theta).max()).sum()),
            "runs": [],
        }
        rows = info["runs"]
        for frac in damping_fractions:
            lam = frac * mean_eig
            exact = (u @ ((u.T @ q_flat.T) / (theta + lam)[:, None])).T  # [Q, n]
            shifted = np.abs(theta + lam)
            base = {
                "damping_fraction": frac,
                "damping": lam,
                "cond": float(shifted.max() / shifted.min()),  # of C + lambda I
                "indefinite": bool((theta + lam).min() < 0),
            }
            _record(rows, dict(base, solver="identity"), ihvp.identity(), op, key, queries, exact, 0)
            _record(rows, dict(base, solver="direct"), ihvp.direct(lam), op, key, queries, exact, float(q_flat.shape[1]))
            for it in cg_iters:
                _record(rows, dict(base, solver="cg"), ihvp.cg(lam, tol=0.0, maxiter=it), op, key, queries, exact, it, iterations=it)
            for depth in lissa_depths:
                for sampling in ("cycle", "full"):
                    products = depth if sampling == "full" else depth / nb
                    _record(
                        rows, dict(base, solver="lissa"), ihvp.lissa(lam, depth=depth, sampling=sampling),
                        op, key, queries, exact, products, depth=depth, sampling=sampling,
                    )
            for it in krylov_iters:
                if it > q_flat.shape[1]:
                    continue
                for method in ("lanczos", "arnoldi"):
                    for negative in (("keep", "abs") if name == "hessian" else ("keep",)):
                        solver = getattr(ihvp, method)(lam, num_iters=it, negative=negative)
                        _record(rows, dict(base, solver=method), solver, op, key, queries, exact, it, iterations=it, rank=it, negative=negative)
            if kind == cv.FISHER:
                for by in ("top", "all"):
                    _record(rows, dict(base, solver="woodbury"), ihvp.woodbury(lam, by=by), op, key, queries, exact, 0, layers=by)
                _record(rows, dict(base, solver="datainf"), ihvp.datainf(lam), op, key, queries, exact, 0, layers="top")
        if kind == cv.FISHER:  # DataInf with its own default per-layer damping, vs exact at that damping
            solver = ihvp.datainf()
            state = solver.fit(op)
            layer_lams = np.asarray(state.dampings)
            info["datainf_default_layer_dampings"] = layer_lams.tolist()
            wb = ihvp.woodbury(ihvp.relative(0.1))  # same per-layer dampings, exact block inverse
            ex = np.stack([np.asarray(ravel_pytree(x)[0]) for x in _unstack(wb.apply_batched(wb.fit(op), queries))])
            got = np.stack([np.asarray(ravel_pytree(x)[0]) for x in _unstack(solver.apply_batched(state, queries))])
            info["datainf_default_vs_exact_block_inverse_rel_error"] = [
                float(np.linalg.norm(g - e) / np.linalg.norm(e)) for g, e in zip(got, ex)
            ]
        out["curvatures"][name] = info
    return out


def _unstack(tree):
    q = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], tree) for i in range(q)]


def query_gradients(loss_fn: Callable, params: PyTree, batches: list) -> PyTree:
    """Gradients of the loss on each of the given (held-out) batches, stacked: the iHVP queries."""
    grad = jax.jit(jax.grad(loss_fn))
    return cv.stack_trees([grad(params, b) for b in batches])


def run_benchmark(
    loss_fn: Callable,
    params: PyTree,
    batches: list,
    query_batches: list,
    timing_params: Optional[PyTree] = None,
    timing_batch: Optional[PyTree] = None,
    per_example_loss_fn: Optional[Callable] = None,
    model_fn: Optional[Callable] = None,
    output_loss_fn: Optional[Callable] = None,
    repeats: int = 30,
    quick: bool = False,
    seed: int = 0,
) -> dict:
    """Timing (on timing_params/timing_batch, default params/batches[0]) and the error study."""
    timing = time_products(
        loss_fn,
        params if timing_params is None else timing_params,
        batches[0] if timing_batch is None else timing_batch,
        repeats=repeats,
        per_example_loss_fn=per_example_loss_fn,
        model_fn=model_fn,
        output_loss_fn=output_loss_fn,
        seed=seed,
    )
    sweeps = (
        dict(damping_fractions=(1e-2, 1e-1), cg_iters=(2, 16), lissa_depths=(16, 128), krylov_iters=(8, 32))
        if quick
        else {}
    )
    study = error_study(
        loss_fn,
        params,
        batches,
        query_gradients(loss_fn, params, query_batches),
        per_example_loss_fn=per_example_loss_fn,
        model_fn=model_fn,
        output_loss_fn=output_loss_fn,
        seed=seed,
        **sweeps,
    )
    return {"timing": timing, "error_study": study}


def time_lora_lm(name: str, batch_size: int, seq: int, repeats: int, seed: int) -> dict:
    """`time_products` on a jaxinf causal LM's LoRA adapters (q_proj, v_proj, r=4) and random tokens."""
    from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model

    model = load_model(name)
    lora = LoraConfig()
    fns = LMFunctions(model, lora)
    adapters = init_adapters(jax.random.key(seed), model, lora, b_std=0.01)
    ids = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq), 0, model.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones(ids.shape)}
    out = time_products(fns.loss, adapters, batch, repeats=repeats, per_example_loss_fn=fns.per_example_loss,
                        model_fn=fns.logits, output_loss_fn=fns.output_loss, seed=seed)
    return dict(out, model=model.name, batch=[batch_size, seq])


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    key = jax.random.key(FLAGS.seed)
    k_tp, k_tb, k_p, k_b, k_q = jax.random.split(key, 5)
    timing_params = mlp_lm_init(k_tp, FLAGS.time_vocab, FLAGS.time_embed, FLAGS.time_hidden)
    (timing_batch,) = random_token_batches(k_tb, 1, FLAGS.time_batch, FLAGS.time_seq, FLAGS.time_vocab)
    params = mlp_lm_init(k_p, FLAGS.vocab, FLAGS.embed, FLAGS.hidden)
    batches = random_token_batches(k_b, FLAGS.num_batches, FLAGS.batch, FLAGS.seq, FLAGS.vocab)
    query_batches = random_token_batches(k_q, FLAGS.num_queries, FLAGS.batch, FLAGS.seq, FLAGS.vocab)
    t0 = time.perf_counter()
    results = run_benchmark(
        mlp_lm_loss,
        params,
        batches,
        query_batches,
        timing_params=timing_params,
        timing_batch=timing_batch,
        per_example_loss_fn=mlp_lm_per_example_loss,
        model_fn=mlp_lm_logits,
        output_loss_fn=lm_output_loss,
        repeats=FLAGS.repeats,
        quick=FLAGS.quick,
        seed=FLAGS.seed,
    )
    results["lm_timing"] = {name: time_lora_lm(name, FLAGS.lm_batch, FLAGS.lm_seq, FLAGS.repeats, FLAGS.seed)
                            for name in FLAGS.lm_timing}
    results["config"] = {
        "model": "2-layer MLP LM over random tokens (float32)",
        "flags": {k: FLAGS[k].value for k in FLAGS if k in _OWN_FLAGS},
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "total_seconds": time.perf_counter() - t0,
    }
    write_json(FLAGS.out, results)
    t = results["timing"]
    print(
        f"HVP: library {t['median_seconds']['library_hvp'] * 1e3:.3f} ms, raw {t['median_seconds']['raw_jvp_grad'] * 1e3:.3f} ms, "
        f"ratio {t['library_over_raw_hvp']:.3f}; HVP/grad {t['hvp_over_gradient']:.2f}; wrote {FLAGS.out}"
    )


_OWN_FLAGS = (
    "out", "seed", "repeats", "quick", "time_vocab", "time_embed", "time_hidden", "time_seq", "time_batch",
    "vocab", "embed", "hidden", "seq", "batch", "num_batches", "num_queries",
)

if __name__ == "__main__":
    app.run(main)
