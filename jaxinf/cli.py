"""Command-line plumbing the binaries share: the data flags, and user mistakes as one-line UsageErrors.

Every binary that loads data does

    from jaxinf import cli
    cli.define_data_flags()                      # at import, next to its other flags
    ...
    def main(argv):
        with cli.user_errors():                  # ValueError / FileNotFoundError -> app.UsageError, one line
            model = load_model(...)
            task = cli.load_task(model, cli.task_config_from_flags(seed=FLAGS.seed))

``define_data_flags`` defines --data, --test_data, --test_fraction, --allow_overlap, --prompt_column,
--response_column, --group_column, --template, --max_length, --loss_on, --limit_train, --limit_test (a flag
the binary already defined is left alone). Flags left at None take the binary's defaults passed to
``task_config_from_flags`` (e.g. a preset's template). A limit of 0 means all rows.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from absl import app, flags

from jaxinf import recipes
from jaxinf.data import TEMPLATES
from jaxinf.data.tokenize import LOSS_ON

DATA_FLAGS = ("data", "test_data", "test_fraction", "allow_overlap", "prompt_column", "response_column",
              "group_column", "template", "max_length", "loss_on", "limit_train", "limit_test")


def define_data_flags(flag_values: flags.FlagValues = flags.FLAGS, *, data: str = "backdoor") -> None:
    """Define the data flags (see the module doc) on ``flag_values``; ``data`` is --data's default."""
    defs = {
        "data": lambda: flags.DEFINE_string(
            "data", data, "rows: a study folder (../shared/paper_datasets/<name>), a .jsonl/.json/.csv file, or a "
            "generator (backdoor, backdoor3, classes, harmful)", flag_values=flag_values),
        "test_data": lambda: flags.DEFINE_string(
            "test_data", None, "a second file of test rows, when --data is one file without a 'split' column",
            flag_values=flag_values),
        "test_fraction": lambda: flags.DEFINE_float(
            "test_fraction", None, "or hold out this fraction of --data for test (stratified by group, seeded "
            "by --seed), when --data is one file without a 'split' column", flag_values=flag_values),
        "allow_overlap": lambda: flags.DEFINE_bool(
            "allow_overlap", False, "keep test rows whose prompt and response equal a training row's (else an "
            "error); the count goes in results.json", flag_values=flag_values),
        "prompt_column": lambda: flags.DEFINE_string(
            "prompt_column", "prompts", "column holding the prompt", flag_values=flag_values),
        "response_column": lambda: flags.DEFINE_string(
            "response_column", "response", "column holding the response", flag_values=flag_values),
        "group_column": lambda: flags.DEFINE_string(
            "group_column", "variation", "column holding the ground-truth group (a test row's influential "
            "training rows are those of its group)", flag_values=flag_values),
        "template": lambda: flags.DEFINE_enum(
            "template", None, list(TEMPLATES), "prompt template (default: the binary's / preset's)",
            flag_values=flag_values),
        "max_length": lambda: flags.DEFINE_integer(
            "max_length", None, "truncate rows to this many tokens (default: the binary's / preset's)",
            flag_values=flag_values),
        "loss_on": lambda: flags.DEFINE_enum(
            "loss_on", "response", list(LOSS_ON), "tokens in the loss and gradients: the response (default), all "
            "real tokens, or also padding (the study's released code)", flag_values=flag_values),
        "limit_train": lambda: flags.DEFINE_integer(
            "limit_train", None, "stratified subsample of the training rows (0 = all; default: the binary's / "
            "preset's)", flag_values=flag_values),
        "limit_test": lambda: flags.DEFINE_integer(
            "limit_test", None, "stratified subsample of the test rows (0 = all; default: the binary's / "
            "preset's)", flag_values=flag_values),
    }
    for name in DATA_FLAGS:
        if name not in flag_values:
            defs[name]()


def task_config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, *, seed: int = 0,
                           template: str = "chat", max_length: int = 128, limit_train: Optional[int] = None,
                           limit_test: Optional[int] = None) -> recipes.TaskConfig:
    """A TaskConfig from the data flags (`jaxinf.pipeline.DataConfig`, its checks); keyword arguments are the
    defaults of flags left at None."""
    from jaxinf.pipeline import DataConfig

    f = flag_values
    data = DataConfig(source=f.data, **{k: f[k].value for k in DATA_FLAGS if k != "data"})
    with user_errors():
        data.validate()
    return data.task(seed=seed, template=template, max_length=max_length, limit_train=limit_train,
                     limit_test=limit_test)


