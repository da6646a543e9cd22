"""The study as a library call: ``run_study(StudyConfig(...), workdir) -> StudyResult``.

    from jaxinf.pipeline import StudyConfig, DataConfig, run_study, load_results
    result = run_study(StudyConfig(model="tiny-llama", methods=("grad_dot", "exact")), "runs/tiny")
    result.table            # one dict of numbers per method (results.csv)
    result.results          # results.json, as a dict

Stages, each cached in the workdir so an interrupted run resumes (`prepare`): the LoRA fine-tuning
(finetune/), per-example gradients (grads_train.npz, grads_test.npz), the ground truths (groundtruth/), one score
matrix per method (scores/), then per damping value results.json, results.csv, metrics.png, ground_truth.json,
gt_agreement.png and report.html. The workdir's attribute_config.json records the settings its caches were made
with; a run with other settings is refused with one line naming them.

One curvature and one damping per result set: lambda is resolved once (relative f: global scope lambda =
f tr(C)/D of the whole curvature inverted; block scope lambda_l = f x the mean squared gradient entry of each
LoRA matrix) and every damped method uses that absolute value. Several damping values make one result set each
(in workdir/damping_<f>/), sharing fine-tuning, gradients and K-FAC factors. This module prints nothing; stages
report through `jaxinf.progress`, and `jaxinf.report.tables` formats the result for a terminal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from jaxinf import attribution, health, recipes, report, sharding, study, training
from jaxinf.evaluation import evaluate
from jaxinf.groundtruth import study as gt_study
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, load_model, target_shapes
from jaxinf.models.causal_lm import DecoderLM
from jaxinf.progress import Stage, log
from jaxinf.report import tables
from jaxinf.workdir import guard, write_npz

SETTINGS_FILE = "attribute_config.json"


# ----------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which rows and tokens: `source` a study folder, a .jsonl/.json/.csv file or a generator name. template,
    max_length, limit_train, limit_test: None = the preset's (a limit of 0 = all rows)."""

    source: str = "backdoor"
    test_data: Optional[str] = None
    test_fraction: Optional[float] = None
    allow_overlap: bool = False
    prompt_column: str = "prompts"
    response_column: str = "response"
    group_column: str = "variation"
    template: Optional[str] = None
    max_length: Optional[int] = None
    loss_on: str = "response"
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None

    def validate(self) -> "DataConfig":
        """Raise ValueError (one line: the field and the fix) for options no split could use; returns self."""
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction={self.test_fraction} must lie strictly between 0 and 1 (e.g. 0.2)")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be at least 2 tokens")
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = all rows)")
        return self

    def task(self, *, seed: int, template: str, max_length: int, limit_train: Optional[int],
             limit_test: Optional[int]) -> recipes.TaskConfig:
        """The TaskConfig of these options, the keyword arguments standing in for options left at None (a
        limit of 0 = all rows)."""
        return recipes.TaskConfig(
            source=self.source, template=self.template or template, max_length=self.max_length or max_length,
            loss_on=self.loss_on, limit_train=_limit(self.limit_train, limit_train),
            limit_test=_limit(self.limit_test, limit_test), seed=seed, prompt_column=self.prompt_column,
            response_column=self.response_column, group_column=self.group_column, test_data=self.test_data,
            test_fraction=self.test_fraction, allow_overlap=self.allow_overlap)


