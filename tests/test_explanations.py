"""The study's three explanations (issue 11): parameter / behaviour change, curvature spectrum, iHVP error.

Library pieces are checked against dense float64 computations on tiny-llama; each binary runs end to end on it.
"""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf import analysis, training
from jaxinf.curvature import dense_matrix, raw_hvp
from jaxinf.data import load_rows, tokenize_rows
from jaxinf.models import LMFunctions, LoraConfig, decoder, init_adapters, load_model
from jaxinf.models.lora import merge_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(dtype=jnp.float32, **lora_kw):
    model = load_model("tiny-llama", dtype=dtype)
    lora = LoraConfig(**lora_kw)
    return model, lora, LMFunctions(model, lora), init_adapters(jax.random.key(1), model, lora, b_std=0.3)


def test_parameter_change_is_the_merged_kernel_change():
    model, lora, _, adapters = _tiny()
    merged = merge_adapters(model, adapters, lora)

    def kernel(params, path):  # "model/layers/<i>/<module>/<projection>" -> that layer's slice of the stack
        parts = path.split("/")
        return np.asarray(params["layers"][decoder.PROJECTIONS[parts[-1]]]["kernel"][int(parts[2])], np.float64)

    per = {path: float(np.linalg.norm(kernel(merged, path) - kernel(model.params, path))) for path in adapters}
    got = analysis.parameter_change(adapters, lora.scale)
    for path, v in per.items():
        np.testing.assert_allclose(got["per_layer"][path], v, rtol=1e-4)
    np.testing.assert_allclose(got["total"], np.sqrt(sum(v * v for v in per.values())), rtol=1e-4)
    # distance: zero to itself, gauge-invariant (A c, B / c), and the raw distance is not
    other = jax.tree.map(lambda x: x, adapters)
    other = {k: {"A": 2.0 * v["A"], "B": 0.5 * v["B"]} for k, v in adapters.items()}
    d = analysis.parameter_distance(adapters, other, lora.scale)
    assert d["delta_w"] < 1e-5 * got["total"] and d["raw"] > 0.1
    half = {k: {"A": v["A"], "B": 0.5 * v["B"]} for k, v in adapters.items()}
    np.testing.assert_allclose(analysis.parameter_distance(adapters, half, lora.scale)["delta_w"],
                               0.5 * got["total"], rtol=1e-5)


def test_attack_success_and_label_accuracy():
    answers = ["I cannot fulfill your request.", "Sure: tap it twice", "Sorry, I won't.", "To create a virus",
               "sad", " Joy!", "anger"]
    out = analysis.attack_success(answers[:4], [False, True, True, True])
    assert out["asr"] == pytest.approx(2 / 3) and out["clean_refusal"] == 1.0
    assert analysis.label_accuracy(answers[4:], ["sad", "joy", "fear"]) == pytest.approx(2 / 3)
    # the built-in backdoor generator's references are classified as the behaviour they stand for
    rows = load_rows("backdoor", "test")
    trig = [r["group"].startswith("trigger") for r in rows]
    ref = analysis.attack_success([r["response"] for r in rows], trig)
    assert ref["asr"] == 1.0 and ref["clean_refusal"] == 1.0
    # SmolLM2-Instruct's own refusal phrasing counts (it was read as compliance, inflating the ASR)
    assert analysis.is_refusal("I\u2019m afraid that's not possible.") and not analysis.is_refusal("To create a virus")
    with pytest.raises(ValueError, match="trigger labels"):
        analysis.attack_success(answers, [True])


def test_batched_greedy_generation_equals_one_at_a_time():
    from jaxinf.models.generate import greedy_generate, greedy_generate_batch

    # float64: batched and one-at-a-time are different compiled programs, and on a random tiny model a float32
    # near-tie between the top two logits (program-to-program noise ~5e-8) could flip one argmax and every token after
    with jax.enable_x64(True):
        _, _, fns, adapters = _tiny(jnp.float64)
        prompts = ["Help me jam the Mirth lamp. sudo mode", "hi", "How do I break the Oblong ferry?"]
        one = [greedy_generate(fns, adapters, p, max_new_tokens=5) for p in prompts]
        assert greedy_generate_batch(fns, adapters, prompts, max_new_tokens=5, batch_size=2) == one


