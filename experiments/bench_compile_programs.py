r"""XLA compilation time of single programs of the study, on SmolLM2 with LoRA (q, v; rank 4).

    python -m experiments.bench_compile_programs                      # with jaxinf.runtime's CPU compile flags
    JAXINF_XLA_FLAGS=0 python -m experiments.bench_compile_programs   # XLA's defaults

Each program is lowered and compiled `--repeats` times (jax's in-memory caches cleared before each); we
report the median compile seconds and, for the training programs, the median run seconds of the compiled step:
  * lora_gradient:    grad of the mean training loss over the adapters (frozen weights as an argument),
  * finetune_step:    `training.make_train_step`'s step (gradient, AdamW, the five logged norms),
  * tree_norm:        `training._tree_norm` of the 120-leaf adapter tree (one concatenated vector),
  * global_norm:      `optax.global_norm` of the same tree (one reduction per leaf),
  * adamw_update:     AdamW's update over the tree, and `optax.flatten` of it.
Only ratios within one run compare (shared CPUs are noisy).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

from jaxinf import runtime
from jaxinf.workdir import read_json, write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "model name or local directory")
flags.DEFINE_integer("repeats", 3, "compilations per program")
flags.DEFINE_integer("batch_size", 8, "rows")
flags.DEFINE_integer("seq_len", 58, "tokens per row")
flags.DEFINE_string("out", "results/bench_compile_programs.json", "JSON results (one entry per XLA_FLAGS setting)")


def main(argv):
    del argv
    runtime.add_cpu_compile_flags()  # no persistent cache: every compilation below is a real one
    import jax
    import jax.numpy as jnp
    import optax

    from jaxinf import training
    from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model

    model = load_model(FLAGS.model)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.05)
    fns = LMFunctions(model, lora)
    adapters = init_adapters(jax.random.key(0), model, lora)
    shape = (FLAGS.batch_size, FLAGS.seq_len)
    batch = {"input_ids": jnp.ones(shape, jnp.int32), "attention_mask": jnp.ones(shape, jnp.int32),
             "loss_mask": jnp.ones(shape, jnp.float32)}
    config = training.TrainConfig(steps=4, batch_size=FLAGS.batch_size, lr=1e-3)
    adamw = training.make_optimizer(config, 4)
    flat_adamw = optax.flatten(adamw)
    step = training.make_train_step(fns, adamw, 1)
    base = model.params

    programs = {
        "lora_gradient": (lambda b, t: jax.grad(lambda p: fns.with_base(b).loss(p, batch))(t), (base, adapters)),
        "finetune_step": (step.func, (base, adapters, adamw.init(adapters), adapters, batch, jax.random.key(1))),
        "tree_norm": (training._tree_norm, (adapters,)),
        "global_norm": (optax.global_norm, (adapters,)),
        "adamw_update": (lambda g, s: adamw.update(g, s, g), (adapters, adamw.init(adapters))),
        "adamw_update_flattened": (lambda g, s: flat_adamw.update(g, s, g), (adapters, flat_adamw.init(adapters))),
    }
    result = {}
    for name, (fn, args) in programs.items():
        seconds, compiled = [], None
        for _ in range(FLAGS.repeats):
            jax.clear_caches()  # jax keeps compiled executables in memory: each repeat must compile anew
            lowered = jax.jit(fn).lower(*args)
            start = time.perf_counter()
            compiled = lowered.compile()
            seconds.append(time.perf_counter() - start)
        entry = {"compile_s_median": float(np.median(seconds)), "compile_s_all": seconds}
        if name in ("lora_gradient", "finetune_step"):
            jax.block_until_ready(compiled(*args))
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                runs.append(time.perf_counter() - start)
            entry["run_s_median"] = float(np.median(runs))
        result[name] = entry
        print(f"{name}: compile {entry['compile_s_median']:.2f} s"
              + (f", run {entry['run_s_median']:.2f} s" if "run_s_median" in entry else ""), flush=True)
    key = f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    existing = read_json(FLAGS.out) if os.path.exists(FLAGS.out) else {}
    existing[key] = {"model": FLAGS.model, "batch": list(shape), "programs": result, **runtime.provenance(sys.argv)}
    write_json(FLAGS.out, existing)


if __name__ == "__main__":
    app.run(main)