@dataclasses.dataclass(frozen=True)
class GroundTruthSettings:
    """Counterfactual ground truths (`jaxinf.groundtruth.study`): kinds, and their sizes. queries: test rows for
    trajectory / LOO / PBRF (0 = all); subsets, fraction, stratify: the LDS subsets; seeds: from-scratch retrains
    per subset (lds); loo_rows, pbrf_rows: 0 = all; pbrf_damping: relative to the empirical Fisher's mean
    eigenvalue; pbrf_tol: relative gradient norm a converged PBRF solve reaches; chunk: masked retrains vmapped at
    once; query_chunk: trajectory queries per adjoint pass (0 = all)."""

    kinds: tuple = ("trajectory", "lds")
    queries: int = 1
    subsets: int = 4
    fraction: float = 0.5
    seeds: int = 2
    stratify: bool = False
    loo_rows: int = 8
    pbrf_rows: int = 8
    pbrf_eps: float = 1e-2
    pbrf_damping: float = 0.1
    pbrf_iters: int = 50
    pbrf_tol: float = 1e-2
    chunk: int = 1
    query_chunk: int = 1


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """What the result keeps and shows: top_k rows per method and test row in results.json; report.html with
    `queries` test rows per group (0 = none), `k` rows per method, for `methods`; bootstrap resamples."""

    top_k: int = 10
    queries: int = 1
    k: int = 3
    methods: tuple = ("grad_dot", "tracin", "exact", "ekfac", "repsim")
    bootstrap: int = 1000


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split(",") if v)
    if isinstance(value, (int, float)):
        return (value,)
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The fine-tuned LoRA adapters (`jaxinf.models.lora`): rank r of A [d_in, r] and B [r, d_out]; alpha (the
    update is scaled by alpha / r); targets: the projections adapted in every layer, by the model's names (q_proj,
    k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; a comma string is split); dropout on the adapter input
    (None: the preset's lora_dropout)."""

    rank: int = 4
    alpha: float = 32.0
    targets: tuple = ("q_proj", "v_proj")
    dropout: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "targets", _as_tuple(self.targets))

    def validate(self) -> "LoraSettings":
        """Raise ValueError (one line: the field, its flag and the fix) for adapters no model could have."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r} (--lora_rank) must be an integer >= 1, e.g. 4")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha} (--lora_alpha) must be > 0 (the update is scaled by "
                             "alpha / rank), e.g. 32")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout} (--lora_dropout) must lie in [0, 1), or None for the "
                             "preset's")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets={list(self.targets)} (--lora_targets) must name distinct projections, "
                             "e.g. q_proj,v_proj")
        return self


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One study run. preset: a name in `study.PRESETS` or a `study.Preset` value (sizes, optimiser, solver budgets;
    `jaxinf.presets.quick(...)` builds one with changes). damping: relative values f (empty = the preset's; several
    = a sweep in one run). lora: the fine-tuned adapters (`LoraSettings`, `lora_config()`)."""

    model: str = DEFAULT_MODEL
    data: DataConfig = DataConfig()
    preset: Any = "quick"
    seed: int = 0
    epochs: Optional[float] = None
    dtype: str = "float32"
    methods: tuple = study.ALL_METHODS
    lissa_depth: Optional[int] = None
    repsim_pooling: str = "prompt_end"
    damping: tuple = ()
    damping_scope: str = "global"
    curvature: str = "fisher"
    mesh: Optional[str] = None
    remat: str = "none"
    lora: LoraSettings = LoraSettings()
    ground_truth: GroundTruthSettings = GroundTruthSettings()
    report: ReportConfig = ReportConfig()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        return _from_dict(cls, d, "StudyConfig")

    @property
    def sizes(self) -> study.Preset:
        """The preset's values (`study.Preset`), whether it was given by name or as a value."""
        return study.resolve_preset(self.preset)

    @property
    def preset_label(self) -> str:
        """The preset's name, or "custom" for a value that is none of `study.PRESETS`."""
        name = study.preset_name(self.preset)
        return name if isinstance(name, str) else "custom"

    def lora_config(self) -> LoraConfig:
        """The LoRA of every fine-tuning of this study (`lora`, dropout None = the preset's lora_dropout)."""
        lo = self.lora
        dropout = self.sizes.lora_dropout if lo.dropout is None else lo.dropout
        return LoraConfig(rank=lo.rank, alpha=lo.alpha, dropout=dropout, targets=lo.targets)

    def validate(self) -> "StudyConfig":
        """Raise ValueError (one line: the field and the fix) for a setting no stage could run; returns self."""
        study.resolve_preset(self.preset)
        unknown = [m for m in self.methods if m not in study.METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(study.METHODS)}")
        if any(not v >= 0 for v in self.damping) or len(set(self.damping)) != len(self.damping):
            raise ValueError(f"damping={','.join(map(str, self.damping))}: values must be >= 0 and distinct")
        if self.damping_scope not in study.DAMPING_SCOPES:
            raise ValueError(f"damping_scope={self.damping_scope!r}: choose from {list(study.DAMPING_SCOPES)}")
        if self.curvature not in study.CURVATURES:
            raise ValueError(f"curvature={self.curvature!r}: choose from {list(study.CURVATURES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: choose float32 or bfloat16")
        unknown = [k for k in self.ground_truth.kinds if k not in gt_study.KINDS]
        if unknown:
            raise ValueError(f"ground_truth: unknown {unknown}; choose from {list(gt_study.KINDS)}")
        if self.remat not in ("none", "layer", "dots"):
            raise ValueError(f"remat={self.remat!r}: choose none, layer or dots")
        self.data.validate()
        self.lora.validate()
        sharding.parse_mesh(self.mesh)
        return self


def _from_dict(cls, d: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(fields)}")
    out = {}
    for name, value in d.items():
        default = getattr(cls(), name)
        if cls is StudyConfig and name == "preset":
            value = value if isinstance(value, str) else study.resolve_preset(value)
        elif dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            value = tuple(value)
        out[name] = value
    return cls(**out)


