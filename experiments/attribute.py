r"""The study end to end: LoRA fine-tune, attribute every test row with every method, score against ground truth.

    python -m experiments.attribute                                  # SmolLM2, built-in backdoor task, quick preset
    python -m experiments.attribute --data=../shared/paper_datasets/emotion --workdir=runs/emotion

Stages (each cached in --workdir, so an interrupted run resumes): fine-tuning checkpoints, per-example LoRA
gradients, one score matrix per method. Outputs: results.json (with each test row's top/bottom --top_k training
rows per method), results.csv, metrics.png, report.html (explain.py's report for a few test rows per group), a
table on stdout, and a progress line per stage on stderr.

One curvature (--curvature) and one damping per result set: lambda is resolved once (--damping f, relative:
global scope lambda = f tr(C)/D of the whole curvature inverted; block scope lambda_l = f x the mean squared
gradient entry of each LoRA matrix) and every damped method uses that same absolute value (results.json records
it per method). --damping=0.01,0.1,1 sweeps in one run, reusing fine-tuning, gradients and K-FAC factors: one
value writes results.* in --workdir, several write --workdir/damping_<f>/results.* (scores of the damped methods
are cached in --workdir/scores/<method>__<curvature>_<scope>_f<f>.npz, the others in scores/<method>.npz).
"""

import csv
import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from jaxinf import api, attribution, cli, health, recipes, report, runtime, sharding, study, training
from jaxinf.progress import Stage, log
from jaxinf.evaluation import evaluate
from jaxinf.groundtruth import study as gt_study
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_list("methods", list(study.ALL_METHODS), f"comma list from {list(study.ALL_METHODS)}")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "quick: 2-core CPU sizes; paper: the study's settings")
flags.DEFINE_string("workdir", "runs/attribute", "fine-tuning, gradients, scores and results go here")
flags.DEFINE_integer("seed", 0, "seed for subsampling, data order, adapter init and solvers")
flags.DEFINE_float("epochs", None, "override the preset's fine-tuning epochs")
flags.DEFINE_enum("repsim_pooling", "prompt_end", list(attribution.POOLINGS),
                  "RepSim representation: hidden state at the final prompt token (the study) or response mean")
flags.DEFINE_integer("lissa_depth", None, "LiSSA iterations (the study's code ran 3-10; default: the preset's)")
flags.DEFINE_list("damping", None, "relative damping f (comma list = a sweep in one run, reusing fine-tuning, gradients "
                  "and factors; one result set per value): lambda = f x tr(C)/dim of the curvature being "
                  "inverted (global scope) or of each LoRA matrix (block scope). Default: the preset's")
flags.DEFINE_enum("damping_scope", "global", list(study.DAMPING_SCOPES),
                  "global: one absolute lambda for every method, from the whole operator; block: the study's rule, "
                  "lambda per LoRA matrix = f x its mean squared gradient entry (a diagonal damping for every method)")
flags.DEFINE_enum("curvature", "fisher", list(study.CURVATURES),
                  "fisher: empirical Fisher of the cached gradients; ggn | hessian: the model's exact operators over "
                  "the training rows for exact, cg, lissa, lanczos, arnoldi (the other methods report what they used)")
flags.DEFINE_string("mesh", None, "device mesh for the heavy stages, e.g. data=8 or data=2,model=4 (jaxinf.sharding): "
                    "rows split over data, frozen base weights FSDP-sharded over model; the axis sizes must multiply "
                    "to the device count; the same numbers as one device (default: one device)")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "base weights and activations (default float32); LoRA "
                  "adapters, their updates, gradients, K-FAC factors and scores stay float32")
flags.DEFINE_list("ground_truth", ["trajectory", "lds"],
                  f"counterfactual ground truths from {list(gt_study.KINDS)} (empty: none); every method's agreement "
                  "with each (LDS; mean per-query Spearman for the others) goes into results and gt_agreement.png")
flags.DEFINE_integer("gt_queries", 1, "test rows (spread evenly) for trajectory / loo / pbrf (0 = all); LDS uses all "
                     "(the quick default keeps README command 1's cost down on 2 CPU cores; use 4 or more)")