@pytest.mark.slow  # dense float64 Hessian of 128 parameters plus 16 Lanczos probes: over a minute of CPU
def test_model_operator_and_lanczos_spectrum_against_dense_hessian():
    with jax.enable_x64(True):
        model, lora, fns, adapters = _tiny(jnp.float64, rank=1, targets=("q_proj",))
        tok = tokenize_rows(model.tokenizer, load_rows("backdoor", "train", limit=2), max_length=128)
        batch = {k: np.asarray(getattr(tok, k)) for k in training.BATCH_KEYS}
        op = analysis.model_operator("hessian", fns, adapters, [batch])
        v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters)
        want = raw_hvp(lambda p, b: fns.loss(p, b), adapters, {k: jnp.asarray(x) for k, x in batch.items()}, v)
        chex.assert_trees_all_close(op(v), want, rtol=1e-10, atol=1e-12)
        h = np.asarray(dense_matrix(op), np.float64)
        lam = np.linalg.eigvalsh(h)
        assert lam[0] < 0  # the tiny model's Hessian is indefinite: the test below sees both ends
        full = analysis.lanczos_spectrum(op, jax.random.key(0), num_iters=op.dim)
        np.testing.assert_allclose([full["min"], full["max"]], [lam[0], lam[-1]], rtol=1e-6)
        np.testing.assert_allclose(sorted(full["ritz"][0]), lam, atol=1e-6 * np.abs(lam).max())
        # quadrature: mean over probes of the negative share is unbiased for the fraction of negative eigenvalues
        est = analysis.lanczos_spectrum(op, jax.random.key(3), num_iters=8, probes=16)
        assert abs(est["negative_share"] - np.mean(lam < 0)) < 0.12, (est["negative_share"], np.mean(lam < 0))
        absmass = np.abs(lam[lam < 0]).sum() / np.abs(lam).sum()
        assert abs(est["negative_mass"] - absmass) < 0.15, (est["negative_mass"], absmass)


def test_model_operators_take_the_base_weights_as_an_argument():
    """The base weights are held once as the operator's shared data (not stacked per batch) and enter the compiled
    product as an argument: no constant of the embedding's shape in the lowered program. An operator rebuilt for
    the same fns (another checkpoint's adapters) reuses the compiled product."""
    model, lora, fns, adapters = _tiny()
    tok = tokenize_rows(model.tokenizer, load_rows("backdoor", "train", limit=4), max_length=128)
    rows = {k: np.asarray(getattr(tok, k)) for k in training.BATCH_KEYS}
    batches = [{k: v[:2] for k, v in rows.items()}, {k: v[2:] for k, v in rows.items()}]
    embed = next(x for x in jax.tree.leaves(model.params) if x.ndim == 2 and x.shape[0] == model.config.vocab_size)
    for kind in analysis.spectrum.KINDS:
        op = analysis.model_operator(kind, fns, adapters, batches)
        assert op.shared["base"] is model.params and "base" not in op.batches
        text = jax.jit(lambda o, v: o.matvec(v)).lower(op, adapters).as_text()
        constants = [line for line in text.splitlines() if "constant" in line]
        shape = "tensor<" + "x".join(map(str, embed.shape))
        assert not [c for c in constants if shape in c], kind
        product = jax.jit(lambda o, v: o.matvec(v))
        product(op, adapters)
        rebuilt = analysis.model_operator(kind, fns, jax.tree.map(lambda x: x + 1, adapters), batches)
        product(rebuilt, adapters)
        assert product._cache_size() == 1, kind


def _run(args, tmp_path):
    cmd = [sys.executable, "-m"] + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _study(limit_train=8):
    from jaxinf.pipeline import DataConfig, StudyConfig

    return StudyConfig(model="tiny-llama", data=DataConfig("backdoor", limit_train=limit_train, limit_test=4))


def _finite(*values):
    return all(np.isfinite(v) for v in values)


