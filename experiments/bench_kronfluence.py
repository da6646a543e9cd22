r"""jaxinf against kronfluence on the CPU: the same GPT-2, tokens, layers, empirical Fisher, damping; one run.

    pip install -e .[bench]          # kronfluence + torch (an optional extra; nothing else needs them)
    python -m experiments.bench_kronfluence                          # 4 x 256 GPT-2, 64 train x 16 query x 128
    python -m experiments.bench_kronfluence --precision=float64      # agreement in float64 (slower)
    python -m experiments.bench_kronfluence --sides=jaxinf           # the jaxinf half only (no torch needed)

Workload: a randomly initialised GPT-2 (--n_layer blocks of width --n_embd, GPT-2's 50257-token vocabulary,
dropout 0) made in Flax (seed --seed) and loaded into torch's GPT2LMHeadModel, so both sides hold the same weights; --n_train and
--n_query sequences of --seq_len random tokens (the same arrays on both sides); the loss of row n is its mean
next-token NLL over tokens 2..T (jaxinf.models.loss; kronfluence's task sums these over the batch). EK-FAC over
every linear layer of the blocks (c_attn, attn c_proj, c_fc, mlp c_proj, with biases; torch's Conv1D layers become
nn.Linear with the transposed weight for kronfluence), empirical Fisher (the data's own labels), eigenvectors of
the covariances in float64, eigenvalue correction from per-example gradients, damping lambda_l = --damping x mean
corrected eigenvalue of layer l (kronfluence: ScoreArguments(damping_factor=None), its 0.1 x mean heuristic).
Scores s[q, n] = <P g_q, g_n> on both sides.

Each side runs in its own subprocess (so its peak RSS is its own) with one thread (torch.set_num_threads(1);
XLA's CPU client with intra-op parallelism 1; OPENBLAS/OMP/MKL_NUM_THREADS=1), fits and scores repeatedly,
and reports the last of --fit_repeats / --score_repeats runs (warm: compiled, caches loaded). Ratios are
jaxinf / kronfluence (below 1: jaxinf faster or smaller). Correlations: Pearson and mean per-query Spearman of the score matrices, and max |difference| /
max |score|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import bench_ekfac  # noqa: E402 (its flags and timing loop are this binary's too)

FLAGS = flags.FLAGS
# From bench_ekfac: --n_train, --n_query, --seq_len, --batch_size, --damping, --seed, --fit_repeats,
# --score_repeats, --out (its --dtype, --workload, --lora_rank do not apply here; see --precision).
for _name, _value in (("n_train", 64), ("n_query", 16), ("seq_len", 128), ("batch_size", 8), ("fit_repeats", 2),
                      ("score_repeats", 2), ("out", "results/bench_kronfluence.json")):
    FLAGS.set_default(_name, _value)
flags.DEFINE_list("sides", ["jaxinf", "kronfluence"], "which implementations to run")
flags.DEFINE_integer("n_layer", 4, "GPT-2 blocks")
flags.DEFINE_integer("n_embd", 256, "GPT-2 width")
flags.DEFINE_integer("n_head", 4, "attention heads")
flags.DEFINE_integer("vocab_size", 50257, "vocabulary (GPT-2's)")
flags.DEFINE_enum("precision", "float32", ["float32", "float64"], "model, statistics and scores dtype, both sides")
flags.DEFINE_integer("threads", 1, "threads per side")
flags.DEFINE_string("_side", None, "internal: run one side in this process and write its results to --_side_out")
flags.DEFINE_string("_side_out", None, "internal")
flags.DEFINE_string("_workdir", None, "internal: the shared model and tokens")


def _thread_env(threads: int) -> dict:
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=" +
                          ("true" if threads > 1 else "false") + f" intra_op_parallelism_threads={n}").strip()}


# --------------------------------------------------------------------------------------------- shared workload
def make_workload(workdir: str) -> None:
    """The GPT-2 (Flax, random init with --seed, save_pretrained) and the token arrays (tokens.npz) in `workdir`.
    Made with jax, so the jaxinf half needs no torch; the kronfluence half loads the same weights into torch."""
    import numpy as np
    import transformers

    config = transformers.GPT2Config(vocab_size=FLAGS.vocab_size, n_embd=FLAGS.n_embd, n_layer=FLAGS.n_layer,
                                     n_head=FLAGS.n_head, n_positions=max(FLAGS.seq_len, 128), resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.FlaxGPT2LMHeadModel(config, seed=FLAGS.seed).save_pretrained(os.path.join(workdir, "model"))
    rng = np.random.default_rng(FLAGS.seed + 1)
    tokens = {name: rng.integers(0, FLAGS.vocab_size, size=(n, FLAGS.seq_len)).astype(np.int32)
              for name, n in (("train", FLAGS.n_train), ("query", FLAGS.n_query))}
    np.savez(os.path.join(workdir, "tokens.npz"), **tokens)


def _batches(ids, batch_size: int) -> list:
    import numpy as np

    out = []
    for s in range(0, len(ids), batch_size):
        b = ids[s:s + batch_size]
        loss_mask = np.ones(b.shape, np.float32)
        loss_mask[:, 0] = 0.0
        out.append({"input_ids": b, "attention_mask": np.ones(b.shape, np.int32), "loss_mask": loss_mask})
    return out


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------------- jaxinf
def run_jaxinf(workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from jaxinf.curvature import capture
    from jaxinf.models import LMFunctions
    from jaxinf.models.causal_lm import CausalLM

    dtype = {"float32": jnp.float32, "float64": jnp.float64}[FLAGS.precision]
    with jax.enable_x64(FLAGS.precision == "float64"):
        path = os.path.join(workdir, "model")
        config = transformers.GPT2Config.from_pretrained(path)
        params = transformers.FlaxGPT2LMHeadModel.from_pretrained(path).params
        module = transformers.FlaxGPT2LMHeadModel(config, dtype=dtype, _do_init=False).module
        params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), params)
        model = CausalLM(name="gpt2-random", family="gpt2", config=config, module=module, params=params,
                         tokenizer=None)
        fns = LMFunctions(model)
        tokens = np.load(os.path.join(workdir, "tokens.npz"))
        train = [jax.tree.map(jnp.asarray, b) for b in _batches(tokens["train"], FLAGS.batch_size)]
        query = [jax.tree.map(jnp.asarray, b) for b in _batches(tokens["query"], FLAGS.batch_size)]
        layers = capture.lm_layers(fns, params)
        rss_before = _rss_mib()
        fits, scores_runs, _, scores = bench_ekfac.measure(
            fns, params, train, query, layers=layers, damping=FLAGS.damping, fit_repeats=FLAGS.fit_repeats,
            score_repeats=FLAGS.score_repeats)
    return {"layers": [l.name for l in layers], "fit_s": [f["total_s"] for f in fits],
            "score_s": [s["total_s"] for s in scores_runs], "rss_before_fit_mib": rss_before,
            "peak_rss_mib": _peak_mib(), "scores": np.asarray(scores, np.float64)}


# ---------------------------------------------------------------------------------------------- kronfluence
def _conv1d_to_linear(model) -> None:
    """Replace transformers' Conv1D (y = x W + b, W [in, out]) by nn.Linear (W^T) so kronfluence tracks them."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                linear = torch.nn.Linear(d_in, d_out, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)


