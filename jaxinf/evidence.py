"""The evidence job: the study at sizes that support coarse verdicts, with paired intervals across runs.

    from jaxinf import evidence
    result = evidence.run(evidence.EvidenceConfig(datasets=("backdoor",), seeds=(0, 1)), "runs/evidence")

For every dataset and fine-tuning seed it runs `jaxinf.pipeline.run_study` (each a resumable workdir of its own)
with the ground truths trajectory (on `queries` test rows spread over the test set), lds (each of `subsets`
subsets of fraction `fraction` retrained from scratch with `lds_seeds` seeds) and lds_masked (the same subsets as
weight-0 replays), at every damping value of the sweep. Then, per dataset, damping and ground truth, it pools the
runs of all seeds:

* each method's agreement: the mean over (seed, query) of LDS_q (or of the per-query Spearman for trajectory),
  with a stratified two-way bootstrap interval (subsets and queries resampled within each run;
  `groundtruth.agreement.pooled_paired_lds`), none from fewer than 8 queries;
* paired differences against grad_dot and exact on the same queries and subsets, with the same bootstrap, and a
  verdict: "better" / "worse" when the 95% interval excludes 0, else "open";
* what the labels already say: the Spearman, across methods, of LDS with Cover (a ground truth that only
  re-measures the labels gives ~1); and how alike the masked replay and the real retrains rank the same subsets
  (per query, pooled), and two retrain seeds (seed noise);
* convergence (`convergence_checkpoints` > 0): for the first seed, `jaxinf.explanations.convergence` with the
  trajectory ground truth at every checkpoint (does agreement with the run's own derivative change as the
  fine-tuning converges?).

Outputs in `out_dir`: evidence.json (everything, with the settings, the per-run summaries and the provenance: command,
git commit, machine), evidence.csv (one row per dataset, damping, ground truth and method) and evidence.png (the
paired differences with intervals).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional

import numpy as np

from jaxinf import pipeline, progress, runtime
from jaxinf.data import GENERATORS
from jaxinf.evaluation.metrics import row_spearman, spearman
from jaxinf.groundtruth import agreement
from jaxinf.groundtruth import study as gt_study
from jaxinf.report import tables
from jaxinf.workdir import write_json

KINDS = ("trajectory", "lds", "lds_masked")


@dataclasses.dataclass(frozen=True)
class EvidenceConfig:
    """study: the base StudyConfig (model, preset, methods, ...; its data source, seed, damping and ground truth
    are set per run here). datasets: folder names under data_root (or any `DataConfig.source`)."""

    study: pipeline.StudyConfig = pipeline.StudyConfig(
        methods=("grad_dot", "tracin", "tracin_adam", "datainf", "exact_layer", "exact", "ekfac", "repsim"),
        report=pipeline.ReportConfig(queries=0))
    datasets: tuple = ("backdoor", "mixedS", "emotion")
    data_root: str = "../shared/paper_datasets"
    seeds: tuple = (0, 1)
    dampings: tuple = (0.1, 1.0, 100.0, 1e4)
    queries: int = 8
    subsets: int = 32
    fraction: float = 0.5
    stratify: bool = False
    lds_seeds: int = 2
    query_chunk: int = 1
    against: tuple = ("grad_dot", "exact")
    bootstrap: int = 1000
    convergence_checkpoints: int = 5
    convergence_methods: tuple = ("grad_dot", "datainf", "exact", "ekfac", "repsim")

    def validate(self) -> "EvidenceConfig":
        if not self.datasets or not self.seeds or not self.dampings:
            raise ValueError("evidence: datasets, seeds and dampings must each name at least one value")
        if self.queries < agreement.MIN_QUERIES:
            raise ValueError(f"evidence: queries={self.queries}; at least {agreement.MIN_QUERIES} are needed for an "
                             "interval")
        if self.subsets < 8:
            raise ValueError(f"evidence: subsets={self.subsets}; use at least 8 (32 or more for a verdict)")
        for name in self.datasets:
            self.source(name)
        self.run_config(self.datasets[0], self.seeds[0]).validate()
        return self

    def source(self, name: str) -> str:
        """The data source of a dataset name: data_root/name when that folder exists, else the name itself when
        it is a generator or an existing file; otherwise a one-line error naming the path."""
        path = os.path.join(self.data_root, name)
        if os.path.isdir(path):
            return path
        if os.path.exists(name) or name in GENERATORS:
            return name
        raise ValueError(f"evidence: dataset {name!r} not found at {path}: pass data_root (--data_root) pointing at "
                         "the study's paper_datasets folder, or a generator name / data file")

    def run_config(self, name: str, seed: int) -> pipeline.StudyConfig:
        gt = pipeline.GroundTruthSettings(kinds=KINDS, queries=self.queries, subsets=self.subsets,
                                          fraction=self.fraction, seeds=self.lds_seeds, stratify=self.stratify,
                                          query_chunk=self.query_chunk)
        return dataclasses.replace(self.study, data=dataclasses.replace(self.study.data, source=self.source(name)),
                                   seed=int(seed), damping=tuple(float(d) for d in self.dampings), ground_truth=gt,
                                   report=dataclasses.replace(self.study.report, bootstrap=self.bootstrap))


def run(config: EvidenceConfig, workdir: str, out_dir: Optional[str] = None,
        provenance: Optional[dict] = None) -> dict:
    """Every (dataset, seed) study in workdir/<dataset>_s<seed> (each resumable), then the pooled findings in
    out_dir (default workdir): evidence.json, evidence.csv, evidence.png. Returns evidence.json as a dict.
    provenance: what evidence.json records as the run's command, commit and machine (`runtime.provenance`; default:
    this process's, from sys.argv)."""
    config.validate()
    out_dir = out_dir or workdir
    units = [(name, seed) for name in config.datasets for seed in config.seeds]
    start, fresh, summaries = time.perf_counter(), [], {}
    for i, (name, seed) in enumerate(units):
        unit_dir = os.path.join(workdir, f"{name}_s{seed}")
        t0 = time.perf_counter()
        with progress.stage(f"evidence {i + 1}/{len(units)}: {name}, fine-tuning seed {seed}"):
            result = pipeline.run_study(config.run_config(name, seed), unit_dir)
        spent = time.perf_counter() - t0
        if spent > 5.0:  # a run that was not all cached
            fresh.append(spent)
        left = len(units) - i - 1
        if fresh and left:
            progress.log(f"evidence: {i + 1}/{len(units)} runs done; about {left * np.mean(fresh) / 60:.0f} min left")
        summaries[f"{name}_s{seed}"] = {"ground_truth": result.sets[0]["results"].get("ground_truth", {}),
                                        "finetune": result.sets[0]["results"].get("finetune", {}),
                                        "labels": {s["damping"]: {r["method"]: {"cover": r["cover"], "auc": r["auc"]}
                                                                  for r in s["rows"]} for s in result.sets}}
    with progress.stage("evidence: pooled findings"):
        findings = {name: _dataset_findings(config, name, workdir, summaries) for name in config.datasets}
    for i, name in enumerate(config.datasets if config.convergence_checkpoints > 0 else ()):
        with progress.stage(f"evidence convergence {i + 1}/{len(config.datasets)}: {name} (ground truth at every "
                            "checkpoint)"):
            findings[name]["convergence"] = _convergence(config, name, workdir)
    results = {"settings": _settings(config),
               "provenance": provenance if provenance is not None else runtime.provenance(sys.argv),
               "runs": summaries, "findings": findings, "seconds": time.perf_counter() - start}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "evidence.json"), results)
    rows = evidence_rows(results)
    tables.write_csv(os.path.join(out_dir, "evidence.csv"), rows)
    tables.plot_paired(rows, os.path.join(out_dir, "evidence.png"),
                       f"{config.study.model}: paired differences against grad_dot (95% intervals)")
    return results