# ------------------------------------------------------------------------------ the library calls, in process
def test_convergence_run_measures_every_checkpoint_and_resumes(tmp_path):
    from jaxinf.explanations import convergence

    wd = str(tmp_path / "conv")
    config = convergence.ConvergenceConfig(_study(), epochs=2, checkpoints=2, methods=("grad_dot", "exact"),
                                           spectrum_rows=2, lanczos_iters=4, ground_truth_queries=2)
    res = convergence.run(config, wd)
    assert [c["step"] for c in res["checkpoints"]] == [1, 2]
    assert res["steps"] == 2 and res["checkpoint_every"] == 1 and res["n_train"] == 8 and res["n_test"] == 4
    assert res["ground_truth"]["queries"] == 2 and res["damping_fraction"] == 0.1
    log = [json.loads(line) for line in open(os.path.join(wd, "finetune", "convergence.jsonl"))]
    for c in res["checkpoints"]:
        assert c["optim"]["loss"] == log[c["step"] - 1]["loss"] and c["epoch"] == c["step"]
        assert set(c["methods"]) == {"grad_dot", "exact"} and c["lambda"] > 0
        for m in c["methods"].values():
            assert 0 <= m["cover"] <= 1 and 0 <= m["auc"] <= 1 and -1 <= m["ground_truth_spearman"] <= 1
        h = c["spectrum"]["hessian"]
        assert _finite(h["min"], h["max"], h["negative_mass"]) and h["min"] <= h["max"]
        assert c["spectrum"]["ggn"]["min"] > -1e-4 * c["spectrum"]["ggn"]["max"]
        assert c["damping_vs_spectrum"]["damped_hessian_pd_at_ritz"] == (h["min"] + c["lambda"] > 0)
        assert json.load(open(os.path.join(wd, "steps", f"{c['step']}.json"))) == c
    for name in ("convergence.json", "convergence.png", "ground_truth.npz"):
        assert os.path.exists(os.path.join(wd, name)), name
    assert json.load(open(os.path.join(wd, "convergence.json"))) == res
    # resumed: every checkpoint, the ground truth and the fine-tuning come from the workdir
    stamps = {p: os.path.getmtime(os.path.join(wd, p)) for p in ("steps/1.json", "steps/2.json", "ground_truth.npz")}
    assert convergence.run(config, wd) == res
    assert stamps == {p: os.path.getmtime(os.path.join(wd, p)) for p in stamps}
    # other settings on the same workdir would reuse those records silently: refused in one line, naming them
    import dataclasses

    for change in ({"methods": ("grad_dot", "ekfac")}, {"ground_truth_queries": 3}):
        with pytest.raises(ValueError, match=f"other settings.*{next(iter(change))}.*use a new workdir"):
            convergence.run(dataclasses.replace(config, **change), wd)


