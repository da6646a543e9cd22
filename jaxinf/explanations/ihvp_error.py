r"""How far is each iHVP solver from the exact damped inverse, and does exactness help? (the study's first explanation)

    from jaxinf.explanations import ihvp_error
    result = ihvp_error.run(ihvp_error.IhvpErrorConfig(StudyConfig(...)), "runs/ihvp_error/backdoor")

Fine-tunes LoRA adapters (the study's settings, `jaxinf.pipeline.finetune`; cached), takes per-example gradients
g_n of the training rows and g_q of the first `queries` test rows (cached in grads.npz), and for each curvature C in
`curvatures` and each relative damping f in `dampings` (lambda = f x tr(C)/D, the mean eigenvalue, exact for the
Fisher (`StudyInputs.global_lambda`); for the GGN and the Hessian f x the GGN's mean eigenvalue, exact when dense and
Hutchinson otherwise, since the Hessian's own trace can be negative):

* the reference x*_q = (C + lambda I)^{-1} g_q: dense eigendecomposition in float64 when D <= `dense_max`; for the
  empirical Fisher the Woodbury identity over all parameters (exact); otherwise scipy CG (GGN) or MINRES (Hessian,
  indefinite) on the float32 operator for `ref_iters` products, with its relative residual reported;
* each solver's x_q at several budgets: CG (`cg_iters`), LiSSA (`lissa_depths`), Lanczos (`lanczos_iters`), and
  gradient matching (x = g_q / lambda direction, cost 0);
* errors: parameter space ||x_q - x*_q|| / ||x*_q||, and score space: Spearman over training rows of the scores
  <x_q, g_n> against <x*_q, g_n>, averaged over queries; cost in C-products per query (LiSSA's power iteration
  counted);
* attribution: Acc / Cover / AUC of the reference's scores and of each solver's, on the queries used.

Curvatures: "fisher" = the empirical Fisher of all training rows' gradients (the study's matrix,
jaxinf.curvature.cached); "ggn" / "hessian" = the model's Gauss-Newton / Hessian of the mean loss over the first
`rows` training rows (jaxinf.analysis.model_operator). Outputs: ihvp_error.json and ihvp_error.png in the workdir.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

from jaxinf import analysis, attribution, ihvp, pipeline, progress, sharding, study, training
from jaxinf.analysis.spectrum import KINDS
from jaxinf.curvature import dense_matrix, hutchinson_trace
from jaxinf.evaluation import evaluate
from jaxinf.evaluation.metrics import row_spearman
from jaxinf.explanations import attribution_groups, data_name
from jaxinf.models import LMFunctions
from jaxinf.report import figures
from jaxinf.workdir import load_npz, read_json, write_json, write_npz


@dataclasses.dataclass(frozen=True)
class IhvpErrorConfig:
    """One iHVP-error run. study: model, data, preset, seed (its damping is not used: `dampings` are the relative
    values measured); curvatures: from fisher | ggn | hessian; model_dampings: the dampings for ggn / hessian (None:
    `dampings`; model products are costly); queries: test rows used as queries; rows: training rows in the GGN /
    Hessian operators; cg_iters, lissa_depths, lanczos_iters: solver budgets (C-products); ref_iters: products of
    the iterative reference when D > dense_max; dense_max: form C densely (float64 eigendecomposition) when D is at
    most this; trace_probes: Hutchinson probes for tr(C) (GGN, Hessian)."""

    study: pipeline.StudyConfig = pipeline.StudyConfig()
    curvatures: tuple = ("fisher", "ggn", "hessian")
    dampings: tuple = (0.1, 1.0, 10.0)
    model_dampings: Optional[tuple] = None
    queries: int = 4
    rows: int = 8
    cg_iters: tuple = (2, 8, 32)
    lissa_depths: tuple = (16, 64, 256)
    lanczos_iters: tuple = (8, 32)
    ref_iters: int = 200
    dense_max: int = 2000
    trace_probes: int = 8

    def validate(self) -> "IhvpErrorConfig":
        """Raise ValueError (one line: the field and the fix) for a setting no solve could use; returns self."""
        self.study.validate()
        bad = [k for k in self.curvatures if k not in KINDS]
        if bad or not self.curvatures:
            raise ValueError(f"curvatures {bad or '(none)'} unknown; choose from {list(KINDS)}")
        for name in ("dampings", "model_dampings"):
            values = getattr(self, name)
            if values is not None and (not values or any(not v > 0 for v in values)):
                raise ValueError(f"{name}={','.join(map(str, values))}: give relative dampings > 0, e.g. 0.1,1")
        for name in ("cg_iters", "lissa_depths", "lanczos_iters"):
            values = getattr(self, name)
            if any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"{name}={','.join(map(str, values))}: give positive integers, e.g. 8,32")
        for name in ("queries", "rows", "ref_iters", "trace_probes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dense_max < 0:
            raise ValueError(f"dense_max={self.dense_max} must be >= 0 (0 = never form C densely)")
        return self


def _flat(tree):
    return np.asarray(attribution.flatten_rows(tree), np.float64)


def _reference(config, kind, op, lam, queries_flat):
    """x* [Q, D] and a description of how it was computed (with its relative residual)."""
    d = queries_flat.shape[1]
    if d <= config.dense_max:
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
            x, _ = scipy.sparse.linalg.minres(lin, q, rtol=1e-10, maxiter=config.ref_iters)
        else:
            x, _ = scipy.sparse.linalg.cg(lin, q, rtol=1e-10, maxiter=config.ref_iters)
        xs.append(x)
        res.append(float(np.linalg.norm(matvec(x) - q) / np.linalg.norm(q)))
    return np.stack(xs), {"method": f"scipy {'MINRES' if kind == 'hessian' else 'CG'}, {config.ref_iters} products, "
                                    "float32 operator", "relative_residual": float(max(res))}


def solvers(config: IhvpErrorConfig, lam: float) -> list:
    """[(name, budget, solver, products per query)]: the solver factories of jaxinf.ihvp at absolute lambda."""
    lam = ihvp.absolute(lam)
    out = [("grad_match", 0, ihvp.identity(), 0)]
    out += [("cg", k, ihvp.cg(damping=lam, maxiter=k, tol=0.0), k) for k in map(int, config.cg_iters)]
    out += [("lissa", k, ihvp.lissa(damping=lam, depth=k), k + 20) for k in map(int, config.lissa_depths)]
    out += [("lanczos", k, ihvp.lanczos(damping=lam, num_iters=k), k) for k in map(int, config.lanczos_iters)]
    return out


def _gradients(config, fns, adapters, task, nq, workdir):
    """(training gradients [N, D], query gradients [nq, D]) at the fine-tuned adapters, cached in grads.npz (a cache
    made with fewer queries is recomputed)."""
    path, chunk = os.path.join(workdir, "grads.npz"), config.study.sizes.grad_chunk
    saved = load_npz(path)
    if saved is not None and saved["test"].shape[0] >= nq:
        return saved["train"], saved["test"][:nq]
    g_train = np.asarray(attribution.per_example_gradients(fns, adapters, task.train, chunk_size=chunk,
                                                           progress="gradients (train)"))
    g_test = np.asarray(attribution.per_example_gradients(fns, adapters, task.test.select(np.arange(nq)),
                                                          chunk_size=chunk, progress="gradients (queries)"))
    write_npz(path, train=g_train, test=g_test)
    return g_train, g_test


def _model_curvature(config, kind, fns, adapters, task, key):
    """(operator, tr of the GGN, how the trace was computed) of the model's GGN / Hessian over the first rows."""
    idx = np.arange(min(config.rows, len(task.train_rows)))
    rows = [{k: np.asarray(getattr(task.train, k))[idx] for k in training.BATCH_KEYS}]
    op = analysis.model_operator(kind, fns, adapters, rows)
    # lambda relative to the GGN's mean eigenvalue for both: the Hessian's own trace can be negative
    ggn = op if kind == "ggn" else analysis.model_operator("ggn", fns, adapters, rows)
    if ggn.dim <= config.dense_max:
        return op, float(np.trace(np.asarray(dense_matrix(ggn), np.float64))), "exact GGN trace"
    trace = float(hutchinson_trace(ggn, jax.random.fold_in(key, 7), config.trace_probes))
    return op, trace, f"GGN trace, Hutchinson with {config.trace_probes} probes"


