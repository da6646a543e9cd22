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
import dataclasses
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


def _limit(value: Optional[int], default: Optional[int]) -> Optional[int]:
    if value is None:
        return default
    if value < 0:
        raise app.UsageError(f"--limit_train/--limit_test={value} must be >= 0 (0 = all rows)")
    return None if value == 0 else value


def task_config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, *, seed: int = 0,
                           template: str = "chat", max_length: int = 128, limit_train: Optional[int] = None,
                           limit_test: Optional[int] = None) -> recipes.TaskConfig:
    """A TaskConfig from the data flags; keyword arguments are the defaults of flags left at None."""
    f = flag_values
    if f.test_fraction is not None and not 0.0 < f.test_fraction < 1.0:
        raise app.UsageError(f"--test_fraction={f.test_fraction} must lie strictly between 0 and 1 (e.g. 0.2)")
    if f.max_length is not None and f.max_length < 2:
        raise app.UsageError(f"--max_length={f.max_length} must be at least 2 tokens")
    return recipes.TaskConfig(
        source=f.data, template=f.template or template, max_length=f.max_length or max_length,
        loss_on=f.loss_on, limit_train=_limit(f.limit_train, limit_train),
        limit_test=_limit(f.limit_test, limit_test), seed=seed, prompt_column=f.prompt_column,
        response_column=f.response_column, group_column=f.group_column, test_data=f.test_data,
        test_fraction=f.test_fraction, allow_overlap=f.allow_overlap)


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
