r"""Does attribution get better or worse as fine-tuning converges? (the study's second explanation)

    python -m experiments.convergence --data=../shared/paper_datasets/backdoor --workdir=runs/convergence/backdoor

Fine-tunes once for --epochs (past convergence) with a checkpoint every --checkpoint_every steps, then at every
checkpoint t (each cached in --workdir/steps/<t>.json, so an interrupted run resumes):

* attribution: each method's scores (jaxinf.study, on the per-example gradients at theta_t, damping f x tr(F)/D
  of that checkpoint's empirical Fisher) and their Acc / Cover / AUC against the groups;
* ground truth (--ground_truth_queries > 0, jaxinf.groundtruth): Spearman of each method's scores with the
  trajectory influence of the first test rows at step t (the exact derivative of the run up to t);
* optimisation state from convergence.jsonl: loss, gradient norm, distance from the initial adapters;
* curvature (jaxinf.analysis.spectrum, Lanczos on the model's operators over the first --spectrum_rows training
  rows): top Hessian and GGN eigenvalues, smallest Hessian eigenvalue, the quadrature estimate of the share of
  negative Hessian eigenvalues, and the damping lambda relative to them (lambda / lambda_max(H), and whether
  lambda_min(H) + lambda > 0 at the Ritz estimate, i.e. H + lambda I looks positive definite).

Ritz values lie inside the spectrum: the top one is a lower bound on lambda_max, the bottom one an upper bound on
lambda_min (so a negative Ritz value proves negative curvature; a positive one does not prove its absence).
Outputs: convergence.json and convergence.png in --workdir.
"""

import json
import os

import jax
import numpy as np
import scipy.stats
from absl import app, flags, logging

from jaxinf import analysis, attribution, cli, progress, recipes, runtime, study, training
from jaxinf.evaluation import evaluate
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "sizes and optimiser settings (jaxinf.study.PRESETS)")
flags.DEFINE_string("workdir", "runs/convergence", "fine-tuning, per-checkpoint measurements and results go here")
flags.DEFINE_integer("seed", 0, "seed for subsampling, data order, adapter init and Lanczos starts")
flags.DEFINE_float("epochs", 10.0, "fine-tuning epochs (run past convergence)")
flags.DEFINE_integer("checkpoints", 5, "number of evaluated checkpoints after step 0 (evenly spaced)")
flags.DEFINE_list("methods", ["grad_dot", "datainf", "exact", "ekfac"], "jaxinf.study methods scored per checkpoint")
flags.DEFINE_float("damping", None, "relative damping f (lambda = f x mean Fisher eigenvalue); default: the preset's")
flags.DEFINE_integer("spectrum_rows", 8, "training rows in the Hessian / GGN operators for Lanczos (0 = skip)")
flags.DEFINE_integer("lanczos_iters", 12, "Lanczos steps per operator and checkpoint")
flags.DEFINE_integer("ground_truth_queries", 0, "test rows for trajectory ground truth (0 = skip; costs one reverse "
                     "pass through the whole run per checkpoint)")
cli.define_data_flags()


def _check_methods(methods):
    bad = [m for m in methods if m not in study.METHODS or m == "tracin"]
    if bad:
        raise app.UsageError(f"--methods {bad} not usable per checkpoint; choose from "
                             f"{[m for m in study.METHODS if m != 'tracin']}")


def _spectra(fns, adapters, train, rows, iters, key, desc="spectrum"):
    idx = np.arange(min(rows, len(train.groups)))
    batch = {k: np.asarray(getattr(train, k))[idx] for k in training.BATCH_KEYS}
    out = {}
    for kind in ("hessian", "ggn"):
        with progress.stage(f"{desc}: {kind} Lanczos ({iters} products on {len(idx)} rows)"):
            op = analysis.model_operator(kind, fns, adapters, [batch])
            out[kind] = analysis.lanczos_spectrum(op, jax.random.fold_in(key, len(kind)), iters)
    return out


