r"""Does parameter change track behaviour change? (the study's third explanation of why influence fails)

    python -m experiments.behaviour --data=../shared/paper_datasets/backdoor --workdir=runs/behaviour/backdoor

Fine-tunes LoRA variants that differ only in their training data: all rows ("full"), without each group in
turn ("without_<group>"), and on backdoor data with each trigger group kept at several fractions
("<group>@<fraction>"), for every seed. Per variant it measures

* parameter change: ||(alpha/r) B A||_F per adapted layer and in total (B = 0 at init, so this is the change the
  fine-tuning made; the study's measure), and the distance of the merged updates to the "full" variant of the same
  seed (jaxinf.analysis.change);
* behaviour: the mean test loss of each test group; for backdoor data the attack success rate of greedy answers
  (share of triggered test prompts answered without a refusal) and the clean refusal rate; for class data the
  share of greedy answers that start with the right label.

Then it reports how well parameter change predicts behaviour change across variants (Pearson / Spearman), and
the study's style of comparison: max/min ratio of attack success against max/min ratio of ||B A|| over the
trigger-fraction variants. Every fine-tuning run and measurement is cached per variant in --workdir (resumable).
Outputs: behaviour.json and behaviour.png in --workdir.
"""

import dataclasses
import json
import os

import numpy as np
from absl import app, flags, logging

from jaxinf import analysis, cli, recipes, runtime, study, training
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, load_model
from jaxinf.models.generate import greedy_generate_batch

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "fine-tuning sizes and settings (jaxinf.study.PRESETS)")
flags.DEFINE_string("workdir", "runs/behaviour", "variants' fine-tuning runs, measurements and results go here")
flags.DEFINE_list("seeds", ["0"], "seeds (subsample, adapter init, data order); every variant runs with each")
flags.DEFINE_list("fractions", ["0.1", "0.5"], "fractions of each trigger group to keep (backdoor data; 1 = full)")
flags.DEFINE_list("variants", None, "run only these variants (default: all), e.g. full,without_clean,trigger@0.1")
flags.DEFINE_float("epochs", None, "override the preset's fine-tuning epochs")
flags.DEFINE_integer("max_new_tokens", 8, "greedy tokens per test answer (a refusal shows in the first few)")
flags.DEFINE_integer("gen_batch", 16, "test prompts per generation batch")
cli.define_data_flags()


def variant_rows(groups: np.ndarray, fractions, seed: int) -> dict:
    """{variant name: sorted training row indices}: full, without each group, each trigger group at each fraction."""
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()))
    out = {"full": np.arange(groups.size)}
    for g in names:
        out[f"without_{g}"] = np.flatnonzero(groups != g)
    for g in [g for g in names if g.startswith("trigger")]:
        idx = np.flatnonzero(groups == g)
        for f in fractions:
            if not 0.0 < f < 1.0:
                continue
            keep = np.random.default_rng([seed, int(f * 1000)]).choice(idx, max(1, int(round(f * idx.size))),
                                                                        replace=False)
            out[f"{g}@{f:g}"] = np.sort(np.concatenate([np.flatnonzero(groups != g), keep]))
    return out


def _measure(fns, adapters, task, scale, backdoor, gen_batch, max_new_tokens):
    losses = analysis.example_losses(fns, adapters, task.test)
    tg = np.asarray(task.test.groups)
    out = {"param_change": analysis.parameter_change(adapters, scale),
           "test_loss": {str(g): float(losses[tg == g].mean()) for g in np.unique(tg)},
           "test_loss_mean": float(losses.mean())}
    prompts = [r["prompt"] for r in task.test_rows]
    answers = greedy_generate_batch(fns, adapters, prompts, max_new_tokens=max_new_tokens,
                                    template=FLAGS.template or study.PRESETS[FLAGS.preset].template,
                                    batch_size=gen_batch)
    out["answers"] = answers
    return out