def _convergence(config: EvidenceConfig, name: str, workdir: str) -> list:
    """Per checkpoint of the first seed's run (`explanations.convergence`, the preset's epochs): step, training
    loss, and each method's Cover and mean per-query Spearman with the trajectory influence at that step."""
    from jaxinf.explanations import convergence

    study = dataclasses.replace(config.run_config(name, config.seeds[0]), damping=(float(config.dampings[0]),))
    result = convergence.run(convergence.ConvergenceConfig(
        study=study, epochs=None, checkpoints=config.convergence_checkpoints, methods=config.convergence_methods,
        ground_truth_queries=config.queries), os.path.join(workdir, f"{name}_convergence"))
    return [{"step": r["step"], "loss": r["optim"].get("loss"),
             "methods": {m: {"cover": e["cover"], "trajectory_spearman": e.get("ground_truth_spearman")}
                         for m, e in r["methods"].items()}} for r in result["checkpoints"]]


def _settings(config: EvidenceConfig) -> dict:
    d = dataclasses.asdict(config)
    d["study"] = config.study.to_dict()
    return d


def _pooled(kind: str, a: str, b: Optional[str], runs: list, n_boot: int, seed: int) -> Optional[dict]:
    """Pooled agreement of method a (minus that of b) over runs [(scores, truth, queries)]; None when a run
    lacks a or b."""
    if any(a not in s or (b is not None and b not in s) for s, _, _ in runs):
        return None
    if kind in gt_study.LDS_KINDS:
        strata = [(s[a][q], None if b is None else s[b][q], t["masks"], t["losses"][:, q]) for s, t, q in runs]
        out = agreement.pooled_paired_lds(strata, n_boot=n_boot, seed=seed)
    else:
        per_query = []
        for s, t, q in runs:
            sa, ref = gt_study._score_truth_rows(np.asarray(s[a], np.float64), t, q)
            d = row_spearman(sa, ref)
            if b is not None:
                d = d - row_spearman(gt_study._score_truth_rows(np.asarray(s[b], np.float64), t, q)[0], ref)
            per_query.append(d)
        out = dict(agreement._summary(np.concatenate(per_query), n_boot, seed), bootstrap="queries, pooled over runs")
    return {k: v for k, v in out.items() if k != "per_query"}


