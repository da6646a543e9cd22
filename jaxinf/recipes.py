"""Steps the experiment binaries share: load a model and a task, tokenise it, LoRA fine-tune (or reuse) it."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import data as jdata
from jaxinf import training
from jaxinf.workdir import write_json  # noqa: F401  (recipes.write_json: the one atomic JSON write)
from jaxinf.models import LMFunctions, LoraConfig, init_adapters
from jaxinf.models.causal_lm import DecoderLM


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which rows, how they become tokens: source (study folder, file, or generator), template, max_length, masks.

    Splits (see jaxinf.data.splits): a source with its own splits is used as is; a single file without a
    ``split`` column needs ``test_data`` (a second file of test rows) or ``test_fraction`` (a seeded, group-
    stratified held-out part). Test rows duplicating a training row's (prompt, response) are an error unless
    ``allow_overlap``. ``max_length`` above the model's context is allowed only while every row fits it.
    """

    source: str = "backdoor"
    template: str = "chat"
    max_length: int = 128
    loss_on: str = "response"
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    seed: int = 0
    prompt_column: str = "prompts"
    response_column: str = "response"
    group_column: str = "variation"
    test_data: Optional[str] = None
    test_fraction: Optional[float] = None
    allow_overlap: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    train_rows: list
    test_rows: list
    train: Any  # jaxinf.data.TokenizedRows
    test: Any
    split_info: dict = dataclasses.field(default_factory=dict)  # jaxinf.data.Splits.info: mode, sizes, overlap


def load_task(model: DecoderLM, config: TaskConfig) -> Task:
    """Disjoint train/test rows (``jaxinf.data.load_splits``; stratified subsample if limited) tokenised with
    the model's tokenizer. User mistakes raise ``jaxinf.data.DataError`` (one line: file, row, field, fix)."""
    splits = jdata.load_splits(
        config.source, test_data=config.test_data, test_fraction=config.test_fraction,
        prompt_column=config.prompt_column, response_column=config.response_column,
        group_column=config.group_column, limit_train=config.limit_train, limit_test=config.limit_test,
        seed=config.seed, allow_overlap=config.allow_overlap)
    kw = dict(max_length=config.max_length, template=config.template, loss_on=config.loss_on,
              context=model.max_length)
    return Task(splits.train, splits.test,
                jdata.tokenize_rows(model.tokenizer, splits.train, locations=splits.train_where, **kw),
                jdata.tokenize_rows(model.tokenizer, splits.test, locations=splits.test_where, **kw),
                split_info=splits.info)


def batch_arrays(tokenized) -> dict:
    """The arrays a loss needs, as a dict of numpy arrays [N, T]."""
    return {k: np.asarray(getattr(tokenized, k) if hasattr(tokenized, k) else tokenized[k])
            for k in training.BATCH_KEYS}


def initial_adapters(model: DecoderLM, lora: LoraConfig, seed: int) -> dict:
    """The adapters a fine-tuning with `seed` starts from (PEFT init, B = 0), in float32 at least."""
    init = init_adapters(jax.random.key(seed), model, lora)
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), init)


def finetune_lora(
    model: DecoderLM,
    lora: LoraConfig,
    task: Task,
    train_config: training.TrainConfig,
    workdir: str,
    *,
    run_config: Optional[dict] = None,
    stop_after: Optional[int] = None,
    mesh=None,
) -> tuple[dict, list[dict]]:
    """LoRA fine-tune on `task.train` in `workdir` (resuming if interrupted); returns adapters and log.

    Adapters are kept in float32 at least (master weights): with a bfloat16 model the base weights and
    activations are bfloat16, the adapters, their AdamW updates and every gradient float32. `mesh`: see
    `training.train`.
    """
    fns = LMFunctions(model, lora)
    init = initial_adapters(model, lora, train_config.seed)
    run_config = dict(run_config or {}, model=model.name, lora=dataclasses.asdict(lora))
    return training.train(fns, init, batch_arrays(task.train), train_config, workdir, run_config=run_config,
                          stop_after=stop_after, mesh=mesh)


