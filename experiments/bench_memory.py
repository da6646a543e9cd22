r"""Peak resident memory per stage of the study run (the quick preset by default), in one process.

    nice -n 10 python -m experiments.bench_memory                       # SmolLM2-135M, quick preset
    python -m experiments.bench_memory --model=tiny-llama --limit_train=8 --limit_test=4 --out=/tmp/m.json

The stages are those of `python -m experiments.attribute` (the same library calls, in the same order, in a fresh
--workdir): load the model, tokenise the task, LoRA fine-tune, per-example gradients of the training and test
rows, the ground truths (--ground_truth: trajectory influence, LDS retrains, the binary's quick sizes), then each
method; the K-FAC/EK-FAC factor fit is a stage of its own before kfac/ekfac. A sampling thread
reads the process's resident set size (psutil, every --sample_ms ms); per stage we record its peak, the RSS at
its end, and the process's running maximum (getrusage ru_maxrss, which no sampling gap can miss).
"model_weights_mib" is the size of the model's parameters; the issue's goal is peak - weights <= 2 GiB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import tempfile
import threading
import time

import jax
import numpy as np
import psutil
from absl import app, flags

from jaxinf import attribution, cli, pipeline, runtime, study
from jaxinf.models import DEFAULT_MODEL, LMFunctions
from jaxinf.workdir import read_json, write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "model name or local HF dir (as experiments.attribute)")
flags.DEFINE_string("data", "backdoor", "task (as experiments.attribute)")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "study preset")
flags.DEFINE_list("methods", list(study.ALL_METHODS), "methods, each a stage")
flags.DEFINE_list("ground_truth", ["trajectory", "lds"], "ground truths, each a stage (as experiments.attribute)")
flags.DEFINE_integer("gt_queries", 1, "test rows for trajectory influence (as experiments.attribute; 0 = all)")
flags.DEFINE_integer("gt_subsets", 4, "LDS retrained subsets (as experiments.attribute)")
flags.DEFINE_integer("limit_train", None, "override the preset's training subsample")
flags.DEFINE_integer("limit_test", None, "override the preset's test subsample")
flags.DEFINE_float("epochs", None, "override the preset's epochs")
flags.DEFINE_integer("sample_ms", 5, "RSS sampling period")
flags.DEFINE_string("workdir", None, "stage outputs (default: a temporary directory, removed at the end)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_enum("remat", "none", ["none", "layer", "dots"], "rematerialisation of the decoder's layers "
                  "(as experiments.attribute)")
flags.DEFINE_string("out", "results/bench_memory.json", "JSON results (keyed by model/preset/sizes)")

MIB = 2.0 ** 20


class StageMemory:
    """Peak RSS per named stage, from a background sampling thread."""

    def __init__(self, period_s: float, on_stage=None):
        self._on_stage = on_stage  # called with the stage list after each stage (partial results survive a stop)
        self._proc = psutil.Process()
        self._period = period_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.stages: list[dict] = []

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _sample(self):
        while not self._stop.is_set():
            rss = self._rss()
            with self._lock:
                self._peak = max(self._peak, rss)
            time.sleep(self._period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def stage(self, name: str):
        with self._lock:
            self._peak = start = self._rss()
        t0 = time.perf_counter()
        yield
        end = self._rss()
        with self._lock:
            peak = max(self._peak, end)
        self.stages.append({"stage": name, "seconds": time.perf_counter() - t0, "rss_start_mib": start / MIB,
                            "peak_rss_mib": peak / MIB, "rss_end_mib": end / MIB,
                            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})
        s = self.stages[-1]
        print(f"{name:16s} peak {s['peak_rss_mib']:8.1f} MiB  end {s['rss_end_mib']:8.1f}  "
              f"{s['seconds']:7.1f} s", flush=True)
        if self._on_stage is not None:
            self._on_stage(self.stages)


def run(config, workdir: str, mem: StageMemory) -> dict:
    """The study's first stages (`jaxinf.pipeline`'s model, task and fine-tuning), then gradients, ground truths and
    methods, each a measured stage."""
    preset = config.sizes
    with mem.stage("load_model"):
        model = pipeline.load_study_model(config)
    weights_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(model.params))
    with mem.stage("tokenize"):
        task = pipeline.load_study_task(config, model)
    with mem.stage("finetune"):
        adapters, log, train_config, lora = pipeline.finetune(config, model, task, workdir)
    fns = LMFunctions(model, lora)
    grads = {}
    for split in ("train", "test"):
        with mem.stage(f"gradients_{split}"):
            flat = attribution.per_example_gradients(fns, adapters, getattr(task, split), chunk_size=preset.grad_chunk)
            grads[split] = attribution.unflatten_rows(np.asarray(flat), adapters, stacked=False)
    inputs = study.StudyInputs(fns=fns, adapters=adapters, train=task.train, test=task.test,
                               workdir=os.path.join(workdir, "finetune"), preset=preset, train_grads=grads["train"],
                               test_grads=grads["test"], seed=config.seed)  # as pipeline.prepare's
    prepared = pipeline.Prepared(config, model, task, adapters, log, inputs, train_config,
                                 pipeline.study_epochs(config, task))
    for kind in config.ground_truth.kinds:  # the study's ground-truth call, one kind per stage
        with mem.stage(f"ground_truth_{kind}"):
            one = dataclasses.replace(config, ground_truth=dataclasses.replace(config.ground_truth, kinds=(kind,)))
            pipeline.ground_truths(one, prepared, workdir)
    for method in config.methods:
        if method in ("kfac", "ekfac") and not any(s["stage"] == "kfac_fit" for s in mem.stages):
            with mem.stage("kfac_fit"):
                inputs.kfac_factors  # noqa: B018 (fits and caches the factors)
        with mem.stage(method):
            study.run_method(method, inputs)
    return {"model": model.name, "model_weights_mib": weights_bytes / MIB, "n_train": len(task.train_rows),
            "n_test": len(task.test_rows), "seq_len": int(task.train.input_ids.shape[1]),
            "finetune_steps": train_config.steps}


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    # --model, --data, --preset, --seed, --epochs, --limit_*, --methods, --ground_truth, --gt_*: one StudyConfig
    config = cli.study_config_from_flags()
    partial = FLAGS.out + ".partial.json"
    with StageMemory(FLAGS.sample_ms / 1000.0, on_stage=lambda stages: write_json(partial, stages)) as mem:
        baseline = mem._rss() / MIB
        with contextlib.ExitStack() as stack:
            workdir = FLAGS.workdir or stack.enter_context(tempfile.TemporaryDirectory())
            with cli.user_errors():
                info = run(config, workdir, mem)
    peak = max(s["peak_rss_mib"] for s in mem.stages)
    result = dict(info, data=FLAGS.data, preset=FLAGS.preset, remat=config.remat, platform=jax.devices()[0].platform,
                  rss_after_imports_mib=baseline, peak_rss_mib=peak,
                  peak_above_weights_mib=peak - info["model_weights_mib"],
                  peak_above_imports_and_weights_mib=peak - baseline - info["model_weights_mib"],
                  worst_stage=max(mem.stages, key=lambda s: s["peak_rss_mib"])["stage"], stages=mem.stages)
    existing = read_json(FLAGS.out) if os.path.exists(FLAGS.out) else {}
    remat = "" if config.remat == "none" else f"/remat={config.remat}"
    existing[f"{result['model']}/{FLAGS.data}/{FLAGS.preset}/{info['n_train']}x{info['n_test']}{remat}"] = result
    write_json(FLAGS.out, existing)
    os.remove(partial)
    print(f"peak {peak:.0f} MiB = imports {baseline:.0f} + weights {info['model_weights_mib']:.0f} + "
          f"{result['peak_above_imports_and_weights_mib']:.0f} MiB; worst stage {result['worst_stage']}")


if __name__ == "__main__":
    app.run(main)