def _verdict(d: Optional[dict]) -> str:
    if d is None or not np.all(np.isfinite(d["ci"])):
        return "open (no interval)"
    lo, hi = d["ci"]
    return "better" if lo > 0 else "worse" if hi < 0 else "open"


def _dataset_findings(config: EvidenceConfig, name: str, workdir: str, summaries: dict) -> dict:
    """Per damping and ground truth: each method's pooled agreement, its paired differences and verdicts."""
    matrices = [pipeline.study_matrices(config.run_config(name, seed), os.path.join(workdir, f"{name}_s{seed}"))
                for seed in config.seeds]
    out = {"checks": _checks(matrices)}
    for damping in matrices[0]["scores"]:
        per_kind = {}
        for kind in KINDS:
            runs = [(m["scores"][damping], m["ground_truth"][kind], np.asarray(m["queries"][damping][kind]))
                    for m in matrices]
            methods = sorted(set.intersection(*[set(s) for s, _, _ in runs]), key=lambda x: (x.startswith("gt:"), x))
            table = {}
            for a in methods:
                entry = {"agreement": _pooled(kind, a, None, runs, config.bootstrap, config.study.seed)}
                for b in config.against:
                    if b != a:
                        d = _pooled(kind, a, b, runs, config.bootstrap, config.study.seed)
                        entry[f"vs_{b}"] = d
                        entry[f"verdict_vs_{b}"] = _verdict(d)
                table[a] = entry
            cover = {a: np.mean([summaries[f"{name}_s{s}"]["labels"][damping][a]["cover"] for s in config.seeds])
                     for a in methods if not a.startswith("gt:")}
            values = {a: table[a]["agreement"]["value"] for a in cover if table[a]["agreement"] is not None}
            labels = spearman(list(values.values()), [cover[a] for a in values]) if len(values) > 2 else float("nan")
            per_kind[kind] = {"methods": table, "queries_per_run": [len(q) for _, _, q in runs],
                              "spearman_with_cover_across_methods": labels}
        out[str(damping)] = per_kind
    return out


def _checks(matrices: list) -> dict:
    """How alike the masked replays and the real retrains rank the same subsets (mean over queries and runs of
    the per-query Spearman of their losses), and two retrain seeds."""
    masked, seeds = [], []
    for m in matrices:
        lds, rep = m["ground_truth"]["lds"], m["ground_truth"]["lds_masked"]
        if np.array_equal(lds["masks"], rep["masks"]):
            masked.extend(row_spearman(np.asarray(lds["losses"]).T, np.asarray(rep["losses"]).T).tolist())
        sl = np.asarray(lds.get("seed_losses", np.zeros((0,))))
        if sl.ndim == 3 and sl.shape[0] >= 2:
            seeds.extend(row_spearman(sl[0].T, sl[1].T).tolist())
    return {"masked_vs_retrain_spearman": float(np.nanmean(masked)) if masked else None,
            "retrain_seed_to_seed_spearman": float(np.nanmean(seeds)) if seeds else None}


def evidence_rows(results: dict) -> list:
    """evidence.csv: one row per dataset, damping, ground truth and method (numbers and verdicts)."""
    rows = []
    for name, per_damping in results["findings"].items():
        for damping, per_kind in per_damping.items():
            if damping in ("checks", "convergence"):
                continue
            for kind, facts in per_kind.items():
                for method, entry in facts["methods"].items():
                    a = entry["agreement"] or {"value": np.nan, "ci": [np.nan, np.nan], "n_queries": 0}
                    row = {"dataset": name, "damping": float(damping), "ground_truth": kind, "method": method,
                           "value": a["value"], "lo": a["ci"][0], "hi": a["ci"][1], "n_queries": a["n_queries"]}
                    for b in ("grad_dot", "exact"):
                        d = entry.get(f"vs_{b}")
                        row[f"vs_{b}"] = np.nan if d is None else d["value"]
                        row[f"vs_{b}_lo"], row[f"vs_{b}_hi"] = (np.nan, np.nan) if d is None else d["ci"]
                        row[f"verdict_vs_{b}"] = entry.get(f"verdict_vs_{b}", "")
                    rows.append(row)
    return rows