def data_settings(config: recipes.TaskConfig) -> dict:
    """The TaskConfig fields that differ from their defaults and change which rows or tokens a run sees, as a
    JSON-ready dict: merge it into the settings that guard a workdir (run_config / attribute_config). Only
    non-default values appear, so workdirs made before these options existed still resume."""
    default = recipes.TaskConfig()
    keep = ("prompt_column", "response_column", "group_column", "test_data", "test_fraction")
    return {k: getattr(config, k) for k in keep if getattr(config, k) != getattr(default, k)}


def one_line(err: BaseException) -> str:
    """The error's message on one line (newlines folded)."""
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors():
    """Turn the library's ValueError / FileNotFoundError (bad user input: data, flags, a workdir made with
    other settings) and FloatingPointError (training diverged: step and last good checkpoint named) into ``absl.app.UsageError`` with a one-line message, so a binary prints that line instead
    of a traceback. Nothing is deleted: a stage's outputs are only written whole (atomic renames)."""
    try:
        yield
    except app.UsageError:
        raise
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        raise app.UsageError(one_line(err)) from None


def load_task(model, config: recipes.TaskConfig) -> recipes.Task:
    """``recipes.load_task`` with user mistakes as one-line UsageErrors, and one log line saying which split."""
    with user_errors():
        task = recipes.load_task(model, config)
    print(task.split_info["description"], flush=True)  # binaries log at WARNING: print so this line shows
    return task


