r"""LoRA fine-tuning throughput (tokens/s) of the library's jitted train step; writes JSON.

    python -m experiments.bench_finetune --model=smollm2-135m-instruct --out=results/bench_finetune_cpu.json

Tokens counted = batch_size x seq_len per optimiser step (padding included: the step's cost). The first
step (compilation) is timed separately; the rest are timed one by one and summarised by their median.
"""

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxinf import recipes, runtime, sharding, training
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model, param_count

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "model name or local directory")
flags.DEFINE_integer("batch_size", 8, "rows per step")
flags.DEFINE_integer("seq_len", 64, "tokens per row")
flags.DEFINE_integer("steps", 5, "timed steps after the compiling one")
flags.DEFINE_integer("lora_rank", 4, "LoRA rank")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and activation dtype")
flags.DEFINE_string("mesh", None, "device mesh, e.g. data=8 or data=2,model=4 (jaxinf.sharding; default: one device)")
flags.DEFINE_string("out", "results/bench_finetune.json", "JSON output path")


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    try:
        mesh = sharding.parse_mesh(FLAGS.mesh)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    model = load_model(FLAGS.model, dtype=dtype)
    lora = LoraConfig(rank=FLAGS.lora_rank)
    fns = LMFunctions(model, lora)
    adapters = sharding.replicate(init_adapters(jax.random.key(0), model, lora), mesh)
    config = training.TrainConfig(steps=FLAGS.steps + 1, batch_size=FLAGS.batch_size, lr=1e-4)
    optimizer = training.make_optimizer(config, FLAGS.steps + 1)
    step = training.make_train_step(fns, optimizer, grad_accum=1, mesh=mesh)
    rng = np.random.default_rng(0)
    shape = (FLAGS.batch_size, FLAGS.seq_len)
    batch = {"input_ids": jnp.asarray(rng.integers(0, model.config.vocab_size, shape), jnp.int32),
             "attention_mask": jnp.ones(shape, jnp.int32), "loss_mask": jnp.ones(shape, jnp.float32)}
    batch = sharding.shard_rows(batch, mesh, "--batch_size")
    opt_state = optimizer.init(adapters)
    t0 = time.perf_counter()
    state = step(adapters, opt_state, adapters, batch, jax.random.key(0))
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(FLAGS.steps):
        t0 = time.perf_counter()
        state = step(state[0], state[1], adapters, batch, jax.random.key(i + 1))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    tokens = FLAGS.batch_size * FLAGS.seq_len
    result = {
        "model": model.name, "dtype": FLAGS.dtype, "mesh": sharding.describe(mesh),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(), "cpu": platform.processor() or platform.machine(),
        "base_params": param_count(model.params), "lora_params": param_count(adapters),
        "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len, "first_step_s": compile_s,
        "step_s_median": float(np.median(times)), "step_s_all": times,
        "tokens_per_s": tokens / float(np.median(times)), "jax": jax.__version__,
    }
    recipes.write_json(FLAGS.out, result)
    print(f"{model.name} LoRA r={FLAGS.lora_rank} {FLAGS.dtype} on {result['platform']}: "
          f"{result['tokens_per_s']:.0f} tokens/s (median step {result['step_s_median']:.2f} s, batch {shape})")


if __name__ == "__main__":
    app.run(main)