def _score_answers(m, task, backdoor):
    """Behaviour from the cached greedy answers (recomputed on every run, so a changed refusal rule or label
    check needs no new generation): ASR and clean refusal rate (backdoor) or label accuracy (class data)."""
    answers = m["answers"]
    if backdoor:
        m.update(analysis.attack_success(answers, [str(g).startswith("trigger") for g in task.test.groups]))
        m["behaviour"] = m["asr"]
    else:
        m["label_accuracy"] = analysis.label_accuracy(answers, [r["response"] for r in task.test_rows])
        m["behaviour"] = m["label_accuracy"]
    return m


def _ratio(values):
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size < 2 or v.max() <= 0:
        return float("nan")
    return float(v.max() / v.min()) if v.min() > 0 else float("inf")


def _plot(rows, path, title, backdoor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ylab = "attack success rate (greedy)" if backdoor else "label accuracy (greedy)"
    for r in rows:
        axes[0].scatter(r["param_total"], r["behaviour"], color="tab:blue")
        axes[0].annotate(r["variant"], (r["param_total"], r["behaviour"]), fontsize=7)
        if r["name"] != "full":
            axes[1].scatter(r["distance_to_full"], r["abs_behaviour_change"], color="tab:red", marker="o")
            axes[1].scatter(r["distance_to_full"], r["abs_loss_change"], color="tab:green", marker="^")
            axes[1].annotate(r["variant"], (r["distance_to_full"], r["abs_behaviour_change"]), fontsize=7)
    axes[0].set_xlabel("parameter change  sqrt(sum_l ||(alpha/r) B_l A_l||_F^2)")
    axes[0].set_ylabel(ylab)
    axes[1].set_xlabel("distance of merged updates to 'full' (same seed)")
    axes[1].set_ylabel("|change| vs full: behaviour (o), mean test loss (^)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    runtime.setup()  # persistent compilation cache (JAXINF_COMPILATION_CACHE=0 turns it off)
    logging.set_verbosity(logging.WARNING)
    preset = study.PRESETS[FLAGS.preset]
    try:
        seeds = [int(s) for s in FLAGS.seeds]
        fractions = [float(f) for f in FLAGS.fractions]
    except ValueError as err:
        raise app.UsageError(f"--seeds must be integers and --fractions numbers in (0, 1]: {err}") from None
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise app.UsageError(f"--fractions={FLAGS.fractions}: each fraction must lie in (0, 1], e.g. 0.1,0.5")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    model = load_model(FLAGS.model, seed=seeds[0])
    lora = LoraConfig(dropout=preset.lora_dropout)
    fns = LMFunctions(model, lora)
    rows, per_variant = [], {}
    for seed in seeds:
        config = cli.task_config_from_flags(seed=seed, template=preset.template, max_length=preset.max_length,
                                            limit_train=preset.limit_train, limit_test=preset.limit_test)
        task = cli.load_task(model, config)
        train_groups = np.asarray(task.train.groups)
        backdoor = any(g.startswith("trigger") for g in train_groups) and "clean" in set(train_groups.tolist())
        variants = variant_rows(train_groups, fractions, seed)
        if FLAGS.variants:
            unknown = sorted(set(FLAGS.variants) - set(variants))
            if unknown:
                raise app.UsageError(f"--variants {unknown} unknown; this data has {sorted(variants)}")
            variants = {k: v for k, v in variants.items() if k in FLAGS.variants or k == "full"}
        harmful = "harmful" in set(train_groups.tolist())
        epochs = FLAGS.epochs or (preset.epochs_harmful if harmful and preset.epochs_harmful else preset.epochs)
        adapters_of = {}
        for name, idx in variants.items():
            vdir = os.path.join(FLAGS.workdir, "variants", f"{name}_s{seed}")
            sub = dataclasses.replace(task, train_rows=[task.train_rows[i] for i in idx], train=task.train.select(idx))
            steps = max(1, int(np.ceil(epochs * idx.size / preset.batch_size)))
            train_config = training.TrainConfig(steps=steps, batch_size=min(preset.batch_size, idx.size),
                                                lr=preset.lr, checkpoint_every=steps, seed=seed)
            with cli.user_errors():
                adapters, log = recipes.finetune_lora(
                    model, lora, sub, train_config, os.path.join(vdir, "finetune"),
                    run_config={"data": FLAGS.data, "preset": FLAGS.preset, "variant": name,
                                "loss_on": config.loss_on, **cli.data_settings(config)})
            adapters_of[name] = adapters
            mpath = os.path.join(vdir, "measure.json")
            if os.path.exists(mpath):
                with open(mpath) as f:
                    m = json.load(f)
            else:
                m = _measure(fns, adapters, task, lora.scale, backdoor, FLAGS.gen_batch, FLAGS.max_new_tokens)
                m.update(n_train=int(idx.size), steps=steps, final_loss=log[-1]["loss"] if log else None,
                         groups={str(g): int(c) for g, c in zip(*np.unique(train_groups[idx], return_counts=True))})
                recipes.write_json(mpath, m)
            m = _score_answers(m, task, backdoor)
            per_variant[f"{name}_s{seed}"] = m
            print(f"seed {seed} {name:24s} n={idx.size:4d} ||BA||={m['param_change']['total']:.4f} "
                  f"behaviour={m['behaviour']:.3f} test loss={m['test_loss_mean']:.3f}", flush=True)
        full = per_variant[f"full_s{seed}"]
        for name in variants:
            m = per_variant[f"{name}_s{seed}"]
            dist = analysis.parameter_distance(adapters_of[name], adapters_of["full"], lora.scale)
            m["distance_to_full"] = dist
            rows.append({"variant": name if len(seeds) == 1 else f"{name}/s{seed}", "name": name, "seed": seed,
                         "n_train": m["n_train"], "param_total": m["param_change"]["total"],
                         "behaviour": m["behaviour"], "distance_to_full": dist["delta_w"],
                         "abs_behaviour_change": abs(m["behaviour"] - full["behaviour"]),
                         "abs_loss_change": float(np.mean([abs(m["test_loss"][g] - full["test_loss"][g])
                                                           for g in full["test_loss"]])),
                         **({"asr": m["asr"], "clean_refusal": m["clean_refusal"]} if backdoor else {}),
                         "test_loss": m["test_loss"]})

    x, y = [r["param_total"] for r in rows], [r["behaviour"] for r in rows]
    changed = [r for r in rows if r["name"] != "full"]
    summary = {
        "behaviour_vs_param_change": analysis.correlations(x, y),
        "behaviour_change_vs_distance": analysis.correlations([r["distance_to_full"] for r in changed],
                                                              [r["abs_behaviour_change"] for r in changed]),
        "loss_change_vs_distance": analysis.correlations([r["distance_to_full"] for r in changed],
                                                         [r["abs_loss_change"] for r in changed]),
    }
    if backdoor:  # the study's comparison: trigger-fraction variants, full (fraction 1) and without the trigger
        frac = [r for r in rows if "@" in r["name"] or r["name"] == "full" or r["name"].startswith("without_trigger")]
        summary["study_ratio"] = {"variants": [r["variant"] for r in frac],
                                  "asr_max_over_min": _ratio([r["behaviour"] for r in frac]),
                                  "param_change_max_over_min": _ratio([r["param_total"] for r in frac]),
                                  "asr_floor": 1.0 / max(1, sum(g.startswith("trigger") for g in task.test.groups))}
    results = {"model": model.name, "data": FLAGS.data, "preset": FLAGS.preset, "seeds": seeds,
               "fractions": fractions, "epochs": epochs, "max_new_tokens": FLAGS.max_new_tokens,
               "kind": "backdoor" if backdoor else "class", "split": task.split_info, "rows": rows,
               "summary": summary, "variants": per_variant}
    recipes.write_json(os.path.join(FLAGS.workdir, "behaviour.json"), results)
    title = (f"{model.name} on {os.path.basename(os.path.normpath(FLAGS.data))}: behaviour vs parameter change "
             f"({len(rows)} variants)")
    _plot(rows, os.path.join(FLAGS.workdir, "behaviour.png"), title, backdoor)
    print(json.dumps(summary, indent=1, default=float))
    print(f"results: {FLAGS.workdir}/behaviour.json, behaviour.png")


if __name__ == "__main__":
    app.run(main)