# The study binary's flags (and `jaxinf.api.run_study`'s keywords) as config fields: one table for both.
FLAG_FIELDS = {
    "model": ("model",), "preset": ("preset",), "seed": ("seed",), "epochs": ("epochs",), "dtype": ("dtype",),
    "methods": ("methods",), "lissa_depth": ("lissa_depth",), "repsim_pooling": ("repsim_pooling",),
    "damping": ("damping",), "damping_scope": ("damping_scope",), "curvature": ("curvature",), "mesh": ("mesh",), "remat": ("remat",),
    **{f"lora_{k}": ("lora", k) for k in ("rank", "alpha", "targets", "dropout")},
    "data": ("data", "source"), **{k: ("data", k) for k in (
        "test_data", "test_fraction", "allow_overlap", "prompt_column", "response_column", "group_column",
        "template", "max_length", "loss_on", "limit_train", "limit_test")},
    "ground_truth": ("ground_truth", "kinds"), "gt_queries": ("ground_truth", "queries"),
    "gt_subsets": ("ground_truth", "subsets"), "gt_fraction": ("ground_truth", "fraction"),
    "gt_loo_rows": ("ground_truth", "loo_rows"), "gt_pbrf_rows": ("ground_truth", "pbrf_rows"),
    "gt_pbrf_eps": ("ground_truth", "pbrf_eps"), "gt_pbrf_damping": ("ground_truth", "pbrf_damping"),
    "gt_pbrf_iters": ("ground_truth", "pbrf_iters"), "gt_chunk": ("ground_truth", "chunk"),
    "gt_seeds": ("ground_truth", "seeds"), "gt_stratify": ("ground_truth", "stratify"),
    "gt_query_chunk": ("ground_truth", "query_chunk"), "gt_pbrf_tol": ("ground_truth", "pbrf_tol"),
    "top_k": ("report", "top_k"), "report_queries": ("report", "queries"), "report_k": ("report", "k"),
    "report_methods": ("report", "methods"), "bootstrap": ("report", "bootstrap"),
}


def config_from_flags(values: dict) -> StudyConfig:
    """A StudyConfig from flag-named values (`FLAG_FIELDS`; None = the field's default). Lists may be given as
    comma strings ("grad_dot,exact"); damping values are parsed as floats."""
    unknown = set(values) - set(FLAG_FIELDS)
    if unknown:
        raise ValueError(f"unknown study settings {sorted(unknown)}; known: {sorted(FLAG_FIELDS)}")
    nested: dict = {}
    for name, value in values.items():
        if value is None:
            continue
        path = FLAG_FIELDS[name]
        if name in ("methods", "ground_truth", "report_methods", "lora_targets"):
            value = _as_tuple(value)
        elif name == "damping":
            try:
                value = tuple(float(v) for v in _as_tuple(value))
            except ValueError:
                raise ValueError(f"damping={value}: every entry must be a number, e.g. damping=0.01,0.1") from None
        target = nested
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
    return StudyConfig.from_dict(nested)


def workdir_settings(config: StudyConfig) -> dict:
    """The settings that key a workdir's fine-tuning, gradients and unkeyed score caches (attribute_config.json).
    Data options, the dtype and the LoRA settings appear only away from their defaults, so older workdirs resume;
    damping, scope and curvature key the score caches instead."""
    d = config.data
    settings = {"model": config.model, "data": d.source, "preset": study.preset_name(config.preset), "seed": config.seed,
                "limit_train": d.limit_train, "limit_test": d.limit_test, "epochs": config.epochs,
                "loss_on": d.loss_on, "repsim_pooling": config.repsim_pooling, "lissa_depth": config.lissa_depth}
    settings.update(data_options(config))
    settings["dtype"] = None if config.dtype == "float32" else config.dtype
    settings.update(lora_options(config))
    return settings


def lora_options(config: StudyConfig) -> dict:
    """The fine-tuning's LoRA as flag names (lora_rank, lora_alpha, lora_dropout, lora_targets), each None where it
    equals the default's (dropout: the preset's), so workdirs made before these settings existed resume."""
    lora, default = config.lora_config(), dataclasses.replace(config, lora=LoraSettings()).lora_config()
    return {f"lora_{k}": None if v == getattr(default, k) else v for k, v in dataclasses.asdict(lora).items()}


DATA_OPTION_DEFAULTS = {k: getattr(DataConfig(), k) for k in (
    "test_data", "test_fraction", "prompt_column", "response_column", "group_column", "template", "max_length")}


def data_options(config: StudyConfig) -> dict:
    """The data options that differ from their defaults (what guards a fine-tuning's workdir)."""
    return {k: getattr(config.data, k) for k, v in DATA_OPTION_DEFAULTS.items() if getattr(config.data, k) != v}


def check_workdir(workdir: str, settings: dict) -> None:
    """Cached stages are only valid for the settings that made them: refuse a mismatch, else record them."""
    # a setting added since (absent from the file = its default, None) is no change
    guard(os.path.join(workdir, SETTINGS_FILE), settings, what="results", fix="use a new workdir",
          absent_is_none=True)