def run_kronfluence(workdir: str) -> dict:
    import numpy as np
    import torch
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    torch.set_num_threads(FLAGS.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[FLAGS.precision]
    from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model

    path = os.path.join(workdir, "model")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(path))
    model = load_flax_checkpoint_in_pytorch_model(model, os.path.join(path, "flax_model.msgpack"))
    model = model.to(dtype).eval()
    _conv1d_to_linear(model)
    tracked = [f"transformer.h.{i}.{m}" for i in range(model.config.n_layer)
               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

    def row_losses(batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
        nll = -torch.gather(logp, -1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["loss_mask"][:, 1:].to(dtype)
        return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # jaxinf's per-example loss

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise ValueError("this benchmark uses the empirical Fisher only")
            return row_losses(batch, model).sum()

        def compute_measurement(self, batch, model):
            return row_losses(batch, model).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids):
            self.rows = _batches(ids, 1)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {k: torch.as_tensor(v[0]).long() if k != "loss_mask" else torch.as_tensor(v[0])
                    for k, v in self.rows[i].items()}

    tokens = np.load(os.path.join(workdir, "tokens.npz"))
    train, query = Rows(tokens["train"]), Rows(tokens["query"])
    task = LMTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=os.path.join(workdir, "kronfluence"))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, covariance_max_examples=None,
                                  lambda_max_examples=None, activation_covariance_dtype=dtype,
                                  gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
                                  lambda_dtype=dtype, per_sample_gradient_dtype=dtype)
    score_args = ScoreArguments(damping_factor=None, score_dtype=dtype, per_sample_gradient_dtype=dtype,
                                precondition_dtype=dtype)
    rss_before = _rss_mib()
    fits, scores_s = [], []
    for _ in range(FLAGS.fit_repeats):
        start = time.perf_counter()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=FLAGS.batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        fits.append(time.perf_counter() - start)
        print(f"kronfluence fit {fits[-1]:.2f} s", flush=True)
    for _ in range(FLAGS.score_repeats):
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name="scores", factors_name="ekfac", query_dataset=query,
                                         train_dataset=train, per_device_query_batch_size=FLAGS.batch_size,
                                         per_device_train_batch_size=FLAGS.batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        scores_s.append(time.perf_counter() - start)
        print(f"kronfluence score {scores_s[-1]:.2f} s", flush=True)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return {"layers": tracked, "fit_s": fits, "score_s": scores_s, "rss_before_fit_mib": rss_before,
            "peak_rss_mib": _peak_mib(), "scores": scores, "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------------ main
def _side_main() -> None:
    import numpy as np

    out = {"jaxinf": run_jaxinf, "kronfluence": run_kronfluence}[FLAGS._side](FLAGS._workdir)
    np.save(FLAGS._side_out + ".scores.npy", out.pop("scores"))
    with open(FLAGS._side_out, "w") as f:
        json.dump(out, f)


def _compare(a, b) -> dict:
    import numpy as np
    import scipy.stats

    rho = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), "mean_query_spearman": float(np.mean(rho)),
            "max_abs_diff_over_max_abs": float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
            "scale_ratio": float(np.linalg.norm(a) / np.linalg.norm(b))}


