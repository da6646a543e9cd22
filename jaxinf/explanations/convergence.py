r"""Does attribution get better or worse as fine-tuning converges? (the study's second explanation)

    from jaxinf.explanations import convergence
    result = convergence.run(convergence.ConvergenceConfig(StudyConfig(...)), "runs/convergence/backdoor")

Fine-tunes once for `epochs` (past convergence; `jaxinf.pipeline.finetune`) with `checkpoints` evenly spaced
checkpoints, then at every checkpoint t (each cached in workdir/steps/<t>.json, so an interrupted run resumes):

* attribution: each method's scores (jaxinf.study, on the per-example gradients at theta_t, damping f x tr(F)/D
  of that checkpoint's empirical Fisher) and their Acc / Cover / AUC against the groups;
* ground truth (ground_truth_queries > 0, jaxinf.groundtruth): Spearman of each method's scores with the
  trajectory influence of the first test rows at step t (the exact derivative of the run up to t);
* optimisation state from convergence.jsonl: loss, gradient norm, distance from the initial adapters;
* curvature (jaxinf.analysis.spectrum, Lanczos on the model's operators over the first `spectrum_rows` training
  rows): top Hessian and GGN eigenvalues, smallest Hessian eigenvalue, the quadrature estimate of the share of
  negative Hessian eigenvalues, and the damping lambda relative to them (lambda / lambda_max(H), and whether
  lambda_min(H) + lambda > 0 at the Ritz estimate, i.e. H + lambda I looks positive definite).

Ritz values lie inside the spectrum: the top one is a lower bound on lambda_max, the bottom one an upper bound on
lambda_min (so a negative Ritz value proves negative curvature; a positive one does not prove its absence).
Outputs: convergence.json and convergence.png in the workdir (the trajectory ground truth is cached in
ground_truth.npz).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import numpy as np

from jaxinf import analysis, attribution, pipeline, progress, recipes, sharding, study, training
from jaxinf.evaluation import evaluate
from jaxinf.evaluation.metrics import row_spearman
from jaxinf.explanations import attribution_groups, data_name, relative_damping
from jaxinf.models import LMFunctions
from jaxinf.report import figures
from jaxinf.workdir import guard, load_npz, read_json, write_json, write_npz

# every method but the TracIns, which need the checkpoints of a run rather than one checkpoint's adapters
METHODS = tuple(name for name, m in study.METHODS.items() if m.checkpoints_fn is None)


@dataclasses.dataclass(frozen=True)
class ConvergenceConfig:
    """One convergence run. study: model, data, preset, seed and one relative damping (empty = the preset's);
    epochs: fine-tuning epochs (None: the study's rule, `pipeline.study_epochs`); checkpoints: evaluated
    checkpoints after step 0 (evenly spaced); methods: `METHODS` scored per checkpoint; spectrum_rows: training rows
    in the Hessian / GGN operators for Lanczos (0 = skip); lanczos_iters: Lanczos steps per operator and checkpoint;
    ground_truth_queries: test rows for trajectory ground truth (0 = skip; one reverse pass through the whole run
    per checkpoint)."""

    study: pipeline.StudyConfig = pipeline.StudyConfig()
    epochs: Optional[float] = 10.0
    checkpoints: int = 5
    methods: tuple = ("grad_dot", "datainf", "exact", "ekfac")
    spectrum_rows: int = 8
    lanczos_iters: int = 12
    ground_truth_queries: int = 0

    def validate(self) -> "ConvergenceConfig":
        """Raise ValueError (one line: the field and the fix) for a setting no checkpoint could use; returns self."""
        self.study.validate()
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods {bad} not usable per checkpoint; choose from {list(METHODS)}")
        if len(self.study.damping) > 1:
            raise ValueError(f"damping={','.join(map(str, self.study.damping))}: give one relative value per run")
        if self.checkpoints < 1:
            raise ValueError(f"checkpoints={self.checkpoints} must be >= 1 (evaluated checkpoints after step 0)")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0 (run past convergence, e.g. 10)")
        for name in ("spectrum_rows", "ground_truth_queries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = skip)")
        if self.spectrum_rows > 0 and self.lanczos_iters < 1:
            raise ValueError(f"lanczos_iters={self.lanczos_iters} must be >= 1 (or spectrum_rows=0 to skip)")
        return self


def _spectra(fns, adapters, train, rows, iters, key, desc="spectrum"):
    idx = np.arange(min(rows, len(train.groups)))
    batch = {k: np.asarray(getattr(train, k))[idx] for k in training.BATCH_KEYS}
    out = {}
    for kind in ("hessian", "ggn"):
        with progress.stage(f"{desc}: {kind} Lanczos ({iters} products on {len(idx)} rows)"):
            op = analysis.model_operator(kind, fns, adapters, [batch])
            out[kind] = analysis.lanczos_spectrum(op, jax.random.fold_in(key, len(kind)), iters)
    return out


def _ground_truth(config, fns, model, lora, task, train_config, steps, workdir) -> dict:
    """{step: trajectory influence [Q, N] of the first test rows at that step}, cached in ground_truth.npz."""
    from jaxinf.groundtruth.trajectory import WeightedRun, trajectory_influence_steps
    from jaxinf.models import init_adapters

    path = os.path.join(workdir, "ground_truth.npz")
    saved = load_npz(path)
    if saved is not None:
        return {int(k): v for k, v in saved.items()}
    q = min(config.ground_truth_queries, len(task.test.groups))
    run = WeightedRun(fns, init_adapters(jax.random.key(config.study.seed), model, lora),
                      recipes.batch_arrays(task.train), train_config)
    queries = {k: np.asarray(getattr(task.test, k))[:q] for k in training.BATCH_KEYS}
    gt = trajectory_influence_steps(run, queries, [s for s in steps if s > 0])
    write_npz(path, **{str(k): v for k, v in gt.items()})
    return gt


def _checkpoint(config, step, theta, fns, task, by_step, gt, train_config, mesh, workdir) -> dict:
    """The record of one checkpoint (steps/<step>.json)."""
    s, preset = config.study, config.study.sizes
    n_train = len(task.train_rows)
    test_groups, train_groups = attribution_groups(task)
    sdir = os.path.join(workdir, "steps", str(step))
    flat_tr = np.asarray(attribution.per_example_gradients(fns, theta, task.train, chunk_size=preset.grad_chunk,
                                                           progress=f"step {step}: gradients (train)"))
    flat_te = np.asarray(attribution.per_example_gradients(fns, theta, task.test, chunk_size=preset.grad_chunk,
                                                           progress=f"step {step}: gradients (test)"))
    damping = relative_damping(s)
    inputs = study.StudyInputs(
        fns=fns, adapters=theta, train=task.train, test=task.test, workdir=os.path.join(sdir, "finetune"),
        preset=preset, train_grads=attribution.unflatten_rows(flat_tr, theta, stacked=False),
        test_grads=attribution.unflatten_rows(flat_te, theta, stacked=False), seed=s.seed, damping=damping,
        lissa_depth=s.lissa_depth, repsim_pooling=s.repsim_pooling, damping_scope=s.damping_scope,
        curvature=s.curvature, mesh=mesh)
    lam = inputs.global_lambda  # f tr(C) / D at theta_t
    rec = {"step": step, "epoch": step * train_config.batch_size / n_train, "lambda": lam,
           "damping_fraction": damping,
           "optim": {k: by_step.get(step, {}).get(k) for k in ("loss", "grad_norm", "dist_from_init", "lr")},
           "methods": {}}
    for m in config.methods:
        with progress.stage(f"step {step}: {m}"):
            scores, seconds = study.run_method(m, inputs)
        ev = evaluate(scores, test_groups, train_groups, n_boot=200, seed=s.seed)
        entry = {"acc": ev["acc"]["value"], "cover": ev["cover"]["value"], "auc": ev["auc"]["value"],
                 "seconds": seconds}
        if step in gt:
            g = gt[step]
            entry["ground_truth_spearman"] = float(np.mean(row_spearman(scores[: g.shape[0]], g)))
        rec["methods"][m] = entry
    if step in gt:
        ev = evaluate(gt[step], test_groups[: gt[step].shape[0]], train_groups, n_boot=200, seed=s.seed)
        rec["ground_truth_metrics"] = {k: ev[k]["value"] for k in ("acc", "cover", "auc")}
    if config.spectrum_rows > 0:
        sp = _spectra(fns, theta, task.train, config.spectrum_rows, config.lanczos_iters,
                      jax.random.fold_in(jax.random.key(s.seed), step), desc=f"step {step}")
        rec["spectrum"] = sp
        h = sp["hessian"]
        rec["damping_vs_spectrum"] = {"lambda_over_hessian_max": lam / h["max"] if h["max"] > 0 else None,
                                      "lambda_over_ggn_max": lam / sp["ggn"]["max"] if sp["ggn"]["max"] > 0 else None,
                                      "hessian_min_plus_lambda": h["min"] + lam,
                                      "damped_hessian_pd_at_ritz": bool(h["min"] + lam > 0)}
    return rec


def summary_line(rec: dict, methods) -> str:
    """One checkpoint record in a line: loss, each method's Cover, the Hessian's Ritz range against lambda."""
    line = f"step {rec['step']}: loss {rec['optim']['loss']} " + " ".join(
        f"{m}: Cover {rec['methods'][m]['cover']:.2f}" for m in methods)
    if "spectrum" in rec:
        h = rec["spectrum"]["hessian"]
        line += (f" H [{h['min']:.3g}, {h['max']:.3g}] negative mass {h['negative_mass']:.2f}"
                 f" lambda {rec['lambda']:.3g}")
    return line


def run(config: ConvergenceConfig, workdir: str) -> dict:
    """Fine-tune, measure every checkpoint (cached per step), write convergence.json and convergence.png in
    `workdir`; returns what convergence.json holds."""
    config.validate()
    s = config.study
    # the per-checkpoint records (steps/<t>.json) and ground_truth.npz are cached by step only: a rerun with other
    # settings would reuse them silently, so the workdir keeps the settings they were made with
    study_settings = s.to_dict()
    if s.lora == pipeline.LoraSettings():  # the default LoRA: absent, as in workdirs made before it was a setting
        del study_settings["lora"]
    guard(os.path.join(workdir, "convergence_config.json"),
          {"study": study_settings, "epochs": config.epochs, "checkpoints": config.checkpoints,
           "methods": list(config.methods), "spectrum_rows": config.spectrum_rows,
           "lanczos_iters": config.lanczos_iters, "ground_truth_queries": config.ground_truth_queries},
          what="convergence measurements", fix="use a new workdir (the cached checkpoints' records would be reused)")
    mesh = sharding.parse_mesh(s.mesh)
    model = pipeline.load_study_model(s, mesh)
    task = pipeline.load_study_task(s, model)
    epochs = config.epochs if config.epochs is not None else pipeline.study_epochs(s, task)
    adapters, log, train_config, lora = pipeline.finetune(s, model, task, workdir, epochs=epochs,
                                                          checkpoints=config.checkpoints, mesh=mesh)
    ft_dir = os.path.join(workdir, "finetune")
    fns = LMFunctions(model, lora)
    by_step = {r["step"]: r for r in log}
    ckpt_steps = training.checkpoint_steps(ft_dir)
    gt = {}
    if config.ground_truth_queries > 0:
        gt = _ground_truth(config, fns, model, lora, task, train_config, ckpt_steps, workdir)

    records = []
    for step in ckpt_steps:
        if step == 0:
            continue  # B = 0: every gradient w.r.t. A vanishes, no attribution to score
        path = os.path.join(workdir, "steps", f"{step}.json")
        if os.path.exists(path):
            records.append(read_json(path))
            continue
        ((_, theta),) = attribution.load_trainables(ft_dir, adapters, [step])
        rec = _checkpoint(config, step, theta, fns, task, by_step, gt, train_config, mesh, workdir)
        write_json(path, rec)
        records.append(rec)
        progress.log(summary_line(rec, config.methods))

    n_train = len(task.train_rows)
    results = {"model": model.name, "data": s.data.source, "preset": study.preset_name(s.preset), "seed": s.seed,
               "epochs": epochs, "steps": train_config.steps, "checkpoint_every": train_config.checkpoint_every,
               "n_train": n_train, "n_test": len(task.test_rows), "methods": list(config.methods),
               "damping_fraction": relative_damping(s), "spectrum_rows": config.spectrum_rows,
               "lanczos_iters": config.lanczos_iters,
               "ground_truth": ({"kind": "trajectory influence (jaxinf.groundtruth)",
                                 "queries": config.ground_truth_queries} if gt else None),
               "split": task.split_info, "checkpoints": records}
    write_json(os.path.join(workdir, "convergence.json"), results)
    title = (f"{model.name} on {data_name(s)}: attribution and curvature vs step ({n_train} train, "
             f"{len(task.test_rows)} test, {epochs:g} epochs)")
    if records:
        figures.plot_convergence(records, config.methods, os.path.join(workdir, "convergence.png"), title)
    return read_json(os.path.join(workdir, "convergence.json"))