# ---------------------------------------------------------------------------------------------------- prepare
@dataclasses.dataclass
class Prepared:
    """A fine-tuned study workdir: model, task, adapters, training log and schedule, the methods' shared inputs."""

    config: StudyConfig
    model: Any
    task: Any  # recipes.Task
    adapters: Any
    log: list
    inputs: study.StudyInputs
    train_config: training.TrainConfig
    epochs: float
    mesh: Any = None

    @property
    def steps(self) -> int:
        return self.train_config.steps

    @property
    def batch_size(self) -> int:
        return self.train_config.batch_size


def _limit(value, preset_value):
    if value is None:
        return preset_value
    return None if value == 0 else value


def task_config(config: StudyConfig) -> recipes.TaskConfig:
    """The rows and tokens of a study: the data config with the preset's template, length and limits filled in."""
    preset = config.sizes
    return config.data.task(seed=config.seed, template=preset.template, max_length=preset.max_length,
                            limit_train=preset.limit_train, limit_test=preset.limit_test)


def load_study_model(config: StudyConfig, mesh=None):
    """The study's model in its dtype and remat policy; with a mesh, its frozen weights FSDP-sharded once."""
    model = load_model(config.model, seed=config.seed,
                       dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32)
    if config.remat != "none":
        model = dataclasses.replace(model, remat=config.remat)
    if mesh is not None:
        model = dataclasses.replace(model, params=sharding.shard_params(model.params, mesh))
    return model


def cached_gradients(fns, adapters, tokenized, path: str, chunk: int, *, desc: str = "gradients", mesh=None):
    """Per-example gradients as a stacked pytree, cached in `path` (.npz of flat rows [N, D]); `mesh`: see
    `jaxinf.sharding` (chunks split over its data axis)."""
    if os.path.exists(path):
        flat = np.load(path)["grads"]
    else:
        flat = np.asarray(attribution.per_example_gradients(fns, adapters, tokenized, chunk_size=chunk,
                                                            progress=desc, mesh=mesh))
        write_npz(path, grads=flat)
    return attribution.unflatten_rows(flat, adapters, stacked=False)


def study_epochs(config: StudyConfig, task) -> float:
    """config.epochs, else the preset's (its harmful-data epochs for a task with a "harmful" group)."""
    preset = config.sizes
    harmful = "harmful" in set(np.asarray(task.train.groups).tolist())
    return config.epochs or (preset.epochs_harmful if harmful and preset.epochs_harmful else preset.epochs)


def finetune(config: StudyConfig, model, task, workdir: str, *, epochs: Optional[float] = None,
             checkpoints: Optional[int] = None, mesh=None, run_config: Optional[dict] = None):
    """(adapters, training log, TrainConfig, LoraConfig) of the LoRA fine-tuning on `task.train`, cached and
    resumable in workdir/finetune (its run_config.json guards the settings).

    AdamW at the preset's learning rate, batches of min(preset batch, N) rows for `epochs` passes (default
    `study_epochs`), a checkpoint every steps // checkpoints steps (default preset.tracin_checkpoints): see
    `study.finetune_config`. `run_config`: more settings that key this fine-tuning (e.g. a data variant's name).
    Every experiment fine-tunes through this function.
    """
    preset = config.sizes
    epochs = study_epochs(config, task) if epochs is None else epochs
    lora = config.lora_config()
    train_config = study.finetune_config(preset, len(task.train_rows), epochs=epochs, checkpoints=checkpoints,
                                         seed=config.seed)
    adapters, train_log = recipes.finetune_lora(
        model, lora, task, train_config, os.path.join(workdir, "finetune"),
        run_config={"data": config.data.source, "preset": study.preset_name(config.preset),
                    "loss_on": config.data.loss_on, **data_options(config), **(run_config or {})}, mesh=mesh)
    return adapters, train_log, train_config, lora


def load_study_task(config: StudyConfig, model):
    """The study's rows and tokens for `model` (`task_config`), its split described on the progress log."""
    task = recipes.load_task(model, task_config(config))
    log(task.split_info["description"])
    return task


