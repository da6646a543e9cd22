r"""Does parameter change track behaviour change? (the study's third explanation of why influence fails)

    from jaxinf.explanations import behaviour
    result = behaviour.run(behaviour.BehaviourConfig(StudyConfig(...)), "runs/behaviour/backdoor")

Fine-tunes LoRA variants that differ only in their training data (`variant_rows`): all rows ("full"), without each
group in turn ("without_<group>"), and on backdoor data with each trigger group kept at several fractions
("<group>@<fraction>"), for every seed; each variant is one `jaxinf.pipeline.finetune` of the study's schedule on
its rows (the epochs rule read from the full training set). Per variant it measures

* parameter change: ||(alpha/r) B A||_F per adapted layer and in total (B = 0 at init, so this is the change the
  fine-tuning made; the study's measure), and the distance of the merged updates to the "full" variant of the same
  seed (jaxinf.analysis.change);
* behaviour: the mean test loss of each test group; for backdoor data the attack success rate of greedy answers
  (share of triggered test prompts answered without a refusal) and the clean refusal rate; for class data the
  share of greedy answers that start with the right label.

Then it reports how well parameter change predicts behaviour change across variants (Pearson / Spearman), and
the study's style of comparison: max/min ratio of attack success against max/min ratio of ||B A|| over the
trigger-fraction variants. Every fine-tuning run and measurement is cached per variant in
workdir/variants/<variant>_s<seed> (resumable). Outputs: behaviour.json and behaviour.png in the workdir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from jaxinf import analysis, pipeline, progress, sharding, study
from jaxinf.explanations import data_name
from jaxinf.models import LMFunctions
from jaxinf.models.generate import greedy_generate_batch
from jaxinf.report import figures
from jaxinf.workdir import read_json, write_json


@dataclasses.dataclass(frozen=True)
class BehaviourConfig:
    """One behaviour run. study: model, data, preset and epochs (None: the study's rule; its seed is replaced by
    each of `seeds`); seeds: every variant runs with each (subsample, adapter init, data order); fractions: of each
    trigger group to keep (backdoor data; 1 = full); variants: run only these (None: all; "full" always runs),
    e.g. ("full", "without_clean", "trigger@0.1"); max_new_tokens: greedy tokens per test answer (a refusal shows in
    the first few); gen_batch: test prompts per generation batch."""

    study: pipeline.StudyConfig = pipeline.StudyConfig()
    seeds: tuple = (0,)
    fractions: tuple = (0.1, 0.5)
    variants: Optional[tuple] = None
    max_new_tokens: int = 8
    gen_batch: int = 16

    def validate(self) -> "BehaviourConfig":
        """Raise ValueError (one line: the field and the fix) for a setting no variant could use; returns self."""
        self.study.validate()
        if not self.seeds or any(int(s) != s for s in self.seeds):
            raise ValueError(f"seeds={','.join(map(str, self.seeds))}: give one or more integers, e.g. 0,1")
        if any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"fractions={','.join(map(str, self.fractions))}: each fraction must lie in (0, 1], "
                             "e.g. 0.1,0.5")
        for name in ("max_new_tokens", "gen_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        return self


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


def _measure(fns, adapters, task, scale, template, gen_batch, max_new_tokens):
    losses = analysis.example_losses(fns, adapters, task.test)
    tg = np.asarray(task.test.groups)
    out = {"param_change": analysis.parameter_change(adapters, scale),
           "test_loss": {str(g): float(losses[tg == g].mean()) for g in np.unique(tg)},
           "test_loss_mean": float(losses.mean())}
    prompts = [r["prompt"] for r in task.test_rows]
    out["answers"] = greedy_generate_batch(fns, adapters, prompts, max_new_tokens=max_new_tokens, template=template,
                                           batch_size=gen_batch)
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


def _summary(rows, backdoor, task) -> dict:
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
    return summary


def run(config: BehaviourConfig, workdir: str) -> dict:
    """Fine-tune and measure every variant for every seed (cached per variant), write behaviour.json and
    behaviour.png in `workdir`; returns what behaviour.json holds."""
    config.validate()
    seeds = [int(s) for s in config.seeds]
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.parse_mesh(config.study.mesh)
    model = pipeline.load_study_model(dataclasses.replace(config.study, seed=seeds[0]), mesh)
    template = pipeline.task_config(config.study).template
    fns = None
    rows, per_variant = [], {}
    for seed in seeds:
        sc = dataclasses.replace(config.study, seed=seed)
        task = pipeline.load_study_task(sc, model)
        train_groups = np.asarray(task.train.groups)
        backdoor = any(g.startswith("trigger") for g in train_groups) and "clean" in set(train_groups.tolist())
        variants = variant_rows(train_groups, config.fractions, seed)
        if config.variants:
            unknown = sorted(set(config.variants) - set(variants))
            if unknown:
                raise ValueError(f"variants {unknown} unknown; this data has {sorted(variants)}")
            variants = {k: v for k, v in variants.items() if k in config.variants or k == "full"}
        epochs = pipeline.study_epochs(sc, task)  # of the full training set, for every variant
        adapters_of = {}
        for name, idx in variants.items():
            vdir = os.path.join(workdir, "variants", f"{name}_s{seed}")
            sub = dataclasses.replace(task, train_rows=[task.train_rows[i] for i in idx], train=task.train.select(idx))
            adapters, log, train_config, lora = pipeline.finetune(sc, model, sub, vdir, epochs=epochs, checkpoints=1,
                                                                  mesh=mesh, run_config={"variant": name})
            fns = fns or LMFunctions(model, lora)
            adapters_of[name] = adapters
            mpath = os.path.join(vdir, "measure.json")
            if os.path.exists(mpath):
                m = read_json(mpath)
            else:
                m = _measure(fns, adapters, task, lora.scale, template, config.gen_batch, config.max_new_tokens)
                m.update(n_train=int(idx.size), steps=train_config.steps,
                         final_loss=log[-1]["loss"] if log else None,
                         groups={str(g): int(c) for g, c in zip(*np.unique(train_groups[idx], return_counts=True))})
                write_json(mpath, m)
            m = _score_answers(m, task, backdoor)
            per_variant[f"{name}_s{seed}"] = m
            progress.log(f"seed {seed} {name:24s} n={idx.size:4d} ||BA||={m['param_change']['total']:.4f} "
                         f"behaviour={m['behaviour']:.3f} test loss={m['test_loss_mean']:.3f}")
        full = per_variant[f"full_s{seed}"]
        for name in variants:
            m = per_variant[f"{name}_s{seed}"]
            dist = analysis.parameter_distance(adapters_of[name], adapters_of["full"], fns.lora.scale)
            m["distance_to_full"] = dist
            rows.append({"variant": name if len(seeds) == 1 else f"{name}/s{seed}", "name": name, "seed": seed,
                         "n_train": m["n_train"], "param_total": m["param_change"]["total"],
                         "behaviour": m["behaviour"], "distance_to_full": dist["delta_w"],
                         "abs_behaviour_change": abs(m["behaviour"] - full["behaviour"]),
                         "abs_loss_change": float(np.mean([abs(m["test_loss"][g] - full["test_loss"][g])
                                                           for g in full["test_loss"]])),
                         **({"asr": m["asr"], "clean_refusal": m["clean_refusal"]} if backdoor else {}),
                         "test_loss": m["test_loss"]})

    summary = _summary(rows, backdoor, task)
    results = {"model": model.name, "data": config.study.data.source, "preset": study.preset_name(config.study.preset),
               "seeds": seeds, "fractions": list(config.fractions), "epochs": epochs,
               "max_new_tokens": config.max_new_tokens, "kind": "backdoor" if backdoor else "class",
               "split": task.split_info, "rows": rows, "summary": summary, "variants": per_variant}
    write_json(os.path.join(workdir, "behaviour.json"), results)
    title = f"{model.name} on {data_name(config.study)}: behaviour vs parameter change ({len(rows)} variants)"
    figures.plot_behaviour(rows, os.path.join(workdir, "behaviour.png"), title, backdoor)
    return read_json(os.path.join(workdir, "behaviour.json"))