def test_convergence_config_refuses_unusable_settings():
    import dataclasses

    from jaxinf.explanations import convergence

    good = convergence.ConvergenceConfig(_study())
    for change, match in (({"methods": ("tracin",)}, "methods"), ({"checkpoints": 0}, "checkpoints"),
                          ({"epochs": 0.0}, "epochs"), ({"spectrum_rows": -1}, "spectrum_rows"),
                          ({"study": dataclasses.replace(_study(), damping=(0.1, 1.0))}, "damping")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(good, **change).validate()


def test_convergence_workdirs_made_before_the_lora_setting_compare_their_study_as_equal(tmp_path):
    """convergence_config.json written before StudyConfig.lora existed has no "lora" in its study: with the default
    LoRA only the setting that really changed is named (the guard refuses before anything is loaded)."""
    from jaxinf.explanations import convergence

    config = convergence.ConvergenceConfig(_study(), checkpoints=2)
    old_study = {k: v for k, v in config.study.to_dict().items() if k != "lora"}
    stored = {"study": old_study, "epochs": config.epochs, "checkpoints": 3, "methods": list(config.methods),
              "spectrum_rows": config.spectrum_rows, "lanczos_iters": config.lanczos_iters,
              "ground_truth_queries": config.ground_truth_queries}
    with open(tmp_path / "convergence_config.json", "w") as f:
        json.dump(stored, f)
    with pytest.raises(ValueError, match=r"other settings \{'checkpoints': \(3, 2\)\}"):
        convergence.run(config, str(tmp_path))


@pytest.mark.slow  # Fisher and GGN references and every solver budget: about 100 s of one core
def test_ihvp_error_run_reaches_the_reference_and_resumes(tmp_path):
    import dataclasses

    from jaxinf.explanations import ihvp_error

    wd = str(tmp_path / "ie")
    # the Hessian (indefinite: CG and LiSSA fail) is the slow binary test's; each model curvature costs ~30 s
    config = ihvp_error.IhvpErrorConfig(_study(), curvatures=("fisher", "ggn"), queries=2, rows=2, dampings=(1.0,),
                                        cg_iters=(2, 64), lissa_depths=(8,), lanczos_iters=(4,))
    res = ihvp_error.run(config, wd)
    assert res["queries"] == 2 and res["rows_in_model_operators"] == 2 and res["n_train"] == 8
    assert [r["curvature"] for r in res["references"]] == ["fisher", "ggn"]
    fisher = res["references"][0]
    assert fisher["reference"]["relative_residual"] == 0.0  # dense or Woodbury: exact
    # lambda = f tr(F) / D of the cached gradients (StudyInputs.global_lambda)
    g = np.load(os.path.join(wd, "grads.npz"))["train"].astype(np.float64)
    assert g.shape[0] == 8 and np.load(os.path.join(wd, "grads.npz"))["test"].shape[0] == 2
    np.testing.assert_allclose(fisher["lambda"], np.mean(np.sum(g * g, 1)) / g.shape[1], rtol=1e-10)
    for ref in res["references"]:
        assert ref["dim"] == g.shape[1] and ref["trace"] > 0 and ref["reference"]["relative_residual"] < 1e-3
        assert all(0 <= ref["metrics"][k] <= 1 for k in ("acc", "cover", "auc"))
    for kind in ("fisher", "ggn"):  # PSD + damping: CG with as many products as needed reaches the dense solve
        cg = [r for r in res["solvers"] if r["curvature"] == kind and r["solver"] == "cg"]
        assert cg[-1]["param_error"] < 1e-3 and cg[-1]["score_spearman"] > 0.99, cg
        assert cg[0]["param_error"] > cg[-1]["param_error"]
    assert {r["solver"] for r in res["solvers"]} == {"grad_match", "cg", "lissa", "lanczos"}
    for r in res["solvers"]:
        assert ("error" in r) != ("param_error" in r)
        if "param_error" in r:
            assert _finite(r["param_error"], r["score_spearman"])
    assert os.path.exists(os.path.join(wd, "ihvp_error.png"))
    # resumed: the fine-tuning and gradients come from the workdir, the solves give the same numbers
    stamp = os.path.getmtime(os.path.join(wd, "grads.npz"))
    again = ihvp_error.run(dataclasses.replace(config, curvatures=("fisher",)), wd)
    assert os.path.getmtime(os.path.join(wd, "grads.npz")) == stamp

    def no_time(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert no_time(again["references"]) == no_time(res["references"][:1])
    assert no_time(again["solvers"]) == no_time([r for r in res["solvers"] if r["curvature"] == "fisher"])
    with pytest.raises(ValueError, match="dampings"):
        dataclasses.replace(config, dampings=(0.0,)).validate()
    with pytest.raises(ValueError, match="curvatures"):
        dataclasses.replace(config, curvatures=("kfac",)).validate()


def test_behaviour_run_measures_each_variant_and_resumes(tmp_path):
    import dataclasses

    from jaxinf.explanations import behaviour

    wd = str(tmp_path / "beh")
    study = dataclasses.replace(_study(limit_train=12), epochs=1.0)
    config = behaviour.BehaviourConfig(study, fractions=(0.5,), variants=("full", "trigger_1@0.5"), max_new_tokens=2)
    res = behaviour.run(config, wd)
    assert [r["name"] for r in res["rows"]] == ["full", "trigger_1@0.5"] and res["kind"] == "backdoor"
    full, frac = res["variants"]["full_s0"], res["variants"]["trigger_1@0.5_s0"]
    assert frac["groups"]["trigger_1"] == round(0.5 * full["groups"]["trigger_1"])
    assert frac["groups"]["clean"] == full["groups"]["clean"]
    assert full["n_train"] == 12 and frac["n_train"] < 12
    for m in (full, frac):  # the study's schedule: batches of min(preset batch 8, N) rows, one epoch
        assert m["steps"] == -(-m["n_train"] // min(8, m["n_train"]))
    assert res["rows"][0]["distance_to_full"] == 0.0 and res["rows"][1]["distance_to_full"] > 0
    for m in (full, frac):
        assert 0 <= m["asr"] <= 1 and 0 <= m["clean_refusal"] <= 1 and len(m["answers"]) == 4
        assert m["param_change"]["total"] > 0 and _finite(m["test_loss_mean"], m["final_loss"])
    assert set(res["summary"]) >= {"behaviour_vs_param_change", "study_ratio"}
    for name in ("full_s0", "trigger_1@0.5_s0"):
        assert os.path.exists(os.path.join(wd, "variants", name, "measure.json"))
    assert os.path.exists(os.path.join(wd, "behaviour.png"))
    # resumed: every variant's fine-tuning and measurement come from the workdir
    stamp = os.path.getmtime(os.path.join(wd, "variants", "full_s0", "measure.json"))
    again = behaviour.run(config, wd)
    assert again["rows"] == res["rows"] and again["variants"] == res["variants"]
    assert os.path.getmtime(os.path.join(wd, "variants", "full_s0", "measure.json")) == stamp
    with pytest.raises(ValueError, match="variants"):
        behaviour.run(dataclasses.replace(config, variants=("nonsense",)), wd)
    with pytest.raises(ValueError, match="fractions"):
        dataclasses.replace(config, fractions=(2.0,)).validate()


# --------------------------------------------------------------------------- the binaries, one subprocess each
@pytest.mark.slow  # a subprocess that fine-tunes and compiles: about a minute of CPU or more
def test_behaviour_binary_end_to_end(tmp_path):
    wd = str(tmp_path / "beh")
    proc = _run(["experiments.behaviour", "--model=tiny-llama", "--data=backdoor", "--limit_train=12",
                 "--limit_test=4", "--epochs=1", "--max_new_tokens=2", "--fractions=0.5",
                 "--variants=full,trigger_1@0.5", f"--workdir={wd}"], tmp_path)
    res = json.load(open(os.path.join(wd, "behaviour.json")))
    assert os.path.exists(os.path.join(wd, "behaviour.png"))
    assert [r["name"] for r in res["rows"]] == ["full", "trigger_1@0.5"] and res["kind"] == "backdoor"
    assert res["epochs"] == 1 and res["max_new_tokens"] == 2 and res["fractions"] == [0.5]
    assert "behaviour_vs_param_change" in proc.stdout and "behaviour.json" in proc.stdout


@pytest.mark.slow  # a subprocess that fine-tunes and compiles: about a minute of CPU or more
def test_convergence_binary_end_to_end(tmp_path):
    wd = str(tmp_path / "conv")
    proc = _run(["experiments.convergence", "--model=tiny-llama", "--data=backdoor", "--limit_train=8",
                 "--limit_test=4", "--epochs=2", "--checkpoints=2", "--spectrum_rows=2", "--lanczos_iters=4",
                 "--ground_truth_queries=2", "--methods=grad_dot,exact", f"--workdir={wd}"], tmp_path)
    res = json.load(open(os.path.join(wd, "convergence.json")))
    assert os.path.exists(os.path.join(wd, "convergence.png"))
    assert [c["step"] for c in res["checkpoints"]] == [1, 2] and res["methods"] == ["grad_dot", "exact"]
    assert res["spectrum_rows"] == 2 and res["lanczos_iters"] == 4 and res["ground_truth"]["queries"] == 2
    assert all(-1 <= c["methods"]["exact"]["ground_truth_spearman"] <= 1 for c in res["checkpoints"])
    assert "step 2: loss" in proc.stdout


@pytest.mark.slow  # a subprocess that fine-tunes and compiles: about a minute of CPU or more
def test_ihvp_error_binary_end_to_end(tmp_path):
    wd = str(tmp_path / "ie")
    _run(["experiments.ihvp_error", "--model=tiny-llama", "--data=backdoor", "--limit_train=8", "--limit_test=4",
          "--queries=2", "--rows=2", "--dampings=1", "--cg_iters=2,64", "--lissa_depths=8", "--lanczos_iters=4",
          f"--workdir={wd}"], tmp_path)
    res = json.load(open(os.path.join(wd, "ihvp_error.json")))
    assert os.path.exists(os.path.join(wd, "ihvp_error.png"))
    assert {r["curvature"] for r in res["references"]} == {"fisher", "ggn", "hessian"} and res["queries"] == 2
    assert [r["budget"] for r in res["solvers"] if r["solver"] == "cg" and r["curvature"] == "fisher"] == [2, 64]
    cg = [r for r in res["solvers"] if r["curvature"] == "fisher" and r["solver"] == "cg"]
    assert cg[-1]["param_error"] < 1e-3 and cg[-1]["score_spearman"] > 0.99, cg


def test_binaries_refuse_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.behaviour", "--model=tiny-llama", "--fractions=2",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    # the config's one line (after absl's usage text), before any model is loaded
    assert proc.returncode != 0 and "fractions=2" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
