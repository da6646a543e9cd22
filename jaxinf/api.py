"""Python entry point for notebooks: the study and the query explainer as calls that return results objects.

    from jaxinf import api
    study = api.run_study(workdir="runs/attribute", model="tiny-llama", methods="grad_dot,exact,ekfac")
    study.table                     # one dict per method: Acc, Cover, AUC, Spearman vs exact, seconds
    study.top_rows["exact"][0]      # test row 0: its top-k / bottom-k training rows with scores
    ex = api.explain("runs/attribute", [{"prompt": "...", "response": "..."}], methods=["exact"])
    ex.explanations[0]["methods"]["exact"]["top"]   # rows with text, tokens and per-token scores
    ex.report                       # path of report.html

`run_study` is `jaxinf.pipeline.run_study` (what `experiments/attribute.py` runs) with the binary's flag names
as keywords; `explain` is what `experiments/explain.py` runs. Both resume from what the workdir already holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from jaxinf import attribution, pipeline, recipes, report, study
from jaxinf.progress import log, stage

SETTINGS = pipeline.SETTINGS_FILE
# the settings of a study workdir (attribute_config.json) and their defaults; a key absent from an older file = its
# default. The data options (which rows, which tokens) are kept only when set away from these defaults.
DATA_OPTIONS = dict(pipeline.DATA_OPTION_DEFAULTS)
DEFAULT_SETTINGS = dict(pipeline.workdir_settings(pipeline.StudyConfig()), **DATA_OPTIONS)

# how the methods run, not what they run on: may differ between calls on one workdir (None = the study's default)
STUDY_OPTIONS = ("damping", "damping_scope", "curvature")

Prepared = pipeline.Prepared
StudyResult = pipeline.StudyResult
cached_gradients = pipeline.cached_gradients
load_results = pipeline.load_results


def config_of(settings: dict) -> pipeline.StudyConfig:
    """The StudyConfig of a workdir's flat settings (attribute_config.json keys, plus STUDY_OPTIONS)."""
    return pipeline.config_from_flags({k: v for k, v in settings.items() if k in pipeline.FLAG_FIELDS})


def prepare(settings: dict, workdir: str, *, test_gradients: bool = True, model=None) -> pipeline.Prepared:
    """`jaxinf.pipeline.prepare` for a workdir's flat settings (keys of DEFAULT_SETTINGS and STUDY_OPTIONS)."""
    return pipeline.prepare(config_of(dict(DEFAULT_SETTINGS, **settings)), workdir,
                            test_gradients=test_gradients, model=model)


def read_settings(workdir: str) -> dict:
    """The settings a study workdir was made with (its attribute_config.json), defaults filled in."""
    path = os.path.join(workdir, SETTINGS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a study workdir; run "
                                f"`python -m experiments.attribute --workdir={workdir}` first (or pass --model/--data)")
    with open(path) as f:
        return dict(DEFAULT_SETTINGS, **{k: v for k, v in json.load(f).items() if k in DEFAULT_SETTINGS})


# ----------------------------------------------------------------------------------------------- explain
def tokenize_queries(model, queries: Sequence[dict], settings: dict):
    """Query rows ({"prompt", "response"[, "group"]}) tokenised like the study's rows (template, length, mask)."""
    from jaxinf.data import tokenize_rows

    task = pipeline.task_config(config_of(dict(DEFAULT_SETTINGS, **settings)))
    template, max_length = task.template, task.max_length
    rows = [{"prompt": q["prompt"], "response": q["response"], "group": q.get("group", "query")} for q in queries]
    return rows, tokenize_rows(model.tokenizer, rows, max_length=min(max_length, model.max_length),
                               template=template, loss_on="response")


def complete(prepared: pipeline.Prepared, prompt: str, max_new_tokens: int = 48) -> str:
    """The fine-tuned model's greedy completion of `prompt` under the study's template."""
    from jaxinf.data.templates import format_prompt
    from jaxinf.models.generate import greedy_generate

    text = format_prompt(prepared.model.tokenizer, prompt, pipeline.task_config(prepared.config).template)
    return greedy_generate(prepared.inputs.fns, prepared.adapters, text, max_new_tokens=max_new_tokens, chat=False)


