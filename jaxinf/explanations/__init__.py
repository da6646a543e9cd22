"""The study's three explanations of why influence fails, as library calls (each `run(config, workdir) -> dict`).

    from jaxinf.explanations import convergence, ihvp_error, behaviour
    from jaxinf.pipeline import StudyConfig, DataConfig
    study = StudyConfig(model="tiny-llama", data=DataConfig("backdoor", limit_train=8, limit_test=4))
    ihvp_error.run(ihvp_error.IhvpErrorConfig(study, queries=2, rows=2), "runs/ihvp_error")

* `ihvp_error` (the first): how far each iHVP solver is from the exact damped inverse, and whether exactness helps;
* `convergence` (the second): attribution, optimisation state and curvature at every checkpoint of one run;
* `behaviour` (the third): parameter change against behaviour change over data variants.

Each fine-tunes through `jaxinf.pipeline` (the study's model, task, epochs rule and schedule), caches its stages in
the workdir (an interrupted run resumes), writes `<name>.json` and `<name>.png` there (`jaxinf.report.figures`)
and returns what the JSON holds. Progress goes through `jaxinf.progress`; nothing here prints.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["attribution_groups", "data_name", "relative_damping"]


def attribution_groups(task, n_test: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(test groups, training groups) to score attributions against: the task's own, or for a task with "harmful"
    training rows the harmful-identification labels (`jaxinf.evaluation.metrics.harmful_labels`). n_test: keep the
    first n_test test rows (the queries)."""
    train_groups = np.asarray(task.train.groups)
    n = len(task.test.groups) if n_test is None else n_test
    if "harmful" in set(train_groups.tolist()):
        from jaxinf.evaluation.metrics import harmful_labels

        return harmful_labels(train_groups, n_test=n)
    return np.asarray(task.test.groups)[:n], train_groups


def relative_damping(study_config) -> float:
    """The study config's one relative damping f (its `damping` value, else the preset's)."""
    return float(study_config.damping[0]) if study_config.damping else float(study_config.sizes.damping)


def data_name(study_config) -> str:
    """The data source's short name for figure titles (a folder's or file's base name, or a generator's name)."""
    return os.path.basename(os.path.normpath(study_config.data.source))
