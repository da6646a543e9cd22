r"""jaxinf against kronfluence on the CPU, at equal cores: the same GPT-2, tokens, layers, empirical Fisher, damping.

    pip install -e .[bench]          # kronfluence + torch (an optional extra; nothing else needs them)
    python -m experiments.bench_kronfluence                          # the fair harness (about 25 minutes, 2 cores)
    python -m experiments.bench_kronfluence --precision=float64 ...  # agreement in float64 (slower)
    python -m experiments.bench_kronfluence --sides=jaxinf           # the jaxinf half only (no torch needed)

Workload: a randomly initialised GPT-2 (--n_layer blocks of width --n_embd, dropout 0) made on jaxinf's decoder
(seed --seed), written as a Hugging Face folder (config.json + model.safetensors, `hf_weights.save_decoder`) that
jaxinf (`hf_weights.load_decoder`) and torch's GPT2LMHeadModel (`from_pretrained`) both load, so both sides hold
the same weights; --n_train and --n_query sequences of --seq_len random tokens (the same arrays on both sides).
Each vocabulary in --vocab_sizes is its own workload (50257, GPT-2's, makes the untracked output layer most of each
pass's matmul FLOPs; 2000 makes the tracked layers most). The loss of row n is its mean next-token NLL over tokens
2..T (jaxinf.models.loss; kronfluence's task sums these over the batch). EK-FAC over every linear layer of the
blocks (q, k, v, attn c_proj, c_fc, mlp c_proj, with biases: jaxinf's decoder splits GPT-2's fused c_attn into q, k
and v projections, so for kronfluence each c_attn becomes three nn.Linear layers and every other Conv1D an
nn.Linear with the transposed weight), empirical Fisher, eigenvectors in float64, eigenvalue correction from
per-example gradients, damping lambda_l = 0.1 x mean corrected eigenvalue of layer l (kronfluence:
ScoreArguments(damping_factor=None), its heuristic). Scores s[q, n] = <P g_q, g_n>.

Fairness:
  * cores: each side runs in its own subprocess whose CPU affinity is set to cores 0..c-1 before Python starts
    (os.sched_setaffinity in the child), for each c in --cores. torch gets torch.set_num_threads(c) and
    OMP/MKL/OPENBLAS_NUM_THREADS=c; XLA's CPU client sizes its intra-op pool from the affinity mask. Each phase's
    CPU time (user + system, all threads, getrusage) over its wall time is recorded: about 1.0 for one core.
  * work: the same training batches (--batch_size) on both sides; the query side in each of --query_batch_sizes
    ("all": every query in one batch, one pass over the training rows on both sides; k: batches of k, one training
    pass per query batch on both sides).
  * order and noise: both orders (jaxinf first, kronfluence first), each side a fresh process that runs one cold
    fit / score (compilation, caches) and then --warm_repeats warm ones; medians over the warm runs of both orders.
  * memory: peak RSS of each side's process (getrusage ru_maxrss) and its RSS before the first fit.
Ratios are jaxinf / kronfluence (below 1: jaxinf faster or smaller). Agreement: Pearson and mean per-query Spearman
of the two score matrices, and max |difference| / max |score|.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("sides", ["jaxinf", "kronfluence"], "which implementations to run")
flags.DEFINE_integer("n_layer", 4, "GPT-2 blocks")
flags.DEFINE_integer("n_embd", 256, "GPT-2 width")
flags.DEFINE_integer("n_head", 4, "attention heads")
flags.DEFINE_list("vocab_sizes", ["50257", "2000"], "vocabularies, one workload each (50257: GPT-2's)")
flags.DEFINE_integer("n_train", 64, "training sequences")
flags.DEFINE_integer("n_query", 16, "query sequences")
flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
flags.DEFINE_integer("batch_size", 8, "training sequences per batch (fit and score, both sides)")
flags.DEFINE_list("query_batch_sizes", ["all", "8"], "query batch settings: 'all' (one batch) or a batch size")
flags.DEFINE_list("cores", ["1", "2"], "cores per side (CPU affinity 0..c-1), one setting each")
flags.DEFINE_integer("warm_repeats", 2, "warm fits and scores per side process (after one cold run); both orders "
                     "run, so each median is over 2 x this many")
flags.DEFINE_enum("orders", "both", ["both", "jaxinf_first"], "side orders to run")
flags.DEFINE_float("damping", 0.1, "relative damping (kronfluence's is fixed at 0.1 x the mean eigenvalue)")
flags.DEFINE_enum("precision", "float32", ["float32", "float64"], "model, statistics and scores dtype, both sides")
flags.DEFINE_integer("seed", 0, "seed for the weights and tokens")
flags.DEFINE_string("out", "results/bench_kronfluence.json", "results JSON")
flags.DEFINE_string("_side", None, "internal: run one side in this process and write its results to --_side_out")
flags.DEFINE_string("_side_out", None, "internal")
flags.DEFINE_string("_workdir", None, "internal: the shared model and tokens")
flags.DEFINE_integer("_vocab", None, "internal: this workload's vocabulary")
flags.DEFINE_integer("_threads", None, "internal: cores of this side process")

_WORKLOAD_FLAGS = ("n_layer", "n_embd", "n_head", "n_train", "n_query", "seq_len", "batch_size", "damping",
                   "precision", "warm_repeats", "seed")


def _query_batch(setting: str) -> int:
    return FLAGS.n_query if setting == "all" else int(setting)


# --------------------------------------------------------------------------------------------- shared workload
def make_workload(workdir: str, vocab: int) -> None:
    """The GPT-2 (jaxinf's decoder, random init with --seed, written by hf_weights.save_decoder to workdir/model)
    and the token arrays (tokens.npz) in `workdir`. Made with jax, so the jaxinf half needs no torch; the
    kronfluence half loads the same weights into torch."""
    import jax
    import numpy as np

    from jaxinf.models import decoder, hf_weights
    from jaxinf.workdir import write_npz

    hf_config = dict(model_type="gpt2", vocab_size=vocab, n_embd=FLAGS.n_embd, n_layer=FLAGS.n_layer,
                     n_head=FLAGS.n_head, n_positions=max(FLAGS.seq_len, 128), resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    params = decoder.init_params(decoder.from_hf_config(hf_config), jax.random.key(FLAGS.seed), "float32")
    hf_weights.save_decoder(os.path.join(workdir, "model"), hf_config, params)
    rng = np.random.default_rng(FLAGS.seed + 1)
    tokens = {name: rng.integers(0, vocab, size=(n, FLAGS.seq_len)).astype(np.int32)
              for name, n in (("train", FLAGS.n_train), ("query", FLAGS.n_query))}
    write_npz(os.path.join(workdir, "tokens.npz"), **tokens)


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
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn) -> tuple:
    """(fn(), wall seconds, CPU seconds of this process: user + system over all its threads)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return out, wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _repeat(label: str, fn) -> tuple:
    """One cold and --warm_repeats warm runs of fn: (last output, [{"wall_s", "cpu_s"}, ...]; index 0 is cold)."""
    runs, out = [], None
    for r in range(1 + FLAGS.warm_repeats):
        out, wall, cpu = _timed(fn)
        runs.append({"wall_s": wall, "cpu_s": cpu})
        print(f"{FLAGS._side} {label} {'cold' if r == 0 else 'warm'}: {wall:.2f} s wall, {cpu:.2f} s CPU",
              flush=True)
    return out, runs


# --------------------------------------------------------------------------------------------------- jaxinf
def run_jaxinf(workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinf.attribution import contracted
    from jaxinf.curvature import capture, kfac
    from jaxinf.ihvp.damping import relative
    from jaxinf.ihvp.ekfac import ekfac
    from jaxinf.models import DecoderLM, LMFunctions, hf_weights

    dtype = {"float32": jnp.float32, "float64": jnp.float64}[FLAGS.precision]
    with jax.enable_x64(FLAGS.precision == "float64"):
        config, params = hf_weights.load_decoder(os.path.join(workdir, "model"), dtype)
        model = DecoderLM(name="gpt2-random", family="gpt2", config=config, params=params, tokenizer=None)
        fns = LMFunctions(model)
        tokens = np.load(os.path.join(workdir, "tokens.npz"))
        train = [jax.tree.map(jnp.asarray, b) for b in _batches(tokens["train"], FLAGS.batch_size)]
        layers = capture.lm_layers(fns, params)
        solver = ekfac(relative(FLAGS.damping))
        rss_before = _rss_mib()

        stages = {}

        def fit():
            factors = kfac.fit_factors(fns, params, train, layers=layers, timings=stages)
            return jax.block_until_ready(solver.fit(factors, params))

        state, fits = _repeat("fit", fit)
        peak_after_fit = _peak_mib()
        scores, score_runs = {}, {}
        for setting in FLAGS.query_batch_sizes:
            query = [jax.tree.map(jnp.asarray, b) for b in _batches(tokens["query"], _query_batch(setting))]
            scores[setting], score_runs[setting] = _repeat(
                f"score (query batch {setting})",
                lambda: contracted.pairwise_scores(fns, params, query, train, solver, state,
                                                   query_batches_per_pass=1))
        peak = _peak_mib()  # before the profile's own arrays
        profile = dict(fit_stages_s=dict(stages), **profile_passes(fns, params, train, layers))
    return {"layers": [l.name for l in layers], "fit": fits, "score": score_runs, "rss_before_fit_mib": rss_before,
            "peak_rss_after_fit_mib": peak_after_fit, "peak_rss_mib": peak,
            "scores": {k: np.asarray(v, np.float64) for k, v in scores.items()},
            "profile": profile, "jax": jax.__version__}


def profile_passes(fns, params, train, layers) -> dict:
    """Warm wall seconds, summed over the training batches, of the parts every EK-FAC pass is made of:
    the forward loss alone; a capture (forward + backward to the zero taps, no statistic); the untracked output
    layer's two matmuls of that capture (logits = h W_vocab and the cotangent of h, dlogits W_vocab^T). A pass's
    time minus the capture's is its statistics (covariance einsums, eigenbasis rotations, score contractions)."""
    import jax
    import jax.numpy as jnp

    from jaxinf.curvature import capture

    forward = jax.jit(lambda p, b: jnp.sum(fns.per_example_loss(p, b)))
    tap_pass = jax.jit(lambda p, b: sum(jnp.sum(g[..., :1]) for _, g in
                                        capture.capture_with_losses(fns, p, b, layers)[0].values()))
    head = fns.model.params["embed"]  # GPT-2's tied head [V, d]

    @jax.jit
    def head_matmuls(h, dlogits, w):
        return jnp.sum(h @ w.T) + jnp.sum(dlogits @ w)

    def total(fn, args_per_batch) -> float:
        for args in args_per_batch[:1]:
            jax.block_until_ready(fn(*args))  # compile
        start = time.perf_counter()
        for args in args_per_batch:
            jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    key = jax.random.key(0)
    tokens = train[0]["input_ids"].size  # every batch has this shape here
    one = (jax.random.normal(key, (tokens, head.shape[1]), head.dtype),
           jax.random.normal(key, (tokens, head.shape[0]), head.dtype), head)
    head_args = [one] * len(train)
    return {"forward_s": total(forward, [(params, b) for b in train]),
            "capture_s": total(tap_pass, [(params, b) for b in train]),
            "output_layer_matmuls_s": total(head_matmuls, head_args)}


# ---------------------------------------------------------------------------------------------- kronfluence
def _conv1d_to_linear(model) -> None:
    """Replace transformers' Conv1D (y = x W + b, W [in, out]) by nn.Linear (W^T) so kronfluence tracks them, each
    fused attn.c_attn by three (q, k, v: the projections of jaxinf's decoder) whose outputs are concatenated."""
    import torch
    from transformers.pytorch_utils import Conv1D

    def linear(weight, bias):  # from Conv1D's weight [in, out]
        layer = torch.nn.Linear(*weight.shape, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.T)
            layer.bias.copy_(bias)
        return layer

    class SplitQKV(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            d = conv.weight.shape[1] // 3
            self.q, self.k, self.v = (linear(conv.weight[:, j * d:(j + 1) * d], conv.bias[j * d:(j + 1) * d])
                                      for j in range(3))

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                setattr(module, child_name,
                        SplitQKV(child) if child_name == "c_attn" else linear(child.weight, child.bias))


def run_kronfluence(workdir: str) -> dict:
    import numpy as np
    import torch
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    torch.set_num_threads(FLAGS._threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[FLAGS.precision]
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(workdir, "model"))  # float32, as written
    model = model.to(dtype).eval()
    _conv1d_to_linear(model)
    tracked = [f"transformer.h.{i}.{m}" for i in range(model.config.n_layer)
               for m in ("attn.c_attn.q", "attn.c_attn.k", "attn.c_attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

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
                        output_dir=os.path.join(workdir, f"kronfluence-{os.getpid()}"))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, covariance_max_examples=None,
                                  lambda_max_examples=None, activation_covariance_dtype=dtype,
                                  gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
                                  lambda_dtype=dtype, per_sample_gradient_dtype=dtype)
    score_args = ScoreArguments(damping_factor=None, score_dtype=dtype, per_sample_gradient_dtype=dtype,
                                precondition_dtype=dtype)
    rss_before = _rss_mib()
    _, fits = _repeat("fit", lambda: analyzer.fit_all_factors(
        factors_name="ekfac", dataset=train, per_device_batch_size=FLAGS.batch_size, factor_args=factor_args,
        overwrite_output_dir=True))
    peak_after_fit = _peak_mib()
    scores, score_runs = {}, {}
    for setting in FLAGS.query_batch_sizes:
        def score():
            analyzer.compute_pairwise_scores(
                scores_name="scores", factors_name="ekfac", query_dataset=query, train_dataset=train,
                per_device_query_batch_size=_query_batch(setting), per_device_train_batch_size=FLAGS.batch_size,
                score_args=score_args, overwrite_output_dir=True)
            return analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()

        scores[setting], score_runs[setting] = _repeat(f"score (query batch {setting})", score)
    return {"layers": tracked, "fit": fits, "score": score_runs, "rss_before_fit_mib": rss_before,
            "peak_rss_after_fit_mib": peak_after_fit, "peak_rss_mib": _peak_mib(), "scores": scores, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------ main
def _side_main() -> None:
    import numpy as np

    affinity = sorted(os.sched_getaffinity(0))
    if len(affinity) != FLAGS._threads:
        raise RuntimeError(f"side process pinned to cores {affinity}, expected {FLAGS._threads}")
    out = {"jaxinf": run_jaxinf, "kronfluence": run_kronfluence}[FLAGS._side](FLAGS._workdir)
    from jaxinf.workdir import write_json, write_npz

    write_npz(FLAGS._side_out + ".scores.npz", **out.pop("scores"))
    out["affinity"] = affinity
    write_json(FLAGS._side_out, out)


def _run_side(side: str, workdir: str, vocab: int, cores: int, tag: str) -> tuple[dict, dict]:
    """One side in a fresh subprocess pinned to cores 0..cores-1: (its results, its score matrices)."""
    import numpy as np

    side_out = os.path.join(workdir, f"{side}-{tag}.json")
    cmd = [sys.executable, "-m", "experiments.bench_kronfluence", f"--_side={side}", f"--_side_out={side_out}",
           f"--_workdir={workdir}", f"--_vocab={vocab}", f"--_threads={cores}",
           "--query_batch_sizes=" + ",".join(FLAGS.query_batch_sizes)]
    cmd += [f"--{k}={FLAGS[k].value}" for k in _WORKLOAD_FLAGS]
    n = str(cores)
    # torch only where it is used: jaxinf sets USE_TORCH=0 (transformers would import torch, ~0.5 GB)
    env = dict(os.environ, JAXINF_COMPILATION_CACHE="0", USE_TORCH="1" if side == "kronfluence" else "0",
               OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
    cpus = set(range(cores))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side (vocab {vocab}, {cores} cores) failed:\n{proc.stderr[-4000:]}")
    with open(side_out) as f:
        result = json.load(f)
    with np.load(side_out + ".scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    return result, scores


def _compare(a, b) -> dict:
    import numpy as np

    from jaxinf.evaluation.metrics import row_spearman

    rho = row_spearman(a, b)
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), "mean_query_spearman": float(np.mean(rho)),
            "max_abs_diff_over_max_abs": float(np.max(np.abs(a - b)) / np.max(np.abs(b)))}


def _warm(runs_by_process: list) -> dict:
    """Median warm wall time, median warm CPU/wall, the cold times, over the processes (orders) of one side."""
    warm = [r for runs in runs_by_process for r in runs[1:]]
    return {"median_s": statistics.median(r["wall_s"] for r in warm),
            "cpu_over_wall": statistics.median(r["cpu_s"] / r["wall_s"] for r in warm),
            "warm_s": [r["wall_s"] for r in warm], "cold_s": [runs[0]["wall_s"] for runs in runs_by_process]}


def summarise(processes: dict) -> dict:
    """Per side: fit and per-query-batch score medians, peak RSS; ratios jaxinf / kronfluence where both ran."""
    out = {}
    for side, procs in processes.items():
        out[side] = {"fit": _warm([p["fit"] for p in procs]),
                     "score": {s: _warm([p["score"][s] for p in procs]) for s in FLAGS.query_batch_sizes},
                     "peak_rss_mib": max(p["peak_rss_mib"] for p in procs),
                     "rss_before_fit_mib": max(p["rss_before_fit_mib"] for p in procs),
                     "peak_rss_after_fit_mib": max(p["peak_rss_after_fit_mib"] for p in procs),
                     "affinity": procs[0]["affinity"], "layers": len(procs[0]["layers"]),
                     **{k: procs[0][k] for k in ("jax", "torch", "torch_threads", "profile") if k in procs[0]}}
    if len(out) == 2:
        j, k = out["jaxinf"], out["kronfluence"]
        ratios = {"fit": j["fit"]["median_s"] / k["fit"]["median_s"],
                  "peak_rss": j["peak_rss_mib"] / k["peak_rss_mib"],
                  "peak_rss_above_setup": (j["peak_rss_mib"] - j["rss_before_fit_mib"]) /
                                          (k["peak_rss_mib"] - k["rss_before_fit_mib"])}
        for s in FLAGS.query_batch_sizes:
            ratios[f"score[{s}]"] = j["score"][s]["median_s"] / k["score"][s]["median_s"]
            ratios[f"fit_plus_score[{s}]"] = ((j["fit"]["median_s"] + j["score"][s]["median_s"]) /
                                              (k["fit"]["median_s"] + k["score"][s]["median_s"]))
        out["ratios_jaxinf_over_kronfluence"] = ratios
    return out


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
    available = len(os.sched_getaffinity(0))
    try:
        cores = [int(c) for c in FLAGS.cores]
        vocabs = [int(v) for v in FLAGS.vocab_sizes]
        [_query_batch(s) for s in FLAGS.query_batch_sizes]
    except ValueError as err:
        raise app.UsageError(f"--cores, --vocab_sizes, --query_batch_sizes: {err} (integers; 'all' for a query "
                             "batch of every query)") from None
    if max(cores) > available or min(cores) < 1:
        raise app.UsageError(f"--cores={FLAGS.cores}: this process may use {available} cores")
    if "kronfluence" in FLAGS.sides:
        try:
            import kronfluence  # noqa: F401
            import torch  # noqa: F401
        except ImportError as err:
            raise app.UsageError(f"{err}: the kronfluence side needs kronfluence and torch: pip install -e .[bench] "
                                 "(or pip install kronfluence), or run --sides=jaxinf") from err
    import numpy as np

    orders = [list(FLAGS.sides)] + ([list(reversed(FLAGS.sides))] if FLAGS.orders == "both" and
                                    len(FLAGS.sides) == 2 else [])
    command = "python -m experiments.bench_kronfluence " + " ".join(
        [f"--{k}={FLAGS[k].value}" for k in _WORKLOAD_FLAGS] +
        [f"--{k}={','.join(map(str, FLAGS[k].value))}" for k in ("sides", "vocab_sizes", "cores",
                                                                  "query_batch_sizes")] + [f"--orders={FLAGS.orders}"])
    settings = {}
    load_start = list(os.getloadavg())
    for vocab in vocabs:
        with tempfile.TemporaryDirectory() as workdir:
            make_workload(workdir, vocab)
            for c in cores:
                processes, scores = {s: [] for s in FLAGS.sides}, {}
                for o, order in enumerate(orders):
                    for side in order:
                        result, side_scores = _run_side(side, workdir, vocab, c, f"{c}-{o}")
                        processes[side].append(result)
                        scores.setdefault(side, side_scores)  # the first order's matrices
                        print(f"vocab {vocab}, {c} core(s), order {order}: {side} fit "
                              f"{[round(r['wall_s'], 2) for r in result['fit']]} s", flush=True)
                summary = summarise(processes)
                if len(scores) == 2:
                    summary["agreement"] = {s: _compare(scores["jaxinf"][s], scores["kronfluence"][s])
                                            for s in FLAGS.query_batch_sizes}
                settings[f"vocab={vocab}/cores={c}"] = summary
                if "ratios_jaxinf_over_kronfluence" in summary:
                    print(f"vocab {vocab}, {c} core(s): " + ", ".join(
                        f"{k} {v:.2f}" for k, v in summary["ratios_jaxinf_over_kronfluence"].items()), flush=True)
    result = {"command": command, "workload": {k: FLAGS[k].value for k in _WORKLOAD_FLAGS},
              "orders": orders, "host": {"cpus": os.cpu_count(), "affinity_available": available,
                                         "load_average_start_end": [load_start, list(os.getloadavg())]},
              "settings": settings}
    recipes.write_json(FLAGS.out, result)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("ratios_jaxinf_over_kronfluence", "agreement")}
                      for k, v in settings.items()}, indent=1))


if __name__ == "__main__":
    app.run(main)