flags.DEFINE_integer("gt_subsets", 4, "LDS: retrained random subsets (the quick default: a coarse LDS, each subset costs "
                     "one fine-tuning run; use 50-100)")
flags.DEFINE_float("gt_fraction", 0.5, "LDS: fraction of the training rows each subset keeps")
flags.DEFINE_integer("gt_loo_rows", 8, "leave-one-out: training rows (spread evenly; 0 = all) retrained without")
flags.DEFINE_integer("gt_pbrf_rows", 8, "PBRF: training rows (spread evenly; 0 = all)")
flags.DEFINE_float("gt_pbrf_eps", 1e-2, "PBRF: up-weighting eps of the row")
flags.DEFINE_float("gt_pbrf_damping", 0.1, "PBRF: proximity lambda as a fraction of the empirical Fisher's mean "
                   "eigenvalue (mean ||g_n||^2 / D)")
flags.DEFINE_integer("gt_pbrf_iters", 50, "PBRF: L-BFGS iterations")
flags.DEFINE_integer("gt_chunk", 1, "retrains (LOO / LDS subsets) vmapped at once")
flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples over test rows for the confidence intervals")
cli.define_data_flags()  # --data, --test_data/--test_fraction, columns, --template/--max_length/--limit_* (preset's)
flags.DEFINE_integer("top_k", 10, "per method and test row, the top-k and bottom-k training rows kept in results.json")
flags.DEFINE_integer("report_queries", 1, "test rows per group explained in report.html (0 = no report)")
flags.DEFINE_integer("report_k", 3, "training rows per method shown in report.html (top and bottom each)")
flags.DEFINE_list("report_methods", ["grad_dot", "tracin", "exact", "ekfac", "repsim"],
                  "methods shown side by side in report.html (those of --methods that ran; each refits its "
                  "preconditioner for the report's queries, so the list is short by default)")


def _gradients(fns, adapters, tokenized, path, chunk, mesh=None):
    """Per-example gradients as a stacked pytree, cached in `path` (.npz of flat rows)."""
    name = os.path.splitext(os.path.basename(path))[0].replace("grads_", "")
    return api.cached_gradients(fns, adapters, tokenized, path, chunk, desc=f"gradients ({name})", mesh=mesh)