def prepare(config: StudyConfig, workdir: str, *, test_gradients: bool = True, model=None,
            epochs: Optional[float] = None, checkpoints: Optional[int] = None) -> Prepared:
    """Model, task, LoRA fine-tuning (`finetune`, cached in workdir/finetune), gradients (cached) and
    `StudyInputs`: the first stages of the study and of every experiment.

    `test_gradients=False` leaves `inputs.test_grads` None (the caller brings its own queries). `model`: an
    already loaded model. `epochs`, `checkpoints`: see `finetune`.
    """
    config.validate()
    preset = config.sizes
    mesh = sharding.parse_mesh(config.mesh)
    model = model or load_study_model(config, mesh)
    target_shapes(model, config.lora_config())  # unknown LoRA targets: the model's projections, before any file
    os.makedirs(workdir, exist_ok=True)
    check_workdir(workdir, workdir_settings(config))  # every cached stage below is keyed by these settings
    task = load_study_task(config, model)
    epochs = study_epochs(config, task) if epochs is None else epochs
    adapters, train_log, train_config, lora = finetune(config, model, task, workdir, epochs=epochs,
                                                       checkpoints=checkpoints, mesh=mesh)
    ft_dir = os.path.join(workdir, "finetune")
    fns = LMFunctions(model, lora)
    grads_train = cached_gradients(fns, adapters, task.train, os.path.join(workdir, "grads_train.npz"),
                                   preset.grad_chunk, desc="gradients (train)", mesh=mesh)
    grads_test = None
    if test_gradients:
        grads_test = cached_gradients(fns, adapters, task.test, os.path.join(workdir, "grads_test.npz"),
                                      preset.grad_chunk, desc="gradients (test)", mesh=mesh)
    inputs = study.StudyInputs(fns=fns, adapters=adapters, train=task.train, test=task.test, workdir=ft_dir,
                               preset=preset, train_grads=grads_train, test_grads=grads_test, seed=config.seed,
                               lissa_depth=config.lissa_depth, repsim_pooling=config.repsim_pooling,
                               damping=config.damping[0] if len(config.damping) == 1 else None,
                               damping_scope=config.damping_scope, curvature=config.curvature, mesh=mesh)
    return Prepared(config, model, task, adapters, train_log, inputs, train_config, epochs, mesh)


# ---------------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class StudyResult:
    """One study run. `sets`: per damping value (in run order), {"damping", "dir", "results" (results.json),
    "rows" (results.csv, numbers), "gt_rows", "gt_kinds", "gt_summary", "curvature", "damping_scope",
    "report"}; the properties read the first set (the only one unless damping is a sweep)."""

    workdir: str
    config: Optional[StudyConfig]
    title: str
    sets: list
    seconds: float = float("nan")

    @property
    def results(self) -> dict:
        return self.sets[0]["results"]

    @property
    def table(self) -> list:
        return self.sets[0]["rows"]

    @property
    def report(self) -> Optional[str]:
        return self.sets[0]["report"]

    @property
    def plots(self) -> list:
        d = self.sets[0]["dir"]
        return [os.path.join(d, p) for p in sorted(os.listdir(d)) if p.endswith(".png")]

    @property
    def top_rows(self) -> dict:
        """{method: [per test row {"top": [...], "bottom": [...]}]} (rows as {index, group, score})."""
        return {m: d["top_rows"] for m, d in self.results.get("methods", {}).items() if "top_rows" in d}


def load_results(workdir: str) -> StudyResult:
    """A finished study's result set in `workdir` (results.json, results.csv as numbers, ground_truth.json); its
    config is the StudyConfig that run_study ran (results.json "config"; None for results written before)."""
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    csv_path = os.path.join(workdir, "results.csv")
    rows = tables.read_csv(csv_path) if os.path.exists(csv_path) else []
    gt = {}
    if os.path.exists(os.path.join(workdir, "ground_truth.json")):
        with open(os.path.join(workdir, "ground_truth.json")) as f:
            gt = json.load(f)
    rep = os.path.join(workdir, "report.html")
    config = StudyConfig.from_dict(results["config"]) if "config" in results else None
    damping = results.get("damping", {})
    one = {"damping": damping.get("fraction"), "dir": workdir, "results": results, "rows": rows,
           "gt_rows": [], "gt_kinds": list(gt.get("ground_truths", {})), "gt_summary": gt.get("ground_truths", {}),
           "curvature": damping.get("curvature"), "damping_scope": damping.get("scope"),
           "report": rep if os.path.exists(rep) else None}
    return StudyResult(workdir, config, "", [one])


