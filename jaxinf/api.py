"""Python entry point for notebooks: the study and the query explainer as calls that return results objects.

    from jaxinf import api
    study = api.run_study(workdir="runs/attribute", model="tiny-llama", methods="grad_dot,exact,ekfac")
    study.table                     # one dict per method: Acc, Cover, AUC, Spearman vs exact, seconds
    study.top_rows["exact"][0]      # test row 0: its top-k / bottom-k training rows with scores
    ex = api.explain("runs/attribute", [{"prompt": "...", "response": "..."}], methods=["exact"])
    ex.explanations[0]["methods"]["exact"]["top"]   # rows with text, tokens and per-token scores
    ex.report                       # path of report.html

`run_study` runs the study binary's own `main` in this process (same stages, same caches, same outputs);
`explain` is what `experiments/explain.py` runs. Both resume from what the workdir already holds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxinf import attribution, recipes, report, study, training
from jaxinf.models import LMFunctions, LoraConfig, load_model
from jaxinf.progress import log, stage

SETTINGS = "attribute_config.json"
# settings of a study workdir and their defaults (a key absent from an older attribute_config.json = its default)
# the data options (which rows, which tokens) are kept only when set away from these defaults, as the binary does
DATA_OPTIONS = {"test_data": None, "test_fraction": None, "prompt_column": "prompts", "response_column": "response",
                "group_column": "variation", "template": None, "max_length": None}
DEFAULT_SETTINGS = {"model": "smollm2-135m-instruct", "data": "backdoor", "preset": "quick", "seed": 0,
                    "limit_train": None, "limit_test": None, "epochs": None, "loss_on": "response",
                    "repsim_pooling": "prompt_end", "lissa_depth": None, "dtype": None, **DATA_OPTIONS}

# how the methods run, not what they run on: may differ between calls on one workdir (None = the study's default)
STUDY_OPTIONS = ("damping", "damping_scope", "curvature")


def model_dtype(settings: dict):
    """The study model's dtype: settings["dtype"] ("bfloat16"; None = float32, the study binary's --dtype)."""
    return jnp.bfloat16 if settings.get("dtype") == "bfloat16" else jnp.float32


def data_options(settings: dict) -> dict:
    """The data options of `settings` that differ from their defaults (what guards a fine-tuning's workdir)."""
    return {k: settings[k] for k in DATA_OPTIONS if settings.get(k, DATA_OPTIONS[k]) != DATA_OPTIONS[k]}


def template_and_length(settings: dict) -> tuple:
    """(template, max_length) of a study: the settings' when set (--template / --max_length), else the preset's."""
    preset = study.PRESETS[settings["preset"]]
    return settings.get("template") or preset.template, settings.get("max_length") or preset.max_length


def _limit(value, preset_value):
    if value is None:
        return preset_value
    return None if value == 0 else value


def cached_gradients(fns, adapters, tokenized, path: str, chunk: int, *, desc: str = "gradients", mesh=None):
    """Per-example gradients as a stacked pytree, cached in `path` (.npz of flat rows [N, D]); `mesh`: see
    `jaxinf.sharding` (chunks split over its data axis)."""
    if os.path.exists(path):
        flat = np.load(path)["grads"]
    else:
        flat = np.asarray(attribution.per_example_gradients(fns, adapters, tokenized, chunk_size=chunk,
                                                            progress=desc, mesh=mesh))
        tmp = path + ".tmp.npz"
        np.savez(tmp, grads=flat)
        os.replace(tmp, path)
    return attribution.unflatten_rows(flat, adapters, stacked=False)


@dataclasses.dataclass
class Prepared:
    """A fine-tuned study workdir loaded back: model, task, adapters, log, and the methods' shared inputs."""

    settings: dict
    model: Any
    task: Any  # recipes.Task
    adapters: Any
    log: list
    inputs: study.StudyInputs
    steps: int
    epochs: float
    batch_size: int


def prepare(settings: dict, workdir: str, *, test_gradients: bool = True, model=None) -> Prepared:
    """Model, task, LoRA fine-tuning (cached in workdir/finetune), gradients (cached) and `StudyInputs`.

    `settings`: the study's settings (keys of DEFAULT_SETTINGS). `test_gradients=False` leaves
    `inputs.test_grads` None (the caller brings its own queries). `model`: an already loaded model.
    """
    settings = dict(DEFAULT_SETTINGS, **settings)
    preset = study.PRESETS[settings["preset"]]
    model = model or load_model(settings["model"], seed=settings["seed"], dtype=model_dtype(settings))
    template, max_length = template_and_length(settings)
    task = recipes.load_task(model, recipes.TaskConfig(
        source=settings["data"], template=template, max_length=max_length, loss_on=settings["loss_on"],
        limit_train=_limit(settings["limit_train"], preset.limit_train),
        limit_test=_limit(settings["limit_test"], preset.limit_test), seed=settings["seed"],
        prompt_column=settings["prompt_column"], response_column=settings["response_column"],
        group_column=settings["group_column"], test_data=settings["test_data"],
        test_fraction=settings["test_fraction"]))
    harmful = "harmful" in set(task.train.groups.tolist())
    epochs = settings["epochs"] or (preset.epochs_harmful if harmful and preset.epochs_harmful else preset.epochs)
    lora = LoraConfig(dropout=preset.lora_dropout)
    n_train = len(task.train_rows)
    batch_size = min(preset.batch_size, n_train)  # steps count the batches actually drawn
    steps = max(1, int(np.ceil(epochs * n_train / batch_size)))
    train_config = training.TrainConfig(
        steps=steps, batch_size=batch_size, lr=preset.lr,
        checkpoint_every=max(1, steps // preset.tracin_checkpoints), seed=settings["seed"])
    ft_dir = os.path.join(workdir, "finetune")
    adapters, train_log = recipes.finetune_lora(
        model, lora, task, train_config, ft_dir,
        run_config={"data": settings["data"], "preset": settings["preset"], "loss_on": settings["loss_on"],
                    **data_options(settings)})
    fns = LMFunctions(model, lora)
    grads_train = cached_gradients(fns, adapters, task.train, os.path.join(workdir, "grads_train.npz"),
                                   preset.grad_chunk, desc="gradients (train)")
    grads_test = None
    if test_gradients:
        grads_test = cached_gradients(fns, adapters, task.test, os.path.join(workdir, "grads_test.npz"),
                                      preset.grad_chunk, desc="gradients (test)")
    options = {k: settings[k] for k in STUDY_OPTIONS if settings.get(k) is not None}
    inputs = study.StudyInputs(fns=fns, adapters=adapters, train=task.train, test=task.test, workdir=ft_dir,
                               preset=preset, train_grads=grads_train, test_grads=grads_test, seed=settings["seed"],
                               lissa_depth=settings["lissa_depth"], repsim_pooling=settings["repsim_pooling"],
                               **options)
    return Prepared(settings, model, task, adapters, train_log, inputs, steps, epochs, batch_size)


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

    template, max_length = template_and_length(dict(DEFAULT_SETTINGS, **settings))
    rows = [{"prompt": q["prompt"], "response": q["response"], "group": q.get("group", "query")} for q in queries]
    return rows, tokenize_rows(model.tokenizer, rows, max_length=min(max_length, model.max_length),
                               template=template, loss_on="response")


def complete(prepared: Prepared, prompt: str, max_new_tokens: int = 48) -> str:
    """The fine-tuned model's greedy completion of `prompt` under the study's template."""
    from jaxinf.data.templates import format_prompt
    from jaxinf.models.generate import greedy_generate

    template, _ = template_and_length(prepared.settings)
    text = format_prompt(prepared.model.tokenizer, prompt, template)
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
    os.makedirs(workdir, exist_ok=True)
    if not os.path.exists(os.path.join(workdir, SETTINGS)):
        recipes.write_json(os.path.join(workdir, SETTINGS), settings)
    with stage("load model and data"):
        model = load_model(settings["model"], seed=settings["seed"], dtype=model_dtype(settings))
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
@dataclasses.dataclass
class StudyResults:
    """A study workdir's outputs: results.json as `results`, results.csv as `table`, top rows, file paths."""

    workdir: str
    results: dict
    table: list
    plots: list
    report: Optional[str]

    @property
    def top_rows(self) -> dict:
        """{method: [per test row {"top": [...], "bottom": [...]}]} (rows as {index, group, score})."""
        return {m: d["top_rows"] for m, d in self.results.get("methods", {}).items() if "top_rows" in d}


def load_results(workdir: str) -> StudyResults:
    """The outputs of a finished study run in `workdir`."""
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    table = []
    if os.path.exists(os.path.join(workdir, "results.csv")):
        with open(os.path.join(workdir, "results.csv")) as f:
            table = list(csv.DictReader(f))
    plots = [os.path.join(workdir, p) for p in sorted(os.listdir(workdir)) if p.endswith(".png")]
    rep = os.path.join(workdir, "report.html")
    return StudyResults(workdir, results, table, plots, rep if os.path.exists(rep) else None)


def run_study(workdir: str = "runs/attribute", **flags) -> StudyResults:
    """Run the study binary (`experiments.attribute`) in this process with these flags; return its outputs.

    Flags are the binary's (`python -m experiments.attribute --helpfull`), e.g. model="tiny-llama",
    methods="grad_dot,exact", limit_train=24. The workdir's caches make a second call return at once.
    """
    from absl import flags as absl_flags

    from experiments import attribute

    fl = absl_flags.FLAGS
    argv = ["attribute", f"--workdir={workdir}"]
    for name, value in flags.items():
        if name not in fl:
            raise ValueError(f"unknown study flag {name!r}; see python -m experiments.attribute --helpfull")
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv.append(f"--{name}={value}")
    fl.unparse_flags()
    fl(argv)
    attribute.main([])
    return load_results(workdir)