def _plot(records, methods, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, m in enumerate(methods):
        c = f"C{i}"
        axes[0].plot(steps, [r["methods"][m]["cover"] for r in records], "-o", color=c, label=f"{m} Cover")
        axes[0].plot(steps, [r["methods"][m]["auc"] for r in records], "--", color=c, label=f"{m} AUC")
        if "ground_truth_spearman" in records[0]["methods"][m]:
            axes[0].plot(steps, [r["methods"][m]["ground_truth_spearman"] for r in records], ":", color=c,
                         label=f"{m} rho(trajectory)")
    axes[0].set_ylabel("attribution metric")
    axes[0].legend(fontsize=6, ncol=2)
    for key, lab in (("loss", "train loss"), ("grad_norm", "gradient norm"), ("dist_from_init", "||theta-theta_0||")):
        axes[1].plot(steps, [r["optim"].get(key, np.nan) for r in records], "-o", label=lab)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    if "hessian" in records[0].get("spectrum", {}):
        sp = [r["spectrum"] for r in records]
        axes[2].plot(steps, [s["hessian"]["max"] for s in sp], "-o", label="Hessian top Ritz")
        axes[2].plot(steps, [s["ggn"]["max"] for s in sp], "-s", label="GGN top Ritz")
        axes[2].plot(steps, [max(-s["hessian"]["min"], 1e-12) for s in sp], "-v", label="-(Hessian bottom Ritz)")
        axes[2].plot(steps, [r["lambda"] for r in records], "k--", label="damping lambda")
        axes[2].set_yscale("log")
        ax2 = axes[2].twinx()
        # the |lambda|-weighted share: the eigenvalue count is dominated by LoRA's near-null bulk (analysis.spectrum)
        ax2.plot(steps, [s["hessian"]["negative_mass"] for s in sp], "r:", label="negative mass (SLQ)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("sum |negative eigenvalues| / sum |eigenvalues| (Hessian)", color="r")
        axes[2].legend(fontsize=7, loc="lower left")
    for ax in axes:
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    runtime.setup()  # persistent compilation cache (JAXINF_COMPILATION_CACHE=0 turns it off)
    logging.set_verbosity(logging.WARNING)
    _check_methods(FLAGS.methods)
    if FLAGS.checkpoints < 1 or FLAGS.epochs <= 0:
        raise app.UsageError("--checkpoints must be >= 1 and --epochs > 0")
    preset = study.PRESETS[FLAGS.preset]
    damping = preset.damping if FLAGS.damping is None else FLAGS.damping
    model = load_model(FLAGS.model, seed=FLAGS.seed)
    config = cli.task_config_from_flags(seed=FLAGS.seed, template=preset.template, max_length=preset.max_length,
                                        limit_train=preset.limit_train, limit_test=preset.limit_test)
    task = cli.load_task(model, config)
    lora = LoraConfig(dropout=preset.lora_dropout)
    fns = LMFunctions(model, lora)
    n_train = len(task.train_rows)
    batch_size = min(preset.batch_size, n_train)
    steps = max(1, int(np.ceil(FLAGS.epochs * n_train / batch_size)))
    every = max(1, steps // FLAGS.checkpoints)
    train_config = training.TrainConfig(steps=steps, batch_size=batch_size, lr=preset.lr, checkpoint_every=every,
                                        seed=FLAGS.seed)
    ft_dir = os.path.join(FLAGS.workdir, "finetune")
    with cli.user_errors():
        adapters, log = recipes.finetune_lora(model, lora, task, train_config, ft_dir,
                                              run_config={"data": FLAGS.data, "preset": FLAGS.preset,
                                                          "loss_on": config.loss_on, **cli.data_settings(config)})
    by_step = {r["step"]: r for r in log}
    ckpt_steps = training.checkpoint_steps(ft_dir)
    harmful = "harmful" in set(np.asarray(task.train.groups).tolist())
    test_groups, train_groups = task.test.groups, task.train.groups
    if harmful:
        from jaxinf.evaluation.metrics import harmful_labels

        test_groups, train_groups = harmful_labels(task.train.groups, n_test=len(task.test.groups))

    gt = {}
    if FLAGS.ground_truth_queries > 0:
        from jaxinf.groundtruth.trajectory import WeightedRun, trajectory_influence_steps

        q = min(FLAGS.ground_truth_queries, len(task.test.groups))
        gt_path = os.path.join(FLAGS.workdir, "ground_truth.npz")
        if os.path.exists(gt_path):
            saved = np.load(gt_path)
            gt = {int(k): saved[k] for k in saved.files}
        else:
            from jaxinf.models import init_adapters

            run = WeightedRun(fns, init_adapters(jax.random.key(FLAGS.seed), model, lora),
                              recipes.batch_arrays(task.train), train_config)
            queries = {k: np.asarray(getattr(task.test, k))[:q] for k in training.BATCH_KEYS}
            gt = trajectory_influence_steps(run, queries, [s for s in ckpt_steps if s > 0])
            np.savez(gt_path + ".tmp.npz", **{str(k): v for k, v in gt.items()})
            os.replace(gt_path + ".tmp.npz", gt_path)

    records = []
    for step in ckpt_steps:
        if step == 0:
            continue  # B = 0: every gradient w.r.t. A vanishes, no attribution to score
        path = os.path.join(FLAGS.workdir, "steps", f"{step}.json")
        if os.path.exists(path):
            with open(path) as f:
                records.append(json.load(f))
            continue
        ((_, theta),) = attribution.load_trainables(ft_dir, adapters, [step])
        sdir = os.path.join(FLAGS.workdir, "steps", str(step))
        flat_tr = np.asarray(attribution.per_example_gradients(fns, theta, task.train, chunk_size=preset.grad_chunk,
                                                               progress=f"step {step}: gradients (train)"))
        flat_te = np.asarray(attribution.per_example_gradients(fns, theta, task.test, chunk_size=preset.grad_chunk,
                                                               progress=f"step {step}: gradients (test)"))
        inputs = study.StudyInputs(
            fns=fns, adapters=theta, train=task.train, test=task.test, workdir=os.path.join(sdir, "finetune"),
            preset=preset, train_grads=attribution.unflatten_rows(flat_tr, theta, stacked=False),
            test_grads=attribution.unflatten_rows(flat_te, theta, stacked=False), seed=FLAGS.seed, damping=damping)
        lam = float(damping * np.mean(np.sum(flat_tr.astype(np.float64) ** 2, 1)) / flat_tr.shape[1])
        rec = {"step": step, "epoch": step * batch_size / n_train, "lambda": lam, "damping_fraction": damping,
               "optim": {k: by_step.get(step, {}).get(k) for k in ("loss", "grad_norm", "dist_from_init", "lr")},
               "methods": {}}
        for m in FLAGS.methods:
            with progress.stage(f"step {step}: {m}"):
                scores, seconds = study.run_method(m, inputs)
            ev = evaluate(scores, test_groups, train_groups, n_boot=200, seed=FLAGS.seed)
            entry = {"acc": ev["acc"]["value"], "cover": ev["cover"]["value"], "auc": ev["auc"]["value"],
                     "seconds": seconds}
            if step in gt:
                g = gt[step]
                entry["ground_truth_spearman"] = float(np.mean(
                    [scipy.stats.spearmanr(a, b).statistic for a, b in zip(scores[: g.shape[0]], g)]))
            rec["methods"][m] = entry
        if step in gt:
            ev = evaluate(gt[step], test_groups[: gt[step].shape[0]], train_groups, n_boot=200, seed=FLAGS.seed)
            rec["ground_truth_metrics"] = {k: ev[k]["value"] for k in ("acc", "cover", "auc")}
        if FLAGS.spectrum_rows > 0:
            sp = _spectra(fns, theta, task.train, FLAGS.spectrum_rows, FLAGS.lanczos_iters,
                          jax.random.fold_in(jax.random.key(FLAGS.seed), step), desc=f"step {step}")
            rec["spectrum"] = sp
            h = sp["hessian"]
            rec["damping_vs_spectrum"] = {"lambda_over_hessian_max": lam / h["max"] if h["max"] > 0 else None,
                                          "lambda_over_ggn_max": lam / sp["ggn"]["max"] if sp["ggn"]["max"] > 0 else None,
                                          "hessian_min_plus_lambda": h["min"] + lam,
                                          "damped_hessian_pd_at_ritz": bool(h["min"] + lam > 0)}
        recipes.write_json(path, rec)
        records.append(rec)
        print(f"step {step}: loss {rec['optim']['loss']} " + " ".join(
            f"{m}: Cover {rec['methods'][m]['cover']:.2f}" for m in FLAGS.methods)
            + (f" H [{rec['spectrum']['hessian']['min']:.3g}, {rec['spectrum']['hessian']['max']:.3g}]"
               f" negative mass {rec['spectrum']['hessian']['negative_mass']:.2f} lambda {lam:.3g}" if "spectrum" in rec else ""),
            flush=True)

    results = {"model": model.name, "data": FLAGS.data, "preset": FLAGS.preset, "seed": FLAGS.seed,
               "epochs": FLAGS.epochs, "steps": steps, "checkpoint_every": every, "n_train": n_train,
               "n_test": len(task.test_rows), "methods": FLAGS.methods, "damping_fraction": damping,
               "spectrum_rows": FLAGS.spectrum_rows, "lanczos_iters": FLAGS.lanczos_iters,
               "ground_truth": ({"kind": "trajectory influence (jaxinf.groundtruth)",
                                 "queries": FLAGS.ground_truth_queries} if gt else None),
               "split": task.split_info, "checkpoints": records}
    recipes.write_json(os.path.join(FLAGS.workdir, "convergence.json"), results)
    title = (f"{model.name} on {os.path.basename(os.path.normpath(FLAGS.data))}: attribution and curvature vs "
             f"step ({n_train} train, {len(task.test_rows)} test, {FLAGS.epochs:g} epochs)")
    _plot(records, FLAGS.methods, os.path.join(FLAGS.workdir, "convergence.png"), title)
    print(f"results: {FLAGS.workdir}/convergence.json, convergence.png")


if __name__ == "__main__":
    app.run(main)