# ------------------------------------------------------------------------------------------- the study's flags
def define_study_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The study binary's flags (`jaxinf.pipeline.FLAG_FIELDS`), defaults from `jaxinf.pipeline.StudyConfig`."""
    from jaxinf import study
    from jaxinf.groundtruth.study import KINDS
    from jaxinf.pipeline import StudyConfig
    from jaxinf.attribution import POOLINGS

    c, fv = StudyConfig(), dict(flag_values=flag_values)
    gt, rep = c.ground_truth, c.report
    flags.DEFINE_string("model", c.model, "smollm2-135m-instruct | gemma3-270m | tiny-llama | tiny-llama3 | "
                        "tiny-mistral | tiny-qwen2 | tiny-qwen3 | tiny-gemma2 | tiny-gemma3 | tiny-gpt2 | a local "
                        "HF folder", **fv)
    flags.DEFINE_list("methods", list(c.methods), f"comma list from {list(study.ALL_METHODS)}", **fv)
    flags.DEFINE_enum("preset", c.preset, list(study.PRESETS), "quick: 2-core CPU sizes; paper: the study's "
                      "settings", **fv)
    flags.DEFINE_integer("seed", c.seed, "seed for subsampling, data order, adapter init and solvers", **fv)
    flags.DEFINE_float("epochs", c.epochs, "override the preset's fine-tuning epochs", **fv)
    flags.DEFINE_enum("repsim_pooling", c.repsim_pooling, list(POOLINGS),
                      "RepSim representation: hidden state at the final prompt token (the study) or response mean",
                      **fv)
    flags.DEFINE_integer("lissa_depth", c.lissa_depth, "LiSSA iterations (the study's code ran 3-10; default: the "
                         "preset's)", **fv)
    flags.DEFINE_list("damping", None, "relative damping f (comma list = a sweep in one run, reusing fine-tuning, "
                      "gradients and factors; one result set per value): lambda = f x tr(C)/dim of the curvature "
                      "being inverted (global scope) or of each LoRA matrix (block scope). Default: the preset's",
                      **fv)
    flags.DEFINE_enum("damping_scope", c.damping_scope, list(study.DAMPING_SCOPES),
                      "global: one absolute lambda for every method, from the whole operator; block: the study's "
                      "rule, lambda per LoRA matrix = f x its mean squared gradient entry (a diagonal damping for "
                      "every method)", **fv)
    flags.DEFINE_enum("curvature", c.curvature, list(study.CURVATURES),
                      "fisher: empirical Fisher of the cached gradients; ggn | hessian: the model's exact operators "
                      "over the training rows for exact, cg, lissa, lanczos, arnoldi (the other methods report what "
                      "they used)", **fv)
    flags.DEFINE_string("mesh", c.mesh, "device mesh for the heavy stages, e.g. data=8 or data=2,model=4 "
                        "(jaxinf.sharding): rows split over data, frozen base weights FSDP-sharded over model; the "
                        "axis sizes must multiply to the device count; the same numbers as one device", **fv)
    flags.DEFINE_enum("remat", c.remat, ["none", "layer", "dots"], "rematerialisation of the decoder's layers in "
                      "every backward pass (models on jaxinf's decoder): none; layer (keep each layer's input, "
                      "recompute the rest: least memory); dots (keep matmul outputs). Same maths, less memory, "
                      "more compute", **fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "base weights and activations (default float32); "
                      "LoRA adapters, their updates, gradients, K-FAC factors and scores stay float32", **fv)
    lo = c.lora
    flags.DEFINE_integer("lora_rank", lo.rank, "LoRA rank r of the fine-tuned adapters", **fv)
    flags.DEFINE_float("lora_alpha", lo.alpha, "LoRA alpha: the adapters' update is scaled by alpha / r", **fv)
    flags.DEFINE_list("lora_targets", list(lo.targets), "projections adapted in every layer, by the model's names "
                      "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)", **fv)
    flags.DEFINE_float("lora_dropout", lo.dropout, "dropout on the adapters' input (default: the preset's, quick 0, "
                       "paper 0.1)", **fv)
    flags.DEFINE_list("ground_truth", list(gt.kinds), f"counterfactual ground truths from {list(KINDS)} (empty: "
                      "none); every method's agreement with each (LDS; mean per-query Spearman for the others) goes "
                      "into results and gt_agreement.png", **fv)
    flags.DEFINE_integer("gt_queries", gt.queries, "test rows (spread evenly) for trajectory / loo / pbrf (0 = all); "
                         "LDS uses all (the quick default keeps README command 1's cost down on 2 CPU cores; use 4 "
                         "or more)", **fv)
    flags.DEFINE_integer("gt_subsets", gt.subsets, "LDS: retrained random subsets (the quick default: a coarse LDS, "
                         "each subset costs one fine-tuning run per seed; use 32-100)", **fv)
    flags.DEFINE_float("gt_fraction", gt.fraction, "LDS: fraction of the training rows each subset keeps (0.5; 0.9 "
                       "for the small-drop regime)", **fv)
    flags.DEFINE_integer("gt_seeds", gt.seeds, "lds: seeds each subset is retrained from scratch with (their query "
                         "losses are averaged)", **fv)
    flags.DEFINE_bool("gt_stratify", gt.stratify, "LDS subsets keep the fraction of every group (group counts fixed, "
                      "so the outcome cannot be read off the labels)", **fv)
    flags.DEFINE_integer("gt_query_chunk", gt.query_chunk, "trajectory: queries per backward pass of the adjoint "
                         "(memory grows with it; 0 = all at once)", **fv)
    flags.DEFINE_integer("gt_loo_rows", gt.loo_rows, "leave-one-out: training rows (spread evenly; 0 = all) "
                         "retrained without", **fv)
    flags.DEFINE_integer("gt_pbrf_rows", gt.pbrf_rows, "PBRF: training rows (spread evenly; 0 = all)", **fv)
    flags.DEFINE_float("gt_pbrf_eps", gt.pbrf_eps, "PBRF: up-weighting eps of the row", **fv)
    flags.DEFINE_float("gt_pbrf_damping", gt.pbrf_damping, "PBRF: proximity lambda as a fraction of the empirical "
                       "Fisher's mean eigenvalue (mean ||g_n||^2 / D)", **fv)
    flags.DEFINE_integer("gt_pbrf_iters", gt.pbrf_iters, "PBRF: L-BFGS iterations", **fv)
    flags.DEFINE_float("gt_pbrf_tol", gt.pbrf_tol, "PBRF: a solve is converged when its final gradient norm is at "
                       "most this fraction of its initial one (else flagged converged=false)", **fv)
    flags.DEFINE_integer("gt_chunk", gt.chunk, "retrains (LOO / LDS subsets) vmapped at once", **fv)
    flags.DEFINE_integer("bootstrap", rep.bootstrap, "bootstrap resamples over test rows for the confidence "
                         "intervals", **fv)
    define_data_flags(flag_values)  # --data, --test_data/--test_fraction, columns, --template/--max_length/--limit_*
    flags.DEFINE_integer("top_k", rep.top_k, "per method and test row, the top-k and bottom-k training rows kept in "
                         "results.json", **fv)
    flags.DEFINE_integer("report_queries", rep.queries, "test rows per group explained in report.html (0 = no "
                         "report)", **fv)
    flags.DEFINE_integer("report_k", rep.k, "training rows per method shown in report.html (top and bottom each)",
                         **fv)
    flags.DEFINE_list("report_methods", list(rep.methods), "methods shown side by side in report.html (those of "
                      "--methods that ran)", **fv)


def study_config_from_flags(flag_values: flags.FlagValues = flags.FLAGS):
    """The StudyConfig the study flags describe; a bad value is one UsageError line naming the flag."""
    from jaxinf import pipeline

    values = {name: flag_values[name].value for name in pipeline.FLAG_FIELDS if name in flag_values}
    values["ground_truth"] = [k for k in (values.get("ground_truth") or []) if k]  # --ground_truth= : none
    with user_errors():
        return pipeline.config_from_flags(values).validate()