def _solve(name, budget, solver, products, op, key, query_tree, x_ref, ref_scores, n_flat, metrics) -> dict:
    """One solver's record: parameter and score errors against the reference, cost, metrics (or its error)."""
    rec = {"solver": name, "budget": budget, "products": products}
    t0 = time.perf_counter()
    try:
        state = solver.fit(op, jax.random.fold_in(key, budget))
        x = _flat(solver.apply_batched(state, query_tree))
    except Exception as err:  # a solver that stops (negative curvature, divergence) is a result
        rec["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        progress.log(f"  {name}({budget}) failed: {rec['error'][:120]}")
        return rec
    scores = x @ n_flat.T
    err = np.linalg.norm(x - x_ref, axis=1) / np.linalg.norm(x_ref, axis=1)
    if name == "grad_match":  # a direction, not a solve: compare the best multiple c g_q with x*
        c = np.sum(x * x_ref, 1) / np.sum(x * x, 1)
        err = np.linalg.norm(c[:, None] * x - x_ref, axis=1) / np.linalg.norm(x_ref, axis=1)
    rec.update(param_error=float(np.mean(err)), score_spearman=float(np.nanmean(row_spearman(scores, ref_scores))),
               seconds=time.perf_counter() - t0, metrics=metrics(scores))
    progress.log(f"  {name}({budget}): error {rec['param_error']:.3g} Spearman {rec['score_spearman']:.3f} "
                 f"Cover {rec['metrics']['cover']:.2f}")
    return rec


def run(config: IhvpErrorConfig, workdir: str) -> dict:
    """Fine-tune (cached), solve against the reference for every curvature, damping and budget, write
    ihvp_error.json and ihvp_error.png in `workdir`; returns what ihvp_error.json holds."""
    config.validate()
    s = config.study
    model_dampings = config.model_dampings or config.dampings
    mesh = sharding.parse_mesh(s.mesh)
    model = pipeline.load_study_model(s, mesh)
    task = pipeline.load_study_task(s, model)
    adapters, _, _, lora = pipeline.finetune(s, model, task, workdir, checkpoints=1, mesh=mesh)
    fns = LMFunctions(model, lora)
    n_train, nq = len(task.train_rows), min(config.queries, len(task.test_rows))
    g_train, g_test = _gradients(config, fns, adapters, task, nq, workdir)
    train_tree = attribution.unflatten_rows(g_train, adapters, stacked=False)
    query_tree = attribution.unflatten_rows(g_test, adapters, stacked=False)
    q_flat, n_flat = g_test.astype(np.float64), g_train.astype(np.float64)
    # the study's inputs for the Fisher: its operator, trace and lambda = f tr(F)/D (StudyInputs.global_lambda)
    inputs = study.StudyInputs(fns=fns, adapters=adapters, train=task.train, test=task.test.select(np.arange(nq)),
                               workdir=os.path.join(workdir, "finetune"), preset=s.sizes, train_grads=train_tree,
                               test_grads=query_tree, seed=s.seed)
    test_groups, train_groups = attribution_groups(task, nq)

    def metrics(scores):
        ev = evaluate(scores, test_groups, train_groups, n_boot=100, seed=s.seed)
        return {k: ev[k]["value"] for k in ("acc", "cover", "auc")}

    records, references = [], []
    key = jax.random.key(s.seed)
    dim = q_flat.shape[1]
    for kind in config.curvatures:
        if kind == "fisher":
            op, (trace, _) = inputs.fisher, inputs.curvature_trace()
            trace_how = "exact"
        else:
            op, trace, trace_how = _model_curvature(config, kind, fns, adapters, task, key)
        for f in (config.dampings if kind == "fisher" else model_dampings):
            lam = dataclasses.replace(inputs, damping=f).global_lambda if kind == "fisher" else ihvp.relative_lambda(f, trace, dim)
            t0 = time.perf_counter()
            x_ref, how = _reference(config, kind, op, lam, q_flat)
            ref_scores = how.pop("scores") if "scores" in how else x_ref @ n_flat.T
            ref = {"curvature": kind, "damping_fraction": f, "lambda": lam, "trace": trace, "trace_method": trace_how,
                   "dim": dim, "reference": how, "seconds": time.perf_counter() - t0, "metrics": metrics(ref_scores)}
            references.append(ref)
            progress.log(f"{kind} f={f:g} lambda={lam:.3g}: reference {how['method']} (residual "
                         f"{how['relative_residual']:.2g}) Acc {ref['metrics']['acc']:.2f} "
                         f"Cover {ref['metrics']['cover']:.2f}")
            for name, budget, solver, products in solvers(config, lam):
                rec = _solve(name, budget, solver, products, op, key, query_tree, x_ref, ref_scores, n_flat, metrics)
                records.append({"curvature": kind, "damping_fraction": f, **rec})

    results = {"model": model.name, "data": s.data.source, "preset": study.preset_name(s.preset), "seed": s.seed,
               "n_train": n_train, "queries": nq, "rows_in_model_operators": min(config.rows, n_train),
               "split": task.split_info, "grad_dot_metrics": metrics(q_flat @ n_flat.T),
               "references": references, "solvers": records}
    write_json(os.path.join(workdir, "ihvp_error.json"), results)
    title = f"{model.name} on {data_name(s)}: iHVP error vs cost (D={dim}, {nq} queries)"
    figures.plot_ihvp_error(records, references, config.curvatures, os.path.join(workdir, "ihvp_error.png"), title)
    return read_json(os.path.join(workdir, "ihvp_error.json"))
