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
import json
import os
import resource
import tempfile
import threading
import time

import jax
import numpy as np
import psutil
from absl import app, flags

from jaxinf import attribution, recipes, runtime, study, training
from jaxinf.groundtruth import study as gt_study
from jaxinf.models import DEFAULT_MODEL, LMFunctions, LoraConfig, load_model

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


def _limit(flag_value, preset_value):
    if flag_value is None:
        return preset_value
    return None if flag_value == 0 else flag_value


def run(workdir: str, mem: StageMemory) -> dict:
    preset = study.PRESETS[FLAGS.preset]
    with mem.stage("load_model"):
        model = load_model(FLAGS.model, seed=FLAGS.seed)
    weights_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(model.params))
    with mem.stage("tokenize"):
        task = recipes.load_task(model, recipes.TaskConfig(
            source=FLAGS.data, template=preset.template, max_length=preset.max_length,
            limit_train=_limit(FLAGS.limit_train, preset.limit_train),
            limit_test=_limit(FLAGS.limit_test, preset.limit_test), seed=FLAGS.seed))
    harmful = "harmful" in set(task.train.groups.tolist())
    epochs = FLAGS.epochs or (preset.epochs_harmful if harmful and preset.epochs_harmful else preset.epochs)
    n_train = len(task.train_rows)
    steps = max(1, int(np.ceil(epochs * n_train / preset.batch_size)))
    train_config = training.TrainConfig(steps=steps, batch_size=min(preset.batch_size, n_train), lr=preset.lr,
                                        checkpoint_every=max(1, steps // preset.tracin_checkpoints),
                                        seed=FLAGS.seed)
    lora = LoraConfig(dropout=preset.lora_dropout)
    ft_dir = os.path.join(workdir, "finetune")
    with mem.stage("finetune"):
        adapters, _ = recipes.finetune_lora(model, lora, task, train_config, ft_dir)
    fns = LMFunctions(model, lora)
    grads = {}
    for split in ("train", "test"):
        with mem.stage(f"gradients_{split}"):
            flat = attribution.per_example_gradients(fns, adapters, getattr(task, split), chunk_size=preset.grad_chunk)
            grads[split] = attribution.unflatten_rows(np.asarray(flat), adapters, stacked=False)
    gt_config = gt_study.GroundTruthConfig(max_queries=FLAGS.gt_queries or None, lds_subsets=FLAGS.gt_subsets,
                                           lds_fraction=0.5, seed=FLAGS.seed)
    run_replay = gt_study.replay(fns, adapters, recipes.batch_arrays(task.train), train_config, ft_dir)
    for kind in FLAGS.ground_truth:
        with mem.stage(f"ground_truth_{kind}"):
            gt_study.compute(run_replay, adapters, recipes.batch_arrays(task.test),
                             dataclasses.replace(gt_config, kinds=(kind,)), os.path.join(workdir, "groundtruth"))
    inputs = study.StudyInputs(fns=fns, adapters=adapters, train=task.train, test=task.test, workdir=ft_dir,
                               preset=preset, train_grads=grads["train"], test_grads=grads["test"], seed=FLAGS.seed)
    for method in FLAGS.methods:
        if method in ("kfac", "ekfac") and not any(s["stage"] == "kfac_fit" for s in mem.stages):
            with mem.stage("kfac_fit"):
                inputs.kfac_factors  # noqa: B018 (fits and caches the factors)
        with mem.stage(method):
            study.run_method(method, inputs)
    return {"model": model.name, "model_weights_mib": weights_bytes / MIB, "n_train": n_train,
            "n_test": len(task.test_rows), "seq_len": int(task.train.input_ids.shape[1]),
            "finetune_steps": steps}


def main(argv):
    del argv
    runtime.setup()  # persistent compilation cache (JAXINF_COMPILATION_CACHE=0 turns it off)
    unknown = [m for m in FLAGS.methods if m not in study.METHODS]
    if unknown:
        raise app.UsageError(f"unknown --methods {unknown}; choose from {list(study.METHODS)}")
    partial = FLAGS.out + ".partial.json"
    with StageMemory(FLAGS.sample_ms / 1000.0, on_stage=lambda stages: recipes.write_json(partial, stages)) as mem:
        baseline = mem._rss() / MIB
        with contextlib.ExitStack() as stack:
            workdir = FLAGS.workdir or stack.enter_context(tempfile.TemporaryDirectory())
            info = run(workdir, mem)
    peak = max(s["peak_rss_mib"] for s in mem.stages)
    result = dict(info, data=FLAGS.data, preset=FLAGS.preset, platform=jax.devices()[0].platform,
                  rss_after_imports_mib=baseline, peak_rss_mib=peak,
                  peak_above_weights_mib=peak - info["model_weights_mib"],
                  peak_above_imports_and_weights_mib=peak - baseline - info["model_weights_mib"],
                  worst_stage=max(mem.stages, key=lambda s: s["peak_rss_mib"])["stage"], stages=mem.stages)
    existing = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            existing = json.load(f)
    existing[f"{result['model']}/{FLAGS.data}/{FLAGS.preset}/{info['n_train']}x{info['n_test']}"] = result
    recipes.write_json(FLAGS.out, existing)
    os.remove(partial)
    print(f"peak {peak:.0f} MiB = imports {baseline:.0f} + weights {info['model_weights_mib']:.0f} + "
          f"{result['peak_above_imports_and_weights_mib']:.0f} MiB; worst stage {result['worst_stage']}")


if __name__ == "__main__":
    app.run(main)
