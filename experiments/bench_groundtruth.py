r"""Cost of the ground truths relative to one fine-tuning run, measured in one process; writes JSON.

    python -m experiments.bench_groundtruth --out=results/bench_groundtruth.json          # SmolLM2, CPU
    python -m experiments.bench_groundtruth --model=tiny-llama --n_train=8 --steps=2 --queries=2 --out=/tmp/b.json

One fine-tuning run = the scanned trainer at unit weights (`WeightedRun.final`, the same computation as
`jaxinf.training.train`'s steps). Each stage is called once to compile and then timed warm (`--repeats`, median):
trajectory influence of `--queries` queries (the adjoint: one forward scan keeping every step's state, then
one backward pass of forward-over-reverse steps vmapped over the queries), one LDS retrain (a
masked run, chunk 1), and the run itself. Reported: seconds and the ratios trajectory / run, trajectory per query
/ run, LDS subset / run, plus compile seconds.
"""

import json
import platform
import time

import jax
import numpy as np
from absl import app, flags

from jaxinf import recipes, runtime, training
from jaxinf.groundtruth import WeightedRun, lds_masks, retrain_losses, trajectory_influence
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, init_adapters, load_model
from jaxinf.workdir import write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "model name or local directory")
flags.DEFINE_string("data", "backdoor", "training rows (study folder, file or generator)")
flags.DEFINE_integer("n_train", 48, "training rows")
flags.DEFINE_integer("queries", 4, "query rows for trajectory influence")
flags.DEFINE_integer("steps", 18, "optimiser steps of the run")
flags.DEFINE_integer("batch_size", 8, "rows per step")
flags.DEFINE_integer("max_length", 96, "tokens per row")
flags.DEFINE_integer("repeats", 1, "warm timings per stage (median)")
flags.DEFINE_string("out", "results/bench_groundtruth.json", "JSON output path")


def _time(fn, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    return first, float(np.median(warm))


def main(argv):
    del argv
    runtime.setup()
    model = load_model(FLAGS.model)
    task = recipes.load_task(model, recipes.TaskConfig(source=FLAGS.data, max_length=FLAGS.max_length,
                                                       limit_train=FLAGS.n_train, limit_test=FLAGS.queries))
    lora = LoraConfig()
    config = training.TrainConfig(steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=1e-3)
    run = WeightedRun(LMFunctions(model, lora), init_adapters(jax.random.key(0), model, lora),
                      recipes.batch_arrays(task.train), config)
    queries = recipes.batch_arrays(task.test)
    mask = lds_masks(run.n_rows, 1, 0.5)
    stages = {
        "finetune_run": lambda: run.final(),
        "trajectory": lambda: trajectory_influence(run, queries),
        "lds_subset": lambda: retrain_losses(run, mask, queries, chunk=1),
    }
    timings = {name: _time(fn, FLAGS.repeats) for name, fn in stages.items()}
    run_s = timings["finetune_run"][1]
    q = int(queries["input_ids"].shape[0])
    result = {
        "model": model.name, "platform": jax.default_backend(), "cpu": platform.processor() or platform.machine(),
        "n_train": run.n_rows, "queries": q, "steps": run.total_steps, "batch_size": config.batch_size,
        "seq_len": int(queries["input_ids"].shape[1]),
        "seconds_warm": {k: v[1] for k, v in timings.items()},
        "seconds_first_call": {k: v[0] for k, v in timings.items()},
        "trajectory_over_run": timings["trajectory"][1] / run_s,
        "trajectory_per_query_over_run": timings["trajectory"][1] / run_s / q,
        "lds_subset_over_run": timings["lds_subset"][1] / run_s,
        "command": "python -m experiments.bench_groundtruth " + " ".join(
            f"--{k}={FLAGS[k].value}" for k in ("model", "data", "n_train", "queries", "steps", "batch_size",
                                                 "max_length", "repeats")),
    }
    write_json(FLAGS.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