def _check_settings(workdir, settings):
    """Cached gradients and scores are only valid for the settings that made them: refuse a mismatch."""
    path = os.path.join(workdir, "attribute_config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:  # a setting added since (absent = its default, None) is no change
            raise app.UsageError(f"{workdir} holds results made with other settings {changed} (old, new): "
                                 "use a new --workdir")
    else:
        recipes.write_json(path, settings)


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, metric in zip(axes, ("acc", "cover", "auc")):
        vals = np.array([r[metric] for r in rows])
        lo = vals - np.array([r[f"{metric}_lo"] for r in rows])
        hi = np.array([r[f"{metric}_hi"] for r in rows]) - vals
        ax.barh(names, vals, xerr=[lo, hi], color="tab:blue", alpha=0.8)
        ax.set_xlim(0, 1)
        ax.set_title(metric.upper() if metric == "auc" else metric.capitalize())
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    start = time.perf_counter()
    runtime.setup()  # persistent compilation cache (JAXINF_COMPILATION_CACHE=0 turns it off)
    logging.set_verbosity(logging.WARNING)
    preset = study.PRESETS[FLAGS.preset]
    dampings = _damping_values(FLAGS.damping, preset.damping)
    unknown = [m for m in FLAGS.methods if m not in study.METHODS]
    if unknown:
        raise app.UsageError(f"unknown --methods {unknown}; choose from {list(study.METHODS)}")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    _check_settings(FLAGS.workdir, {k: FLAGS[k].value for k in (
        "model", "data", "preset", "seed", "limit_train", "limit_test", "epochs", "loss_on", "repsim_pooling",
        "lissa_depth")} | _data_options() | _dtype_option())  # damping, scope and curvature key the score caches instead

    data = cli.task_config_from_flags(seed=FLAGS.seed, template=preset.template, max_length=preset.max_length,
                                      limit_train=preset.limit_train, limit_test=preset.limit_test)
    try:
        mesh = sharding.parse_mesh(FLAGS.mesh)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    model = load_model(FLAGS.model, seed=FLAGS.seed, dtype={"bfloat16": jnp.bfloat16}.get(FLAGS.dtype, jnp.float32))
    if mesh is not None:  # FSDP-shard the frozen weights once; every stage then uses them where they are
        model = dataclasses.replace(model, params=sharding.shard_params(model.params, mesh))
    task = cli.load_task(model, data)  # disjoint splits; bad data end in one UsageError line
    harmful = "harmful" in set(task.train.groups.tolist())
    epochs = FLAGS.epochs or (preset.epochs_harmful if harmful and preset.epochs_harmful else preset.epochs)
    lora = LoraConfig(dropout=preset.lora_dropout)
    n_train = len(task.train_rows)
    steps, batch_size = study.finetune_schedule(preset, epochs, n_train)
    train_config = training.TrainConfig(
        steps=steps, batch_size=batch_size, lr=preset.lr,
        checkpoint_every=max(1, steps // preset.tracin_checkpoints), seed=FLAGS.seed)
    ft_dir = os.path.join(FLAGS.workdir, "finetune")
    with cli.user_errors():  # a non-finite loss names the step and the last good checkpoint, in one line
        adapters, log = recipes.finetune_lora(
            model, lora, task, train_config, ft_dir,
            run_config={"data": FLAGS.data, "preset": FLAGS.preset, "loss_on": FLAGS.loss_on, **_data_options()},
            mesh=mesh)
    fns = LMFunctions(model, lora)

    grads_train = _gradients(fns, adapters, task.train, os.path.join(FLAGS.workdir, "grads_train.npz"),
                             preset.grad_chunk, mesh)
    grads_test = _gradients(fns, adapters, task.test, os.path.join(FLAGS.workdir, "grads_test.npz"),
                            preset.grad_chunk, mesh)
    inputs = study.StudyInputs(fns=fns, adapters=adapters, train=task.train, test=task.test, workdir=ft_dir,
                               preset=preset, train_grads=grads_train, test_grads=grads_test, seed=FLAGS.seed,
                               lissa_depth=FLAGS.lissa_depth, repsim_pooling=FLAGS.repsim_pooling,
                               damping_scope=FLAGS.damping_scope, curvature=FLAGS.curvature, mesh=mesh)
    final = log[-1] if log else {}
    title = f"{model.name} on {os.path.basename(os.path.normpath(FLAGS.data))} ({FLAGS.preset}: {n_train} train, " \
            f"{len(task.test_rows)} test)"
    run_info = {
        "model": model.name, "data": FLAGS.data, "preset": FLAGS.preset, "seed": FLAGS.seed,
        "loss_on": FLAGS.loss_on, "repsim_pooling": FLAGS.repsim_pooling,
        "dtype": FLAGS.dtype or "float32", "mesh": sharding.describe(mesh),
        "n_train": n_train, "n_test": len(task.test_rows), "seq_len": int(task.train.input_ids.shape[1]),
        "group_counts": {g: int(c) for g, c in zip(*np.unique(task.train.groups, return_counts=True))},
        "train_groups": [str(g) for g in task.train.groups], "test_groups": [str(g) for g in task.test.groups],
        "finetune": {"steps": steps, "epochs": epochs, "batch_size": batch_size, "final_loss": final.get("loss"),
                     "final_grad_norm": final.get("grad_norm"), "dist_from_init": final.get("dist_from_init"),
                     "health": health.read(ft_dir)},  # loss not falling, vanishing gradient, far from init
        "data_split": task.split_info,  # how train/test were split, sizes, duplicates kept by --allow_overlap
    }
    ground_truth = {}  # kind -> ground truth (jaxinf.groundtruth.study.compute) of this run only
    if _ground_truth_kinds():  # counterfactual ground truths of this fine-tuning (cached in workdir/groundtruth)
        ground_truth = _ground_truths(fns, adapters, task, train_config, grads_train, ft_dir, mesh)
        run_info["ground_truth"] = gt_study.summary(ground_truth)
    print(f"\n{title}; fine-tune loss {final.get('loss', float('nan')):.3f} after {steps} steps")
    for value in dampings:  # one result set per damping value; fine-tuning, gradients and factors are shared
        result_dir = FLAGS.workdir if len(dampings) == 1 else os.path.join(FLAGS.workdir, f"damping_{value:g}")
        path = _attribute_one_damping(dataclasses.replace(inputs, damping=value), task, result_dir, run_info, title,
                                      ground_truth)
    where = f"; report: {path}" if path else ""
    print(f"total {time.perf_counter() - start:.0f} s{where}")


def _data_options() -> dict:
    """Data flags that change which rows or tokens a run sees, when set away from their defaults (so workdirs made
    before these flags existed still resume): the same keys and defaults as jaxinf.api.DATA_OPTIONS."""
    return api.data_options({k: FLAGS[k].value for k in api.DATA_OPTIONS})


def _dtype_option() -> dict:
    """The model dtype as a workdir setting: None for float32, so workdirs made before --dtype existed resume."""
    return {"dtype": None if FLAGS.dtype in (None, "float32") else FLAGS.dtype}


def _ground_truth_kinds() -> list:
    return [k for k in (FLAGS.ground_truth or []) if k]


def _ground_truths(fns, adapters, task, train_config, grads_train, ft_dir, mesh=None):
    """The --ground_truth kinds for this fine-tuning run: the scanned trainer replays it from the same initial
    adapters (its checkpoint 0), data order and keys."""
    unknown = [k for k in _ground_truth_kinds() if k not in gt_study.KINDS]
    if unknown:
        raise app.UsageError(f"--ground_truth: unknown {unknown}; choose from {list(gt_study.KINDS)}")
    flat = attribution.flatten_rows(grads_train)
    mean_eig = float(np.mean(np.sum(np.square(flat), axis=1)) / flat.shape[1])  # trace(F) / D
    config = gt_study.GroundTruthConfig(
        kinds=tuple(_ground_truth_kinds()), max_queries=FLAGS.gt_queries or None, lds_subsets=FLAGS.gt_subsets,
        lds_fraction=FLAGS.gt_fraction, loo_rows=FLAGS.gt_loo_rows or None, pbrf_rows=FLAGS.gt_pbrf_rows or None,
        pbrf_eps=FLAGS.gt_pbrf_eps, pbrf_damping=FLAGS.gt_pbrf_damping * mean_eig, pbrf_iters=FLAGS.gt_pbrf_iters,
        retrain_chunk=FLAGS.gt_chunk, seed=FLAGS.seed)
    run = gt_study.replay(fns, adapters, recipes.batch_arrays(task.train), train_config, ft_dir, mesh)
    return gt_study.compute(run, adapters, recipes.batch_arrays(task.test), config,
                            os.path.join(FLAGS.workdir, "groundtruth"))


def _ground_truth_columns(scores, detail, row, ground_truth):
    """Agreement of one method's scores with every ground truth: results.json (with per-query values) and CSV."""
    if not ground_truth:
        return
    agree = gt_study.agreement_with(scores, ground_truth, n_boot=FLAGS.bootstrap, seed=FLAGS.seed)
    detail["ground_truth"] = agree
    for kind, a in agree.items():
        row[f"gt_{kind}"], (row[f"gt_{kind}_lo"], row[f"gt_{kind}_hi"]) = a["value"], a["ci"]


def _ground_truth_table(rows, n_test, n_train, result_dir, title, ground_truth):
    """Ground truths scored as methods against each other, then the agreement table and plot."""
    if not ground_truth:
        return
    kinds = list(ground_truth)
    for kind in kinds:
        as_scores = gt_study.as_method_scores(kind, ground_truth[kind], n_test, n_train)
        if as_scores is not None:
            row = {"method": f"gt:{kind}"}
            _ground_truth_columns(as_scores, {}, row, ground_truth)
            rows.append(row)
    gt_study.plot_agreement(rows, kinds, os.path.join(result_dir, "gt_agreement.png"), title)
    recipes.write_json(os.path.join(result_dir, "ground_truth.json"), {
        "ground_truths": gt_study.summary(ground_truth),
        "agreement": {r["method"]: {k: [r.get(f"gt_{k}"), r.get(f"gt_{k}_lo"), r.get(f"gt_{k}_hi")] for k in kinds}
                      for r in rows}})
    print("\nagreement with counterfactual ground truth (LDS for lds; mean per-query Spearman for the others; "
          "larger = better, 1 = perfect)")
    print(f"{'method':14s} " + " ".join(f"{k:>16s}" for k in kinds))
    for r in rows:
        cells = [f"{r[f'gt_{k}']:6.3f} [{r[f'gt_{k}_lo']:5.2f},{r[f'gt_{k}_hi']:5.2f}]"
                 if f"gt_{k}" in r and np.isfinite(r[f"gt_{k}"]) else f"{'-':>16s}" for k in kinds]
        print(f"{r['method']:14s} " + " ".join(f"{c:>16s}" for c in cells))
    facts = {k: v for k, v in gt_study.summary(ground_truth).items()}
    print("ground truths: " + "; ".join(f"{k} {v['seconds']:.0f} s" + (
        f" ({v['subsets']} subsets of {v['fraction']:.2f})" if k == "lds"
        else f" ({len(v['queries'])} queries x {v['rows']} rows)") + (
        f", replay error {v['replay_error']:.1e}" if "replay_error" in v else "") for k, v in facts.items()))
    print(f"ground truth: {result_dir}/ground_truth.json (value, lo, hi per method, ground truths included), "
          "gt_agreement.png")


def _damping_values(flag_value, preset_value) -> list:
    """--damping as floats (the preset's value when unset); a clear error for a bad entry."""
    if not flag_value:
        return [float(preset_value)]
    try:
        values = [float(v) for v in flag_value]
    except ValueError:
        raise app.UsageError(f"--damping={','.join(flag_value)}: every entry must be a number, e.g. --damping=0.01,0.1")
    if any(not v >= 0 for v in values) or len(set(values)) != len(values):
        raise app.UsageError(f"--damping={','.join(flag_value)}: values must be >= 0 and distinct")
    return values


def _scores_of(method, inputs, score_dir):
    """(scores, seconds, info) of one method, computed once and cached in score_dir. Methods that use the
    damping or the curvature are cached under a key naming them (study.score_cache_key)."""
    os.makedirs(score_dir, exist_ok=True)
    path = os.path.join(score_dir, f"{study.score_cache_key(method, inputs)}.npz")
    if not os.path.exists(path):
        scores, seconds, info = study.run_method_with_info(method, inputs)
        np.savez(path + ".tmp.npz", scores=scores, seconds=seconds, info=json.dumps(info))
        os.replace(path + ".tmp.npz", path)
    saved = np.load(path)
    info = json.loads(str(saved["info"])) if "info" in saved else {}
    return saved["scores"], float(saved["seconds"]), info


def _method_record(method, scores, seconds, info, exact_scores, task):
    """(results.json entry, CSV/table row) of one method: metrics vs ground truth, agreement with `exact`, and the
    method's curvature, absolute damping and solver report (study.run_method_with_info)."""
    metrics = evaluate(scores, task.test.groups, task.train.groups, n_boot=FLAGS.bootstrap, seed=FLAGS.seed)
    agreement = study.agreement_with_exact(scores, exact_scores)
    detail = dict(metrics, seconds=seconds, vs_exact=agreement, **info)
    row = {"method": method, "seconds": seconds, "spearman_vs_exact": agreement["spearman"],
           "direction_error_vs_exact": agreement["direction"], "curvature": info.get("curvature", ""),
           "lambda": study.lambda_summary(info.get("lambda")), "converged": info.get("converged", True)}
    for key in ("acc", "cover", "auc", "recall@10"):
        row[key] = metrics[key]["value"]
        row[f"{key}_lo"], row[f"{key}_hi"] = metrics[key]["ci"]
    return detail, row


def _attribute_one_damping(inputs, task, result_dir, run_info, title, ground_truth):
    """Every method at one damping value: scores (cached), metrics, results.json / results.csv / metrics.png in
    result_dir and a table on stdout."""
    os.makedirs(result_dir, exist_ok=True)
    score_dir = os.path.join(FLAGS.workdir, "scores")
    rows, details = [], {}
    exact_scores = None
    all_scores = {}
    for i, method in enumerate(FLAGS.methods):
        clock = Stage(f"method {i + 1}/{len(FLAGS.methods)} {method} (damping {inputs.damping:g})")
        try:
            scores, seconds, info = _scores_of(method, inputs, score_dir)
            if exact_scores is None:
                exact_scores = _scores_of("exact", inputs, score_dir)[0]
        except Exception as err:  # report the failure in the table and go on with the other methods
            clock.close(note="failed")
            logging.error("method %s failed: %s", method, err)
            details[method] = {"error": f"{type(err).__name__}: {err}"}
            continue
        clock.close()
        detail, row = _method_record(method, scores, seconds, info, exact_scores, task)
        # Per-method extra outputs: add keys to `detail` (results.json) and/or `row` (results.csv) here.
        _ground_truth_columns(scores, detail, row, ground_truth)
        detail["top_rows"] = report.top_rows_table(scores, task.train.groups, FLAGS.top_k, seed=FLAGS.seed)
        all_scores[method] = scores
        details[method] = detail
        rows.append(row)

    results = dict(run_info, damping=study.damping_report(inputs), methods=details)
    recipes.write_json(os.path.join(result_dir, "results.json"), results)
    with open(os.path.join(result_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        _plot(rows, os.path.join(result_dir, "metrics.png"),
              f"{title}, {inputs.curvature}, damping {inputs.damping:g} ({inputs.damping_scope})")
    print(f"\ncurvature {inputs.curvature}, damping f={inputs.damping:g} ({inputs.damping_scope} scope): "
          f"{results['damping']['description']}")
    print(f"{'method':12s} {'Acc':>6s} {'Cover':>6s} {'AUC':>6s} {'R@10':>6s} {'rho_exact':>9s} {'lambda':>9s} "
          f"{'curv':>7s} {'s':>7s}")
    for r in rows:
        flag = "" if r["converged"] else "  NOT CONVERGED"
        print(f"{r['method']:12s} {r['acc']:6.3f} {r['cover']:6.3f} {r['auc']:6.3f} {r['recall@10']:6.3f} "
              f"{r['spearman_vs_exact']:9.3f} {r['lambda']:>9s} {r['curvature']:>7s} {r['seconds']:7.1f}{flag}")
    for method, d in details.items():
        if "error" in d:
            print(f"{method:12s} failed: {d['error']}")
    print(f"rho_exact: mean Spearman correlation of each test row's scores with exact influence (method 'exact': "
          f"the damped {inputs.curvature} inverted exactly in float64); for iHVP methods it measures their "
          "approximation error. lambda: the absolute damping each method used (a range when per block)")
    print(f"results: {result_dir}/results.json, results.csv, metrics.png")
    _ground_truth_table([dict(r) for r in rows], len(task.test_rows), len(task.train_rows), result_dir, title,
                        ground_truth)
    return _report(inputs, task, all_scores, result_dir, title)


def _report(inputs, task, all_scores, result_dir, title):
    """report.html: the first --report_queries test rows of each group, top/bottom --report_k rows per method with
    per-token contributions (jaxinf.report); returns its path (None if disabled or no method ran)."""
    all_scores = {m: all_scores[m] for m in FLAGS.report_methods if m in all_scores}
    if FLAGS.report_queries <= 0 or not all_scores:
        return None
    groups = [str(g) for g in task.test.groups]
    queries = sorted(i for g in sorted(set(groups)) for i in [j for j, h in enumerate(groups) if h == g][
        :FLAGS.report_queries])
    explanations = report.explain(list(all_scores), inputs, tokenizer=inputs.fns.model.tokenizer,
                                  train_rows=task.train_rows, test_rows=task.test_rows, k=FLAGS.report_k,
                                  queries=queries, scores=all_scores, seed=FLAGS.seed)
    path = os.path.join(result_dir, "report.html")
    report.write_report(path, explanations, meta=[
        f"{title}; {inputs.curvature}, damping {inputs.damping:g} ({inputs.damping_scope})",
        f"test rows {queries} ({FLAGS.report_queries} per group); top and bottom {FLAGS.report_k} training rows "
        "per method; results.json keeps the top/bottom --top_k of every test row"])
    log(f"report: {path}")
    return path


if __name__ == "__main__":
    app.run(main)