@dataclasses.dataclass
class Explanation:
    """What `explain` returns: one dict per query (see `jaxinf.report.explain`), and the files written."""

    explanations: list
    report: Optional[str]
    json_path: Optional[str]

    def table(self, method: str, which: str = "top") -> list[list[dict]]:
        """Per query, the `which` ("top" / "bottom") rows of `method` as {index, group, score, prompt, response}."""
        keys = ("index", "group", "score", "prompt", "response")
        return [[{k: r[k] for k in keys} for r in ex["methods"][method][which]] for ex in self.explanations]


def explain(workdir: str, queries: Sequence[dict], *, methods: Sequence[str] = ("grad_dot", "exact", "ekfac"),
            k: int = 5, out_dir: Optional[str] = None, settings: Optional[dict] = None,
            per_token: bool = True, **options) -> Explanation:
    """Top-k / bottom-k training rows of each query for each method, per-token contributions, report.html.

    `queries`: dicts with "prompt" and "response" ("response": None = the fine-tuned model's greedy
    completion). `settings`: the study's settings (default: the workdir's attribute_config.json; a new workdir
    is fine-tuned first). `options`: damping / damping_scope / curvature of the methods (default: the study's).
    Writes `out_dir` (default workdir/explain)/report.html and explanations.json.
    """
    start = time.perf_counter()
    unknown = [m for m in methods if m not in study.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(study.METHODS)}")
    if not queries:
        raise ValueError("no queries: pass at least one {'prompt': ..., 'response': ...}")
    settings = read_settings(workdir) if settings is None else dict(DEFAULT_SETTINGS, **settings)
    with stage("load model and data"):
        model = pipeline.load_study_model(config_of(settings))
    queries = [dict(q) for q in queries]
    unknown = set(options) - set(STUDY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; explain takes {STUDY_OPTIONS}")
    prepared = prepare(dict(settings, **options), workdir, test_gradients=False, model=model)
    for q in queries:
        if q.get("response") is None:
            with stage("greedy completion"):
                q["response"] = complete(prepared, q["prompt"])
            log(f"completion of {q['prompt']!r}: {q['response']!r}")
    rows, tokenized = tokenize_queries(model, queries, settings)
    grads = attribution.per_example_gradients(prepared.inputs.fns, prepared.adapters, tokenized,
                                              chunk_size=max(1, len(rows)), progress="gradients (queries)")
    inputs = dataclasses.replace(prepared.inputs, test=tokenized,
                                 test_grads=attribution.unflatten_rows(np.asarray(grads), prepared.adapters,
                                                                       stacked=False))
    explanations = report.explain(list(methods), inputs, tokenizer=model.tokenizer,
                                  train_rows=prepared.task.train_rows, test_rows=rows, k=k, per_token=per_token)
    out_dir = out_dir or os.path.join(workdir, "explain")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "explanations.json")
    recipes.write_json(json_path, {"workdir": workdir, "settings": settings, "methods": list(methods), "k": k,
                                   "explanations": explanations})
    meta = [f"{settings['model']} LoRA-fine-tuned on {settings['data']} ({settings['preset']} preset, "
            f"{len(prepared.task.train_rows)} training rows), workdir {workdir}",
            f"methods: {', '.join(methods)}; top {k} and bottom {k} rows per method"]
    path = report.write_report(os.path.join(out_dir, "report.html"), explanations, meta=meta)
    log(f"explain: {len(queries)} queries x {len(methods)} methods in {time.perf_counter() - start:.1f} s; "
        f"report: {path}")
    return Explanation(explanations, path, json_path)


# ----------------------------------------------------------------------------------------------- study
def run_study(workdir: str = "runs/attribute", **settings) -> pipeline.StudyResult:
    """`jaxinf.pipeline.run_study` with the study binary's flag names as keywords (`pipeline.FLAG_FIELDS`), e.g.
    model="tiny-llama", methods="grad_dot,exact", limit_train=24. The workdir's caches make a second call return
    at once. The result's table holds numbers."""
    return pipeline.run_study(pipeline.config_from_flags(settings).validate(), workdir)
