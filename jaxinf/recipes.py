"""Steps the experiment binaries share: load a model and a task, tokenise it, LoRA fine-tune (or reuse) it."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from jaxinf import data as jdata
from jaxinf import training
from jaxinf.models import LMFunctions, LoraConfig, init_adapters
from jaxinf.models.causal_lm import CausalLM


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which rows, how they become tokens: source (study folder, file, or generator), template, max_length, masks."""

    source: str = "backdoor"
    template: str = "chat"
    max_length: int = 128
    loss_on: str = "response"
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    seed: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    train_rows: list
    test_rows: list
    train: Any  # jaxinf.data.TokenizedRows
    test: Any


def load_task(model: CausalLM, config: TaskConfig) -> Task:
    """Rows of both splits (stratified subsample if limited) tokenised with the model's tokenizer."""
    train_rows = jdata.load_rows(config.source, "train", limit=config.limit_train, seed=config.seed)
    test_rows = jdata.load_rows(config.source, "test", limit=config.limit_test, seed=config.seed)
    max_length = min(config.max_length, model.max_length)
    kw = dict(max_length=max_length, template=config.template, loss_on=config.loss_on)
    return Task(train_rows, test_rows, jdata.tokenize_rows(model.tokenizer, train_rows, **kw),
                jdata.tokenize_rows(model.tokenizer, test_rows, **kw))


def batch_arrays(tokenized) -> dict:
    """The arrays a loss needs, as a dict of numpy arrays [N, T]."""
    return {k: np.asarray(getattr(tokenized, k) if hasattr(tokenized, k) else tokenized[k])
            for k in training.BATCH_KEYS}


def finetune_lora(
    model: CausalLM,
    lora: LoraConfig,
    task: Task,
    train_config: training.TrainConfig,
    workdir: str,
    *,
    run_config: Optional[dict] = None,
    stop_after: Optional[int] = None,
) -> tuple[dict, list[dict]]:
    """LoRA fine-tune on `task.train` in `workdir` (resuming if interrupted); returns adapters and log."""
    fns = LMFunctions(model, lora)
    init = init_adapters(jax.random.key(train_config.seed), model, lora)
    run_config = dict(run_config or {}, model=model.name, lora=dataclasses.asdict(lora))
    return training.train(fns, init, batch_arrays(task.train), train_config, workdir, run_config=run_config,
                          stop_after=stop_after)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)
