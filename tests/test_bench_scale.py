"""The scale benchmarks at toy sizes, so that they cannot rot: the GPU benchmark (experiments.bench_gpu --toy), the
per-stage memory benchmark on tiny-llama, the cold/warm compilation-cache benchmark, single programs' compilation
times, and the kronfluence side-by-side (its jaxinf half always; the comparison only where kronfluence and torch
are installed)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=3600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               JAXINF_COMPILATION_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # over a minute of CPU: the default job stays near 10 minutes
def test_bench_gpu_toy_parts_a_and_b(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["experiments.bench_gpu", "--toy", "--parts=gpt2,llama7b", f"--out={out}"], tmp_path)
    (result,) = json.loads(out.read_text()).values()
    gpt2, llama = result["parts"]["gpt2"], result["parts"]["llama7b"]
    assert gpt2["scores_shape"] == [4, 8] and llama["scores_shape"] == [4, 8]
    assert gpt2["layers"] == 12  # 2 blocks x (q, k, v, o, up, down): the decoder splits GPT-2's c_attn
    assert llama["layers"] == 8 and llama["lora"]["targets"] == ["q_proj", "v_proj"]  # 2 blocks x 2 x (A, B)
    assert llama["dtype"] == "bfloat16" and llama["base_params"] > 0
    for part in (gpt2, llama):
        assert part["fit"][0]["total_s"] > 0 and part["score"][0]["pairs_per_s"] > 0
        assert part["memory_after_score"]["peak_rss_mib"] > 0
    assert llama["per_example_gradients"][0]["rows_per_s"] > 0


@pytest.mark.slow
def test_bench_gpu_toy_study_part(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["experiments.bench_gpu", "--toy", "--parts=study", f"--out={out}"], tmp_path)
    (result,) = json.loads(out.read_text()).values()
    study = result["parts"]["study"]
    assert study["failed"] == [] and set(study["methods"]) == {"grad_dot", "ekfac"}


@pytest.mark.slow
def test_bench_gpu_toy_ihvp_error_part(tmp_path):
    """Part (d), the study's first explanation for all three curvatures, with the iterative references forced."""
    out = tmp_path / "gpu.json"
    _run(["experiments.bench_gpu", "--toy", "--parts=ihvp_error", f"--out={out}"], tmp_path)
    (result,) = json.loads(out.read_text()).values()
    refs = result["parts"]["ihvp_error"]["references"]
    assert [r["curvature"] for r in refs] == ["fisher", "ggn", "hessian"]
    assert all(np.isfinite(r["residual"]) and 0 <= r["metrics"]["cover"] <= 1 for r in refs), refs
    assert refs[0]["residual"] == 0.0  # the Fisher's Woodbury reference is exact


@pytest.mark.slow  # over a minute of CPU: the default job stays near 10 minutes
def test_bench_memory_tiny(tmp_path):
    out = tmp_path / "mem.json"
    _run(["experiments.bench_memory", "--model=tiny-llama", "--limit_train=8", "--limit_test=4", "--epochs=1",
          "--methods=grad_dot,ekfac,repsim", f"--out={out}"], tmp_path)
    (result,) = json.loads(out.read_text()).values()
    names = [s["stage"] for s in result["stages"]]
    assert names == ["load_model", "tokenize", "finetune", "gradients_train", "gradients_test",
                     "ground_truth_trajectory", "ground_truth_lds", "grad_dot", "kfac_fit", "ekfac", "repsim"]
    for s in result["stages"]:
        assert s["peak_rss_mib"] >= max(s["rss_start_mib"], s["rss_end_mib"]) > 0
    assert result["peak_rss_mib"] == max(s["peak_rss_mib"] for s in result["stages"])
    assert result["n_train"] == 8 and result["n_test"] == 4 and result["model_weights_mib"] > 0


@pytest.mark.slow
def test_bench_compile_cache_tiny(tmp_path):
    out = tmp_path / "cc.json"
    _run(["experiments.bench_compile_cache", "--binary=experiments.finetune",
          "--args=--model=tiny-llama --data=backdoor --steps=2 --limit_train=8 --workdir={workdir}", f"--out={out}"],
         tmp_path)
    (result,) = json.loads(out.read_text()).values()
    assert result["runs"]["off"]["cache_bytes_after"] == 0 and result["cache_mib"] > 0
    assert np.isfinite(result["warm_over_cold"])
    assert result["runs"]["cold"]["xla_compilations"] > 0 and result["runs"]["cold"]["xla_compile_seconds_logged"] > 0


@pytest.mark.slow
def test_bench_compile_programs_tiny(tmp_path):
    out = tmp_path / "programs.json"
    _run(["experiments.bench_compile_programs", "--model=tiny-llama", "--repeats=1", "--seq_len=8",
          f"--out={out}"], tmp_path)
    (result,) = json.loads(out.read_text()).values()
    programs = result["programs"]
    assert set(programs) == {"lora_gradient", "finetune_step", "tree_norm", "global_norm", "adamw_update",
                             "adamw_update_flattened"}
    assert all(p["compile_s_median"] > 0 for p in programs.values())
    assert programs["finetune_step"]["run_s_median"] > 0


_KF_TOY = ["--n_layer=2", "--n_embd=32", "--n_head=4", "--vocab_sizes=128", "--n_train=8", "--n_query=4",
           "--seq_len=16", "--batch_size=4", "--warm_repeats=1", "--cores=1", "--query_batch_sizes=all,2"]


@pytest.mark.slow
def test_bench_kronfluence_jaxinf_half_toy(tmp_path):
    out = tmp_path / "kf.json"
    _run(["experiments.bench_kronfluence", "--sides=jaxinf", f"--out={out}"] + _KF_TOY, tmp_path)
    side = json.loads(out.read_text())["settings"]["vocab=128/cores=1"]["jaxinf"]
    assert side["affinity"] == [0] and side["layers"] == 12  # pinned to one core; 6 linear layers per block
    assert side["fit"]["median_s"] > 0 and len(side["fit"]["warm_s"]) == 1 and len(side["fit"]["cold_s"]) == 1
    assert set(side["score"]) == {"all", "2"} and 0 < side["fit"]["cpu_over_wall"] < 1.5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="kronfluence not installed (extra: bench)")
def test_bench_kronfluence_agrees_in_float64(tmp_path):
    out = tmp_path / "kf.json"
    _run(["experiments.bench_kronfluence", "--precision=float64", "--orders=jaxinf_first", f"--out={out}"] + _KF_TOY,
         tmp_path)
    setting = json.loads(out.read_text())["settings"]["vocab=128/cores=1"]
    for query_batch in ("all", "2"):  # same maths: equal to float64 rounding, with either query batching
        agreement = setting["agreement"][query_batch]
        assert agreement["max_abs_diff_over_max_abs"] < 1e-8, agreement
    assert setting["kronfluence"]["torch_threads"] == 1 and setting["kronfluence"]["affinity"] == [0]
    assert setting["ratios_jaxinf_over_kronfluence"]["fit"] > 0
