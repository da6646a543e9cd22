"""Study configurations as values: `quick()` and `paper()` return a `StudyConfig` whose preset is a `study.Preset`.

    from jaxinf import presets
    from jaxinf.pipeline import run_study
    config = presets.quick(model="tiny-llama", epochs=2, lr=3e-4, methods=("grad_dot", "exact"))
    run_study(config, "runs/tiny")

Keywords name either a `StudyConfig` field (model, data, seed, methods, damping, ...) or a `study.Preset` field
(limit_train, limit_test, max_length, epochs, batch_size, lr, lora_dropout, template, damping, lissa_depth,
cg_iters, krylov_iters, tracin_checkpoints, grad_chunk, epochs_harmful). `epochs` and `damping`, which both
have, set the study's own fields (damping as relative values, a float or a tuple for a sweep). A preset with
changed values is recorded in the workdir by its fields, an unchanged one by its name, so workdirs made from the
command line (`--preset=quick`) resume from these configs and the other way round.
"""

from __future__ import annotations

import dataclasses

from jaxinf import study
from jaxinf.pipeline import StudyConfig

_STUDY_FIELDS = {f.name for f in dataclasses.fields(StudyConfig)} - {"preset"}
_PRESET_FIELDS = {f.name for f in dataclasses.fields(study.Preset)}


def from_preset(name: str, **changes) -> StudyConfig:
    """A StudyConfig on the named preset's values, with `changes` (see the module docstring)."""
    unknown = set(changes) - _STUDY_FIELDS - _PRESET_FIELDS
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; a StudyConfig has {sorted(_STUDY_FIELDS)} and a "
                         f"study.Preset {sorted(_PRESET_FIELDS)}")
    own = {k: v for k, v in changes.items() if k in _STUDY_FIELDS}
    if isinstance(own.get("damping"), (int, float)):
        own["damping"] = (float(own["damping"]),)
    values = {k: v for k, v in changes.items() if k not in _STUDY_FIELDS}
    preset = dataclasses.replace(study.resolve_preset(name), **values) if values else name
    return StudyConfig(preset=preset, **own).validate()


def quick(**changes) -> StudyConfig:
    """2-core CPU sizes: a stratified subsample of 48 training and 16 test rows, 96 tokens, 3 epochs of AdamW 1e-3."""
    return from_preset("quick", **changes)


def paper(**changes) -> StudyConfig:
    """The study's released settings: all rows, the [INST] template, AdamW 5e-5, batch 24, LoRA dropout 0.1,
    10 epochs (50 on harmful data)."""
    return from_preset("paper", **changes)