def main(argv):
    del argv
    if FLAGS._side:
        return _side_main()
    from jaxinf import recipes

    unknown = [s for s in FLAGS.sides if s not in ("jaxinf", "kronfluence")]
    if unknown:
        raise app.UsageError(f"--sides: unknown {unknown}; choose from jaxinf, kronfluence")
    if "kronfluence" in FLAGS.sides and FLAGS.damping != 0.1:
        raise app.UsageError(f"--damping={FLAGS.damping}: kronfluence's relative damping is fixed at 0.1 x the mean "
                             "eigenvalue (HEURISTIC_DAMPING_SCALE); use --damping=0.1 or --sides=jaxinf")
    if "kronfluence" in FLAGS.sides:
        try:
            import kronfluence  # noqa: F401
            import torch  # noqa: F401
        except ImportError as err:
            raise app.UsageError(f"{err}: the kronfluence side needs kronfluence and torch: pip install -e .[bench] "
                                 "(or pip install kronfluence), or run --sides=jaxinf") from err
    import numpy as np

    flag_args = [f"--{k}={FLAGS[k].value}" for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_train",
                                                      "n_query", "seq_len", "batch_size", "damping", "precision",
                                                      "fit_repeats", "score_repeats", "threads", "seed")]
    sides, scores = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        make_workload(workdir)
        for side in FLAGS.sides:
            side_out = os.path.join(workdir, f"{side}.json")
            cmd = [sys.executable, "-m", "experiments.bench_kronfluence", f"--_side={side}",
                   f"--_side_out={side_out}", f"--_workdir={workdir}"] + flag_args
            # torch only where it is used: jaxinf sets USE_TORCH=0 (transformers would import torch, ~0.5 GB)
            env = dict(os.environ, JAXINF_COMPILATION_CACHE="0", USE_TORCH="1" if side == "kronfluence" else "0",
                       **_thread_env(FLAGS.threads))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{side} side failed:\n{proc.stderr[-4000:]}")
            with open(side_out) as f:
                sides[side] = json.load(f)
            scores[side] = np.load(side_out + ".scores.npy")
            print(f"{side}: fit {sides[side]['fit_s']} s, score {sides[side]['score_s']} s, "
                  f"peak RSS {sides[side]['peak_rss_mib']:.0f} MiB", flush=True)
    result = {"config": {k: FLAGS[k].value for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_train",
                                                      "n_query", "seq_len", "batch_size", "damping", "precision",
                                                      "fit_repeats", "score_repeats", "threads", "seed")},
              "command": "python -m experiments.bench_kronfluence " + " ".join(flag_args),
              "cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "sides": sides}
    if len(sides) == 2:
        j, k = sides["jaxinf"], sides["kronfluence"]
        result["ratios_jaxinf_over_kronfluence"] = {
            "fit_warm": j["fit_s"][-1] / k["fit_s"][-1], "score_warm": j["score_s"][-1] / k["score_s"][-1],
            "fit_plus_score_warm": (j["fit_s"][-1] + j["score_s"][-1]) / (k["fit_s"][-1] + k["score_s"][-1]),
            "peak_rss": j["peak_rss_mib"] / k["peak_rss_mib"],
            "peak_rss_above_setup": (j["peak_rss_mib"] - j["rss_before_fit_mib"]) /
                                    (k["peak_rss_mib"] - k["rss_before_fit_mib"])}
        result["agreement"] = _compare(scores["jaxinf"], scores["kronfluence"])
    existing = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            existing = json.load(f)
    c = result["config"]
    existing[f"gpt2-{c['n_layer']}x{c['n_embd']}/{c['n_train']}x{c['n_query']}x{c['seq_len']}/{c['precision']}"] = result
    recipes.write_json(FLAGS.out, existing)
    print(json.dumps({k: v for k, v in result.items() if k != "sides"}, indent=1))


if __name__ == "__main__":
    app.run(main)
