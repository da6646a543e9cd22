r"""How far is each iHVP solver from the exact damped inverse, and does exactness help? (the study's first explanation)

    python -m experiments.ihvp_error --data=../shared/paper_datasets/backdoor --workdir=runs/ihvp_error/backdoor

Fine-tunes LoRA adapters (the preset's settings; cached), takes per-example gradients g_n of the training rows and
g_q of the first --queries test rows, and for each curvature C in --curvatures and each relative damping f in
--dampings (lambda = f x tr(C)/D, the mean eigenvalue, exact for the Fisher; for the GGN and the Hessian f x the
GGN's mean eigenvalue, exact when dense and Hutchinson otherwise, since the Hessian's own trace can be negative):

* the reference x*_q = (C + lambda I)^{-1} g_q: dense eigendecomposition in float64 when D <= --dense_max; for the
  empirical Fisher the Woodbury identity over all parameters (exact); otherwise scipy CG (GGN) or MINRES (Hessian,
  indefinite) on the float32 operator for --ref_iters products, with its relative residual reported;
* each solver's x_q at several budgets: CG (--cg_iters), LiSSA (--lissa_depths), Lanczos (--lanczos_iters), and
  gradient matching (x = g_q / lambda direction, cost 0);
* errors: parameter space ||x_q - x*_q|| / ||x*_q||, and score space: Spearman over training rows of the scores
  <x_q, g_n> against <x*_q, g_n>, averaged over queries; cost in C-products per query (LiSSA's power iteration
  counted);
* attribution: Acc / Cover / AUC of the reference's scores and of each solver's, on the queries used.

Curvatures: "fisher" = the empirical Fisher of all training rows' gradients (the study's matrix,
jaxinf.curvature.cached); "ggn" / "hessian" = the model's Gauss-Newton / Hessian of the mean loss over the first
--rows training rows (jaxinf.analysis.model_operator). Outputs: ihvp_error.json and ihvp_error.png in --workdir.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg
import scipy.stats
from absl import app, flags, logging

from jaxinf import analysis, attribution, cli, ihvp, recipes, runtime, study, training
from jaxinf.curvature import dense_matrix, hutchinson_trace
from jaxinf.curvature.cached import gradient_fisher_operator
from jaxinf.evaluation import evaluate
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "fine-tuning sizes and settings (jaxinf.study.PRESETS)")
flags.DEFINE_string("workdir", "runs/ihvp_error", "fine-tuning, gradients and results go here")
flags.DEFINE_integer("seed", 0, "seed for subsampling, fine-tuning and solvers")
flags.DEFINE_list("curvatures", ["fisher", "ggn", "hessian"], "fisher | ggn | hessian")
flags.DEFINE_list("dampings", ["0.1", "1", "10"], "relative dampings f (lambda = f x mean eigenvalue)")
flags.DEFINE_list("model_dampings", None, "dampings for ggn/hessian (default: --dampings); model products are costly")
flags.DEFINE_integer("queries", 4, "test rows used as queries")
flags.DEFINE_integer("rows", 8, "training rows in the GGN / Hessian operators")
flags.DEFINE_list("cg_iters", ["2", "8", "32"], "CG budgets (C-products)")
flags.DEFINE_list("lissa_depths", ["16", "64", "256"], "LiSSA depths (C-products)")
flags.DEFINE_list("lanczos_iters", ["8", "32"], "Lanczos steps (C-products)")
flags.DEFINE_integer("ref_iters", 200, "products for the iterative reference when D > --dense_max")
flags.DEFINE_integer("dense_max", 2000, "form C densely (float64 eigendecomposition) when D is at most this")
flags.DEFINE_integer("trace_probes", 8, "Hutchinson probes for tr(C) (GGN, Hessian)")
cli.define_data_flags()


def _ints(name):
    try:
        return [int(v) for v in FLAGS[name].value]
    except ValueError:
        raise app.UsageError(f"--{name}={','.join(FLAGS[name].value)}: give integers, e.g. 8,32") from None


def _floats(values, name):
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name}={','.join(values)}: give numbers, e.g. 0.1,1") from None
    if any(v <= 0 for v in out):
        raise app.UsageError(f"--{name}: dampings must be > 0")
    return out


def _flat(tree):
    return np.asarray(attribution.flatten_rows(tree), np.float64)


def _reference(kind, op, lam, queries_flat, query_tree):
    """x* [Q, D] and a description of how it was computed (with its relative residual)."""
    d = queries_flat.shape[1]
    if d <= FLAGS.dense_max:
        c = np.asarray(dense_matrix(op), np.float64)
        w, u = np.linalg.eigh(c)
        x = ((queries_flat @ u) / (w + lam)) @ u.T
        return x, {"method": "dense float64 eigendecomposition", "relative_residual": 0.0,
                   "min_eigenvalue": float(w[0]), "max_eigenvalue": float(w[-1])}
    if kind == "fisher":  # float64 Woodbury: x* = (q - G^T (G G^T + N lambda I)^{-1} G q) / lambda
        g = _flat(jax.tree.map(lambda x: x[0], op.batches))  # [N, D]: the one stacked batch of gradient rows
        how = {"method": "float64 Woodbury over all parameters (exact for the empirical Fisher); scores "
                         "(G G^T / N + lambda I)^{-1} G q without cancellation", "relative_residual": 0.0,
               "scores": study.exact_fisher_scores(g, queries_flat, lam)}
        return study.exact_fisher_directions(g, queries_flat, lam), how
    # op (its frozen weights and batches) is an argument, not a closed-over constant: XLA would otherwise fold
    # and embed the model's weights in the executable (minutes of compilation and a huge cache entry on SmolLM2)
    mv = jax.jit(lambda o, v: o.spec.ravel(o.matvec(o.spec.unravel(v))))
    dtype = op.spec.dtype

    def matvec(v):
        return np.asarray(mv(op, jnp.asarray(v, dtype)), np.float64) + lam * v

    lin = scipy.sparse.linalg.LinearOperator((d, d), matvec=matvec, dtype=np.float64)
    xs, res = [], []
    for q in queries_flat:
        if kind == "hessian":
            x, _ = scipy.sparse.linalg.minres(lin, q, rtol=1e-10, maxiter=FLAGS.ref_iters)
        else:
            x, _ = scipy.sparse.linalg.cg(lin, q, rtol=1e-10, maxiter=FLAGS.ref_iters)
        xs.append(x)
        res.append(float(np.linalg.norm(matvec(x) - q) / np.linalg.norm(q)))
    return np.stack(xs), {"method": f"scipy {'MINRES' if kind == 'hessian' else 'CG'}, {FLAGS.ref_iters} products, "
                                    "float32 operator", "relative_residual": float(max(res))}


def _solvers(lam):
    """[(name, budget, solver, products per query)]: the solver factories of jaxinf.ihvp at absolute lambda."""
    lam = ihvp.absolute(lam)
    out = [("grad_match", 0, ihvp.identity(), 0)]
    out += [("cg", k, ihvp.cg(damping=lam, maxiter=k, tol=0.0), k) for k in _ints("cg_iters")]
    out += [("lissa", k, ihvp.lissa(damping=lam, depth=k), k + 20) for k in _ints("lissa_depths")]
    out += [("lanczos", k, ihvp.lanczos(damping=lam, num_iters=k), k) for k in _ints("lanczos_iters")]
    return out


def _plot(records, references, kinds, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(kinds), figsize=(max(8.0, 5.5 * len(kinds)), 10.5), squeeze=False)
    colors = {"cg": "tab:blue", "lissa": "tab:orange", "lanczos": "tab:green", "grad_match": "k"}
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for j, kind in enumerate(kinds):
        recs = [r for r in records if r["curvature"] == kind]
        dampings = sorted({r["damping_fraction"] for r in recs})
        for di, f in enumerate(dampings):
            for name in colors:
                pts = sorted((max(r["products"], 0.5), r["param_error"], r["score_spearman"]) for r in recs
                             if r["solver"] == name and r["damping_fraction"] == f and r.get("param_error") is not None)
                if not pts:
                    continue
                x, e, s = zip(*pts)
                cover = [next(r["metrics"]["cover"] for r in recs if r["solver"] == name and r["damping_fraction"] == f
                              and max(r["products"], 0.5) == xi and r.get("param_error") is not None) for xi in x]
                kw = dict(color=colors[name], linestyle=styles[di % len(styles)], marker="o", ms=3)
                axes[0, j].plot(x, e, label=f"{name} f={f:g}", **kw)
                axes[1, j].plot(x, s, **kw)
                axes[2, j].plot(x, cover, **kw)
            ref = [r for r in references if r["curvature"] == kind and r["damping_fraction"] == f]
            if ref:  # the exact inverse's own Cover at this damping
                axes[2, j].axhline(ref[0]["metrics"]["cover"], color="r", linestyle=styles[di % len(styles)], lw=0.8,
                                   label=f"exact f={f:g}")
        axes[0, j].set_xscale("log")
        axes[0, j].set_yscale("log")
        axes[1, j].set_xscale("log")
        axes[0, j].set_title(kind)
        axes[0, j].set_ylabel("||x - x*|| / ||x*||")
        axes[1, j].set_ylabel("Spearman of scores with exact")
        axes[2, j].set_xscale("log")
        axes[2, j].set_ylabel("Cover of the solver's scores")
        axes[2, j].set_xlabel("C-products per query (grad_match at 0.5)")
        axes[0, j].legend(fontsize=6, ncol=2)
        axes[2, j].legend(fontsize=6, ncol=2)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    runtime.setup()  # persistent compilation cache (JAXINF_COMPILATION_CACHE=0 turns it off)
    logging.set_verbosity(logging.WARNING)
    bad = [k for k in FLAGS.curvatures if k not in analysis.spectrum.KINDS]
    if bad:
        raise app.UsageError(f"--curvatures {bad} unknown; choose from {list(analysis.spectrum.KINDS)}")
    dampings = _floats(FLAGS.dampings, "dampings")
    model_dampings = _floats(FLAGS.model_dampings, "model_dampings") if FLAGS.model_dampings else dampings
    _solvers(1.0)  # flag errors before any work
    preset = study.PRESETS[FLAGS.preset]
    model = load_model(FLAGS.model, seed=FLAGS.seed)
    config = cli.task_config_from_flags(seed=FLAGS.seed, template=preset.template, max_length=preset.max_length,
                                        limit_train=preset.limit_train, limit_test=preset.limit_test)
    task = cli.load_task(model, config)
    lora = LoraConfig(dropout=preset.lora_dropout)
    fns = LMFunctions(model, lora)
    n_train = len(task.train_rows)
    steps = max(1, int(np.ceil(preset.epochs * n_train / preset.batch_size)))
    train_config = training.TrainConfig(steps=steps, batch_size=min(preset.batch_size, n_train), lr=preset.lr,
                                        checkpoint_every=steps, seed=FLAGS.seed)
    with cli.user_errors():
        adapters, _ = recipes.finetune_lora(model, lora, task, train_config, os.path.join(FLAGS.workdir, "finetune"),
                                            run_config={"data": FLAGS.data, "preset": FLAGS.preset,
                                                        "loss_on": config.loss_on, **cli.data_settings(config)})
    gpath = os.path.join(FLAGS.workdir, "grads.npz")
    nq = min(FLAGS.queries, len(task.test_rows))
    saved = np.load(gpath) if os.path.exists(gpath) else None
    if saved is not None and saved["test"].shape[0] >= nq:  # a cache made with fewer --queries is recomputed
        g_train, g_test = saved["train"], saved["test"]
    else:
        g_train = np.asarray(attribution.per_example_gradients(fns, adapters, task.train, chunk_size=preset.grad_chunk))
        g_test = np.asarray(attribution.per_example_gradients(fns, adapters, task.test.select(np.arange(nq)),
                                                              chunk_size=preset.grad_chunk))
        np.savez(gpath + ".tmp.npz", train=g_train, test=g_test)
        os.replace(gpath + ".tmp.npz", gpath)
    g_test = g_test[:nq]
    train_tree = attribution.unflatten_rows(g_train, adapters, stacked=False)
    query_tree = attribution.unflatten_rows(g_test, adapters, stacked=False)
    q_flat, n_flat = g_test.astype(np.float64), g_train.astype(np.float64)
    test_groups, train_groups = np.asarray(task.test.groups)[:nq], np.asarray(task.train.groups)
    if "harmful" in set(train_groups.tolist()):
        from jaxinf.evaluation.metrics import harmful_labels

        test_groups, train_groups = harmful_labels(train_groups, n_test=nq)

    def metrics(scores):
        ev = evaluate(scores, test_groups, train_groups, n_boot=100, seed=FLAGS.seed)
        return {k: ev[k]["value"] for k in ("acc", "cover", "auc")}

    records, references = [], []
    key = jax.random.key(FLAGS.seed)
    for kind in FLAGS.curvatures:
        if kind == "fisher":
            op = gradient_fisher_operator(train_tree)
            trace = float(np.mean(np.sum(n_flat ** 2, 1)))
            trace_how = "exact"
        else:
            idx = np.arange(min(FLAGS.rows, n_train))
            rows = [{k: np.asarray(getattr(task.train, k))[idx] for k in training.BATCH_KEYS}]
            op = analysis.model_operator(kind, fns, adapters, rows)
            # lambda relative to the GGN's mean eigenvalue for both: the Hessian's own trace can be negative
            ggn = op if kind == "ggn" else analysis.model_operator("ggn", fns, adapters, rows)
            if ggn.dim <= FLAGS.dense_max:
                trace, trace_how = float(np.trace(np.asarray(dense_matrix(ggn), np.float64))), "exact GGN trace"
            else:
                trace = float(hutchinson_trace(ggn, jax.random.fold_in(key, 7), FLAGS.trace_probes))
                trace_how = f"GGN trace, Hutchinson with {FLAGS.trace_probes} probes"
        dim = q_flat.shape[1]
        for f in (dampings if kind == "fisher" else model_dampings):
            lam = f * trace / dim
            t0 = time.perf_counter()
            x_ref, how = _reference(kind, op, lam, q_flat, query_tree)
            ref_scores = how.pop("scores") if "scores" in how else x_ref @ n_flat.T
            ref = {"curvature": kind, "damping_fraction": f, "lambda": lam, "trace": trace, "trace_method": trace_how,
                   "dim": dim, "reference": how, "seconds": time.perf_counter() - t0, "metrics": metrics(ref_scores)}
            references.append(ref)
            print(f"{kind} f={f:g} lambda={lam:.3g}: reference {how['method']} (residual {how['relative_residual']:.2g})"
                  f" Acc {ref['metrics']['acc']:.2f} Cover {ref['metrics']['cover']:.2f}", flush=True)
            for name, budget, solver, products in _solvers(lam):
                rec = {"curvature": kind, "damping_fraction": f, "solver": name, "budget": budget,
                       "products": products}
                t0 = time.perf_counter()
                try:
                    state = solver.fit(op, jax.random.fold_in(key, budget))
                    x = _flat(solver.apply_batched(state, query_tree))
                except Exception as err:  # a solver that stops (negative curvature, divergence) is a result
                    rec["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    records.append(rec)
                    print(f"  {name}({budget}) failed: {rec['error'][:120]}", flush=True)
                    continue
                scores = x @ n_flat.T
                err = np.linalg.norm(x - x_ref, axis=1) / np.linalg.norm(x_ref, axis=1)
                if name == "grad_match":  # a direction, not a solve: compare the best multiple c g_q with x*
                    c = np.sum(x * x_ref, 1) / np.sum(x * x, 1)
                    err = np.linalg.norm(c[:, None] * x - x_ref, axis=1) / np.linalg.norm(x_ref, axis=1)
                rho = [scipy.stats.spearmanr(a, b).statistic for a, b in zip(scores, ref_scores)]
                rec.update(param_error=float(np.mean(err)), score_spearman=float(np.nanmean(rho)),
                           seconds=time.perf_counter() - t0, metrics=metrics(scores))
                records.append(rec)
                print(f"  {name}({budget}): error {rec['param_error']:.3g} Spearman {rec['score_spearman']:.3f} "
                      f"Cover {rec['metrics']['cover']:.2f}", flush=True)

    results = {"model": model.name, "data": FLAGS.data, "preset": FLAGS.preset, "seed": FLAGS.seed,
               "n_train": n_train, "queries": nq, "rows_in_model_operators": min(FLAGS.rows, n_train),
               "split": task.split_info, "grad_dot_metrics": metrics(q_flat @ n_flat.T),
               "references": references, "solvers": records}
    recipes.write_json(os.path.join(FLAGS.workdir, "ihvp_error.json"), results)
    title = (f"{model.name} on {os.path.basename(os.path.normpath(FLAGS.data))}: iHVP error vs cost "
             f"(D={q_flat.shape[1]}, {nq} queries)")
    _plot(records, references, FLAGS.curvatures, os.path.join(FLAGS.workdir, "ihvp_error.png"), title)
    print(f"results: {FLAGS.workdir}/ihvp_error.json, ihvp_error.png")


if __name__ == "__main__":
    app.run(main)
