r"""One accelerator benchmark, three parts, one JSON: GPT-2 small EK-FAC, a Llama-7B-geometry LoRA, the study binary.

    python -m experiments.bench_gpu                                     # the full sizes (~10 min on one H100/H200)
    python -m experiments.bench_gpu --parts=gpt2 --dtype=bfloat16
    python -m experiments.bench_gpu --toy --out=/tmp/bench_gpu.json     # seconds on a CPU (what the test runs)

(a) gpt2: GPT-2 small (random weights on jaxinf's decoder; `experiments.bench_ekfac`'s workload, flags and timing
    loop), EK-FAC over all 72 linear layers (full parameters; q, k, v, o, up, down per block: c_attn split),
    empirical Fisher, relative damping --damping, --n_train x --n_query sequences of --seq_len random tokens in
    batches of --batch_size, model in --dtype. Fit = covariance pass + float64 eigendecomposition + eigenvalue
    correction; score = query gradients -> EK-FAC preconditioning -> contraction with the captured training
    layers. The reference for the full sizes (1000 x 100 x 512): kronfluence 1.0.1 on an H100 (c_attn one
    layer: 48 layers), 51.7 s fit + 29.9 s score in float32, 47.3 s + 14.4 s in bfloat16, 35-42 GiB.
(b) llama7b: the Llama-2-7B geometry (32 layers, width 4096, MLP 11008, 32 heads, vocabulary 32000) on jaxinf's
    decoder with random weights N(0, 0.02) (norm scales 1) in --llama_dtype (bfloat16) made directly on the
    device, LoRA rank 8 on q_proj and v_proj (B ~ N(0, 0.01) so every adapter has a gradient): per-example LoRA
    gradients of the training rows (streamed and discarded: throughput), EK-FAC fit over the 128 adapter
    matrices, --llama_query x --llama_train scores.
(c) study: `python -m experiments.attribute --preset=paper` on --study_data in a fresh workdir (wall seconds).
(d) ihvp_error: `python -m experiments.ihvp_error` on SmolLM2 (quick preset) and --study_data with the Fisher, the
    GGN and the Hessian (the study's first explanation for all three curvatures; on a 2-core CPU the model-based
    references take hours). Its JSON and figure are kept in --ihvp_error_dir.

Every part reports wall seconds per phase (first run includes compilation unless the persistent compilation
cache is warm; --fit_repeats / --score_repeats > 1 add warm runs) and the device's peak_bytes_in_use (accelerators) / the process's
maximum RSS. The parts run in one process, so the peak device memory of a later part includes nothing freed
late by an earlier one only if the allocator returned it: run one --parts at a time for clean peaks.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import bench_ekfac
from jaxinf import attribution, recipes, runtime
from jaxinf.curvature import capture
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, param_count

FLAGS = flags.FLAGS
# bench_ekfac's flags are this binary's too (one workload code): --n_train, --n_query, --seq_len, --batch_size,
# --dtype size part (a); --damping, --seed, --lora_rank, --query_batches_per_pass, --fit_repeats and
# --score_repeats apply to (a) and (b). Defaults here: the full sizes, one run of each phase.
for _name, _value in (("n_train", 1000), ("n_query", 100), ("seq_len", 512), ("batch_size", 8), ("fit_repeats", 1),
                      ("score_repeats", 1), ("out", "results/bench_gpu.json")):
    FLAGS.set_default(_name, _value)
PARTS = ("gpt2", "llama7b", "study", "ihvp_error")
flags.DEFINE_list("parts", list(PARTS), "which of " + ", ".join(PARTS) + " to run")
flags.DEFINE_bool("toy", False, "tiny sizes of every part (a CPU test in seconds); overrides the size flags")
flags.DEFINE_enum("llama_dtype", "bfloat16", ["float32", "bfloat16"], "Llama weights' dtype")
flags.DEFINE_integer("llama_train", 1000, "Llama training sequences")
flags.DEFINE_integer("llama_query", 100, "Llama query sequences")
flags.DEFINE_integer("llama_seq_len", 512, "Llama tokens per sequence")
flags.DEFINE_integer("llama_batch", 8, "Llama sequences per batch (fitting, scoring, per-example gradients)")
flags.DEFINE_string("study_data", "../shared/paper_datasets/backdoor", "study dataset for part (c)")
flags.DEFINE_string("study_args", "", "extra arguments for the study binary, e.g. '--limit_train=100'")
flags.DEFINE_string("ihvp_error_args", "--curvatures=fisher,ggn,hessian --dampings=0.01,0.1,1,10,100 --queries=16 "
                    "--rows=16 --cg_iters=2,4,8,16,32,64 --lissa_depths=16,64,256,1024 --lanczos_iters=8,16,32,48 "
                    "--ref_iters=1000", "arguments of part (d)")
flags.DEFINE_string("ihvp_error_dir", "results/why_influence_fails/ihvp_error_gpu", "part (d)'s workdir (kept)")

LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
LLAMA_TOY = dict(LLAMA_7B, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
GPT2_TOY = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def _device_memory() -> dict:
    return bench_ekfac._peak_memory()


def random_llama(hf_config: dict, dtype, seed: int):
    """A Llama `DecoderLM` (config.json keys `hf_config`) with random weights N(0, 0.02) (norm scales 1) made on
    the device in `dtype` by one jitted `decoder.init_params`: no host copy (7B parameters in bfloat16 are
    13.5 GB)."""
    from jaxinf.models import DecoderLM, decoder

    config = decoder.from_hf_config(hf_config)
    params = jax.jit(decoder.init_params, static_argnums=(0, 2))(config, jax.random.key(seed), dtype)
    return DecoderLM(name="llama-7b-geometry-random" if config.hidden_size == 4096 else "llama-toy-random",
                     family="llama", config=config, params=params, tokenizer=None)


def part_gpt2(sizes: dict) -> dict:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    model = bench_ekfac._gpt2_small(dtype, FLAGS.seed, **sizes.get("gpt2_config", {}))
    fns, trainable = LMFunctions(model), model.params
    layers = capture.lm_layers(fns, trainable)
    vocab = int(model.config.vocab_size)
    train = bench_ekfac._random_batches(sizes["gpt2_train"], sizes["gpt2_seq_len"], sizes["gpt2_batch"], vocab,
                                        FLAGS.seed + 1)
    query = bench_ekfac._random_batches(sizes["gpt2_query"], sizes["gpt2_seq_len"], sizes["gpt2_batch"], vocab,
                                        FLAGS.seed + 2)
    fits, scores_runs, fit_memory, scores = bench_ekfac.measure(
        fns, trainable, train, query, layers=layers, damping=FLAGS.damping, fit_repeats=FLAGS.fit_repeats,
        score_repeats=FLAGS.score_repeats, query_batches_per_pass=FLAGS.query_batches_per_pass or None)
    return {"model": model.name, "dtype": FLAGS.dtype, "layers": len(layers), "params": param_count(trainable),
            "sizes": {k: sizes[k] for k in ("gpt2_train", "gpt2_query", "gpt2_seq_len", "gpt2_batch")},
            "fit": fits, "score": scores_runs, "scores_shape": list(scores.shape),
            "memory_after_fit": fit_memory, "memory_after_score": _device_memory(),
            "reference_kronfluence_h100": {"float32": {"fit_s": 51.7, "score_s": 29.9},
                                           "bfloat16": {"fit_s": 47.3, "score_s": 14.4}, "peak_gib": [35, 42]}}


def part_llama(sizes: dict) -> dict:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.llama_dtype]
    start = time.perf_counter()
    model = random_llama(sizes["llama_config"], dtype, FLAGS.seed)
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - start
    lora = LoraConfig(rank=FLAGS.lora_rank, alpha=2.0 * FLAGS.lora_rank)
    adapters = init_adapters(jax.random.key(FLAGS.seed), model, lora, b_std=0.01)
    fns = LMFunctions(model, lora)
    layers = capture.lm_layers(fns, adapters)
    vocab = int(model.config.vocab_size)
    n, q, t, b = (sizes[k] for k in ("llama_train", "llama_query", "llama_seq_len", "llama_batch"))
    train = bench_ekfac._random_batches(n, t, b, vocab, FLAGS.seed + 1)
    query = bench_ekfac._random_batches(q, t, b, vocab, FLAGS.seed + 2)
    grad_runs = []
    for _ in range(FLAGS.fit_repeats):  # per-example LoRA gradients of every training row, streamed (not kept)
        start = time.perf_counter()
        arrays = {k: np.concatenate([np.asarray(x[k]) for x in train]) for k in train[0]}
        last = None
        for _, g in attribution.iter_per_example_gradients(fns, adapters, arrays, chunk_size=b):
            last = g
        jax.block_until_ready(last)
        elapsed = time.perf_counter() - start
        grad_runs.append({"total_s": elapsed, "rows_per_s": n / elapsed})
        print(f"per-example gradients: {grad_runs[-1]}", flush=True)
    grad_memory = _device_memory()
    fits, scores_runs, fit_memory, scores = bench_ekfac.measure(
        fns, adapters, train, query, layers=layers, damping=FLAGS.damping, fit_repeats=FLAGS.fit_repeats,
        score_repeats=FLAGS.score_repeats, query_batches_per_pass=FLAGS.query_batches_per_pass or None)
    return {"model": model.name, "dtype": FLAGS.llama_dtype, "base_params": param_count(model.params),
            "lora": {"rank": lora.rank, "targets": list(lora.targets), "params": param_count(adapters)},
            "layers": len(layers), "sizes": {"train": n, "query": q, "seq_len": t, "batch": b},
            "init_s": init_s, "per_example_gradients": grad_runs, "memory_after_gradients": grad_memory,
            "fit": fits, "score": scores_runs, "scores_shape": list(scores.shape),
            "memory_after_fit": fit_memory, "memory_after_score": _device_memory()}


def _run_binary(module: str, workdir: str, args: str, result_file: str) -> tuple[list, float, dict]:
    """(command, wall seconds, its JSON results) of `python -m module` on --study_data, writing to `workdir`."""
    cmd = [sys.executable, "-m", module, f"--data={FLAGS.study_data}", f"--workdir={workdir}",
           f"--seed={FLAGS.seed}"] + shlex.split(args)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, result_file)) as f:
        return cmd, seconds, json.load(f)


def part_study(extra_args: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        cmd, seconds, results = _run_binary("experiments.attribute", workdir, "--preset=paper " + extra_args,
                                            "results.json")
    methods = {m: {"seconds": d.get("seconds"), "auc": (d.get("auc") or {}).get("value")}
               for m, d in results["methods"].items() if "error" not in d}
    return {"command": " ".join(cmd[1:]).replace(workdir, "<tmp>"), "wall_s": seconds,
            "n_train": results["n_train"], "n_test": results["n_test"], "methods": methods,
            "failed": [m for m, d in results["methods"].items() if "error" in d]}


def part_ihvp_error(args: str, workdir: str) -> dict:
    cmd, seconds, results = _run_binary("experiments.ihvp_error", workdir, args, "ihvp_error.json")
    references = [{k: r[k] for k in ("curvature", "damping_fraction", "seconds", "metrics")} |
                  {"residual": r["reference"]["relative_residual"]} for r in results["references"]]
    return {"command": " ".join(cmd[1:]), "wall_s": seconds, "references": references,
            "solver_failures": sum("error" in r for r in results["solvers"])}


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    unknown = [p for p in FLAGS.parts if p not in PARTS]
    if unknown:
        raise app.UsageError(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if FLAGS.toy:
        sizes = dict(gpt2_train=8, gpt2_query=4, gpt2_seq_len=16, gpt2_batch=4, gpt2_config=GPT2_TOY,
                     llama_train=8, llama_query=4, llama_seq_len=16, llama_batch=4, llama_config=LLAMA_TOY)
        study_args = "--model=tiny-llama --data=backdoor --limit_train=8 --limit_test=4 --epochs=1 " \
                     "--methods=grad_dot,ekfac --bootstrap=10 " + FLAGS.study_args
        ihvp_args = "--model=tiny-llama --data=backdoor --limit_train=8 --limit_test=4 --queries=2 --rows=2 " \
                    "--dampings=1 --cg_iters=2 --lissa_depths=8 --lanczos_iters=4 --dense_max=0 --ref_iters=20"
    else:
        sizes = dict(gpt2_train=FLAGS.n_train, gpt2_query=FLAGS.n_query, gpt2_seq_len=FLAGS.seq_len,
                     gpt2_batch=FLAGS.batch_size, **{k: FLAGS[k].value for k in (
                         "llama_train", "llama_query", "llama_seq_len", "llama_batch")})
        sizes["llama_config"] = LLAMA_7B
        study_args, ihvp_args = FLAGS.study_args, FLAGS.ihvp_error_args
    result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
              "jax": jax.__version__, "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
              "toy": FLAGS.toy, "compilation_cache": runtime.compilation_cache_dir(), "parts": {}}
    for part in FLAGS.parts:
        start = time.perf_counter()
        if part == "gpt2":
            out = part_gpt2(sizes)
        elif part == "llama7b":
            out = part_llama(sizes)
        elif part == "study":
            out = part_study(study_args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out = part_ihvp_error(ihvp_args, os.path.join(tmp, "ihvp_error") if FLAGS.toy else FLAGS.ihvp_error_dir)
        out["part_wall_s"] = time.perf_counter() - start
        result["parts"][part] = out
        print(f"{part}: {out['part_wall_s']:.1f} s", flush=True)
    existing = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            existing = json.load(f)
    key = f"{result['device']}/{'toy' if FLAGS.toy else 'full'}/{','.join(FLAGS.parts)}/gpt2-{FLAGS.dtype}"
    existing[key] = result
    recipes.write_json(FLAGS.out, existing)
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    app.run(main)