# ------------------------------------------------------------------------------------------------------- run
def run_study(config: StudyConfig, workdir: str) -> StudyResult:
    """The study end to end in `workdir`: prepare (fine-tune, gradients), ground truths, every method at every
    damping value, metrics against the group labels and the ground truths, results files and report.html."""
    start = time.perf_counter()
    config.validate()
    preset = config.sizes
    dampings = list(config.damping) or [float(preset.damping)]
    prepared = prepare(config, workdir)
    task, inputs, ft_dir = prepared.task, prepared.inputs, os.path.join(workdir, "finetune")
    final = prepared.log[-1] if prepared.log else {}
    n_train = len(task.train_rows)
    title = f"{prepared.model.name} on {os.path.basename(os.path.normpath(config.data.source))} " \
            f"({config.preset_label}: {n_train} train, {len(task.test_rows)} test)"
    run_info = {
        "model": prepared.model.name, "data": config.data.source, "preset": study.preset_name(config.preset), "seed": config.seed,
        "loss_on": config.data.loss_on, "repsim_pooling": config.repsim_pooling,
        "dtype": config.dtype, "mesh": sharding.describe(prepared.mesh),
        "n_train": n_train, "n_test": len(task.test_rows), "seq_len": int(task.train.input_ids.shape[1]),
        "group_counts": {g: int(c) for g, c in zip(*np.unique(task.train.groups, return_counts=True))},
        "train_groups": [str(g) for g in task.train.groups], "test_groups": [str(g) for g in task.test.groups],
        "finetune": {"steps": prepared.steps, "epochs": prepared.epochs, "batch_size": prepared.batch_size,
                     "final_loss": final.get("loss"), "final_grad_norm": final.get("grad_norm"),
                     "dist_from_init": final.get("dist_from_init"),
                     "health": health.read(ft_dir)},  # loss not falling, vanishing gradient, far from init
        "data_split": task.split_info,  # how train/test were split, sizes, duplicates kept by allow_overlap
        "config": config.to_dict(),  # the whole StudyConfig (`load_results(...).config`)
    }
    ground_truth = {}  # kind -> ground truth (jaxinf.groundtruth.study.compute) of this run only
    if config.ground_truth.kinds:
        ground_truth = ground_truths(config, prepared, workdir)
        run_info["ground_truth"] = gt_study.summary(ground_truth)
    log(f"{title}; fine-tune loss {final.get('loss', float('nan')):.3f} after {prepared.steps} steps")
    sets = []
    for value in dampings:  # one result set per damping value; fine-tuning, gradients and factors are shared
        result_dir = workdir if len(dampings) == 1 else os.path.join(workdir, f"damping_{value:g}")
        sets.append(_one_damping(config, dataclasses.replace(inputs, damping=value), task, workdir, result_dir,
                                 run_info, title, ground_truth))
    return StudyResult(workdir, config, title, sets, time.perf_counter() - start)


def study_matrices(config: StudyConfig, workdir: str) -> dict:
    """What a finished `run_study` holds, for analyses across runs: {"ground_truth": {kind: arrays},
    "scores": {damping: {method: [Q, N]}} (with the score ground truths as "gt:<kind>"), "queries": {damping:
    {kind: the table's test rows}}}. Everything comes from the workdir's caches (nothing is recomputed there)."""
    config.validate()
    prepared = prepare(config, workdir)
    truths = ground_truths(config, prepared, workdir) if config.ground_truth.kinds else {}
    n_test, n_train = len(prepared.task.test_rows), len(prepared.task.train_rows)
    scores, queries = {}, {}
    for value in list(config.damping) or [float(config.sizes.damping)]:
        inputs = dataclasses.replace(prepared.inputs, damping=value)
        found = {}
        for method in config.methods:
            path = os.path.join(workdir, "scores", f"{study.score_cache_key(method, inputs)}.npz")
            if os.path.exists(path):  # a method that failed has no scores
                found[method] = np.load(path)["scores"]
        found.update(_truths_as_methods(truths, n_test, n_train))
        scores[value] = found
        queries[value] = _table_queries(truths, found)[0] if truths else {}
    return {"ground_truth": truths, "scores": scores, "queries": queries}


def ground_truths(config: StudyConfig, prepared: Prepared, workdir: str) -> dict:
    """{kind: arrays} of config.ground_truth's kinds for the prepared fine-tuning run, cached in
    workdir/groundtruth (`groundtruth.study.compute`). The scanned trainer replays the run from its initial
    adapters (checkpoint 0), data order and keys; "lds" retrains each subset from scratch with `finetune`'s rule
    for that many rows (`study.finetune_config`) and `recipes.initial_adapters` of each seed."""
    gt = config.ground_truth
    # tr(F) / D, the empirical Fisher's mean eigenvalue (the study's rule at f = 1, cached with its inputs)
    mean_eig = dataclasses.replace(prepared.inputs, curvature="fisher", damping=1.0).global_lambda
    gt_config = gt_study.GroundTruthConfig(
        kinds=tuple(gt.kinds), max_queries=gt.queries or None, lds_subsets=gt.subsets, lds_fraction=gt.fraction,
        lds_seeds=gt.seeds, lds_stratify=gt.stratify, loo_rows=gt.loo_rows or None, pbrf_rows=gt.pbrf_rows or None,
        pbrf_eps=gt.pbrf_eps, pbrf_damping=gt.pbrf_damping * mean_eig, pbrf_iters=gt.pbrf_iters,
        pbrf_tol=gt.pbrf_tol, retrain_chunk=gt.chunk, query_chunk=gt.query_chunk or None, seed=config.seed)
    run = gt_study.replay(prepared.inputs.fns, prepared.adapters, recipes.batch_arrays(prepared.task.train),
                          prepared.train_config, os.path.join(workdir, "finetune"), prepared.mesh)
    preset, lora = config.sizes, prepared.inputs.fns.lora

    def config_for(n_rows, seed):  # the fine-tuning a user would run on n_rows rows (`finetune`'s rule)
        return study.finetune_config(preset, n_rows, epochs=prepared.epochs, seed=seed)

    def init_for(seed):
        return recipes.initial_adapters(prepared.model, lora, seed)

    return gt_study.compute(run, prepared.adapters, recipes.batch_arrays(prepared.task.test), gt_config,
                            os.path.join(workdir, "groundtruth"), groups=np.asarray(prepared.task.train.groups),
                            config_for=config_for, init_for=init_for)


def _scores_of(method, inputs, score_dir):
    """(scores, seconds, info) of one method, computed once and cached in score_dir. Methods that use the
    damping or the curvature are cached under a key naming them (study.score_cache_key)."""
    os.makedirs(score_dir, exist_ok=True)
    path = os.path.join(score_dir, f"{study.score_cache_key(method, inputs)}.npz")
    if not os.path.exists(path):
        scores, seconds, info = study.run_method_with_info(method, inputs)
        write_npz(path, scores=scores, seconds=seconds, info=json.dumps(info))
    saved = np.load(path)
    info = json.loads(str(saved["info"])) if "info" in saved else {}
    return saved["scores"], float(saved["seconds"]), info


def _method_record(config, method, scores, seconds, info, exact_scores, task):
    """(results.json entry, CSV/table row) of one method: metrics vs the group labels, agreement with `exact`,
    and the method's curvature, absolute damping and solver report (study.run_method_with_info)."""
    metrics = evaluate(scores, task.test.groups, task.train.groups, n_boot=config.report.bootstrap,
                       seed=config.seed)
    agreement = study.agreement_with_exact(scores, exact_scores)
    detail = dict(metrics, seconds=seconds, vs_exact=agreement, **info)
    row = {"method": method, "seconds": seconds, "spearman_vs_exact": agreement["spearman"],
           "direction_error_vs_exact": agreement["direction"], "curvature": info.get("curvature", ""),
           "lambda": study.lambda_summary(info.get("lambda")), "converged": info.get("converged", True)}
    for key in tables.METRICS:
        row[key] = metrics[key]["value"]
        row[f"{key}_lo"], row[f"{key}_hi"] = metrics[key]["ci"]
    return detail, row


def _ground_truth_columns(config, scores, detail, row, ground_truth, queries):
    """Agreement of one method's scores with every ground truth on the table's queries: results.json (with
    per-query values and the queries) and CSV (value, interval, number of queries)."""
    if not ground_truth:
        return
    agree = gt_study.agreement_with(scores, ground_truth, n_boot=config.report.bootstrap, seed=config.seed,
                                    queries=queries)
    detail["ground_truth"] = agree
    for kind, a in agree.items():
        row[f"gt_{kind}"], (row[f"gt_{kind}_lo"], row[f"gt_{kind}_hi"]) = a["value"], a["ci"]
        row[f"gt_{kind}_n"] = a["n_queries"]


def _truths_as_methods(ground_truth, n_test, n_train) -> dict:
    """{"gt:<kind>": [Q, N] scores (NaN outside its queries and rows)} of the score ground truths."""
    out = {}
    for kind, t in ground_truth.items():
        s = gt_study.as_method_scores(kind, t, n_test, n_train)
        if s is not None:
            out[f"gt:{kind}"] = s
    return out


def _table_queries(ground_truth, matrices: dict) -> tuple[dict, dict]:
    """({kind: the test rows every row of its agreement table is scored on}, {kind: rows left out}).

    A ground truth scored as a method enters the LDS tables only when it covers every training row (a LOO or
    PBRF on some rows cannot predict a subset's outcome); it then restricts them to its queries, so every row of
    one table, methods and ground truths, is computed on the same queries."""
    queries, left_out = {}, {}
    for kind, t in ground_truth.items():
        use = {}
        for name, s in matrices.items():
            if kind in gt_study.LDS_KINDS and name.startswith("gt:") and not np.isfinite(s).all(axis=1).any():
                left_out.setdefault(kind, []).append(name)
                continue
            use[name] = s
        queries[kind] = gt_study.common_queries(kind, t, list(use.values()))
    return queries, left_out


def _ground_truth_tables(config, rows, details, all_scores, task, result_dir, title, ground_truth) -> tuple:
    """Every method's and every score ground truth's agreement with each ground truth, on one set of queries per
    ground truth, and the paired differences against grad_dot and exact; ground_truth.json and gt_agreement.png.
    Returns (the method rows plus the gt: rows, the paired entry of results.json, {kind: queries})."""
    if not ground_truth:
        return [], {}, {}
    n_test, n_train = len(task.test_rows), len(task.train_rows)
    truths = _truths_as_methods(ground_truth, n_test, n_train)
    matrices = dict(all_scores, **truths)
    queries, left_out = _table_queries(ground_truth, matrices)
    for row in rows:
        _ground_truth_columns(config, all_scores[row["method"]], details[row["method"]], row, ground_truth, queries)
    gt_rows = [dict(r) for r in rows]
    for name, s in truths.items():
        row = {"method": name}
        if name == "gt:pbrf":  # an unconverged PBRF is flagged like a non-converged CG
            row["converged"] = gt_study.pbrf_converged(ground_truth["pbrf"])
        usable = {k: q for k, q in queries.items() if name not in left_out.get(k, [])}
        _ground_truth_columns(config, s, {}, row, {k: ground_truth[k] for k in usable}, usable)
        gt_rows.append(row)
    paired = gt_study.paired(matrices, ground_truth, queries, n_boot=config.report.bootstrap, seed=config.seed)
    kinds = list(ground_truth)
    tables.plot_agreement(gt_rows, kinds, os.path.join(result_dir, "gt_agreement.png"), title)
    recipes.write_json(os.path.join(result_dir, "ground_truth.json"), {
        "ground_truths": gt_study.summary(ground_truth),
        "queries": {k: [int(i) for i in q] for k, q in queries.items()},
        "left_out": left_out,
        "agreement": {r["method"]: {k: [r.get(f"gt_{k}"), r.get(f"gt_{k}_lo"), r.get(f"gt_{k}_hi")] for k in kinds}
                      for r in gt_rows},
        "paired": paired})
    return gt_rows, paired, queries


def _one_damping(config, inputs, task, workdir, result_dir, run_info, title, ground_truth) -> dict:
    """Every method at one damping value: scores (cached), metrics, results.json / results.csv / metrics.png /
    ground_truth.json / gt_agreement.png / report.html in result_dir. A method that fails is reported in
    results.json (its error) and the others go on."""
    os.makedirs(result_dir, exist_ok=True)
    score_dir = os.path.join(workdir, "scores")
    rows, details, all_scores = [], {}, {}
    exact_scores = None
    for i, method in enumerate(config.methods):
        clock = Stage(f"method {i + 1}/{len(config.methods)} {method} (damping {inputs.damping:g})")
        try:
            scores, seconds, info = _scores_of(method, inputs, score_dir)
            if exact_scores is None:
                exact_scores = _scores_of("exact", inputs, score_dir)[0]
        except Exception as err:  # report the failure in the table and go on with the other methods
            clock.close(note="failed")
            log(f"method {method} failed: {err}")
            details[method] = {"error": f"{type(err).__name__}: {err}"}
            continue
        clock.close()
        detail, row = _method_record(config, method, scores, seconds, info, exact_scores, task)
        detail["top_rows"] = report.top_rows_table(scores, task.train.groups, config.report.top_k, seed=config.seed)
        all_scores[method] = scores
        details[method] = detail
        rows.append(row)

    gt_rows, paired, gt_queries = _ground_truth_tables(config, rows, details, all_scores, task, result_dir, title,
                                                       ground_truth)
    results = dict(run_info, damping=study.damping_report(inputs), methods=details)
    if ground_truth:
        results["ground_truth_queries"] = {k: [int(i) for i in q] for k, q in gt_queries.items()}
        results["paired"] = paired
    recipes.write_json(os.path.join(result_dir, "results.json"), results)
    results = json.loads(json.dumps(results, default=float))  # what results.json holds (lists, floats)
    tables.write_csv(os.path.join(result_dir, "results.csv"), rows)
    if rows:
        tables.plot_metrics(rows, os.path.join(result_dir, "metrics.png"),
                            f"{title}, {inputs.curvature}, damping {inputs.damping:g} ({inputs.damping_scope})")
    return {"damping": inputs.damping, "dir": result_dir, "results": results, "rows": rows, "gt_rows": gt_rows,
            "gt_kinds": list(ground_truth), "gt_summary": gt_study.summary(ground_truth) if ground_truth else {},
            "curvature": inputs.curvature, "damping_scope": inputs.damping_scope,
            "report": _report(config, inputs, task, all_scores, result_dir, title)}


def _report(config, inputs, task, all_scores, result_dir, title):
    """report.html: the first `report.queries` test rows of each group, top/bottom `report.k` rows per method with
    per-token contributions (jaxinf.report), from the scores this run computed; its path (None: disabled)."""
    rc = config.report
    all_scores = {m: all_scores[m] for m in rc.methods if m in all_scores}
    if rc.queries <= 0 or not all_scores:
        return None
    groups = [str(g) for g in task.test.groups]
    queries = sorted(i for g in sorted(set(groups)) for i in [j for j, h in enumerate(groups) if h == g][
        :rc.queries])
    explanations = report.explain(list(all_scores), inputs, tokenizer=inputs.fns.model.tokenizer,
                                  train_rows=task.train_rows, test_rows=task.test_rows, k=rc.k,
                                  queries=queries, scores=all_scores, seed=config.seed)
    path = os.path.join(result_dir, "report.html")
    report.write_report(path, explanations, meta=[
        f"{title}; {inputs.curvature}, damping {inputs.damping:g} ({inputs.damping_scope})",
        f"test rows {queries} ({rc.queries} per group); top and bottom {rc.k} training rows "
        "per method; results.json keeps the top/bottom --top_k of every test row"])
    log(f"report: {path}")
    return path
