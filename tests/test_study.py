"""The study binary end to end on a tiny model and a built-in task, and its metrics on hand-made scores."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.linalg

from jaxinf import ihvp, study
from jaxinf.curvature.cached import gradient_fisher_operator
from jaxinf.models import LoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_METHODS = "grad_dot,grad_cos,tracin,datainf,exact_layer,exact,lissa,cg,arnoldi,lanczos,kfac,ekfac,repsim"


def _run(workdir, **settings):
    """The study in-process (jaxinf.api.run_study, the binary's flag names as keywords): results.json as written,
    and the method tables the binary prints."""
    from jaxinf import api
    from jaxinf.report import tables

    common = dict(model="tiny-llama", data="backdoor", limit_train=24, limit_test=8, epochs=2, bootstrap=200,
                  ground_truth="")
    result = api.run_study(workdir, **{**common, **settings})
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f), "\n".join(tables.method_table(s) for s in result.sets)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    return workdir, *_run(workdir, methods=FAST_METHODS)


def test_every_method_runs_and_writes_results(first_run):
    workdir, results, stdout = first_run
    methods = FAST_METHODS.split(",")
    assert [m for m in methods if "error" in results["methods"].get(m, {"error": "missing"})] == []
    for m in methods:
        for key in ("acc", "cover", "auc"):
            value, (lo, hi) = results["methods"][m][key]["value"], results["methods"][m][key]["ci"]
            assert 0.0 <= lo <= value <= hi <= 1.0, (m, key, value, lo, hi)
    assert results["n_train"] == 24 and results["n_test"] == 8
    for name in ("results.csv", "metrics.png", "results.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert "Acc" in stdout and "repsim" in stdout
    # Solvers of the same damped Fisher that converge (CG to tolerance, Krylov with as many iterations as
    # the Fisher's rank) reproduce exact influence; gradient matching and RepSim do not.
    agree = {m: results["methods"][m]["vs_exact"]["spearman"] for m in methods}
    assert agree["exact"] == pytest.approx(1.0)
    # the float32 solvers' scores are within 1e-3 of the largest exact score (measured: CG 5e-6, Arnoldi 2e-5,
    # Lanczos 2e-4); ranks are checked loosely, since near-tied rows may swap at that level on another CPU
    s_exact = np.load(os.path.join(workdir, "scores", "exact__fisher_global_f0.1.npz"))["scores"]
    assert s_exact.shape == (8, 24)
    for m in ("cg", "lanczos", "arnoldi"):
        s_m = np.load(os.path.join(workdir, "scores", f"{m}__fisher_global_f0.1.npz"))["scores"]
        assert np.abs(s_m - s_exact).max() <= 1e-3 * np.abs(s_exact).max(), m
    assert min(agree["cg"], agree["lanczos"], agree["arnoldi"]) > 0.99, agree
    assert agree["grad_dot"] < 0.9 and agree["repsim"] < 0.9, agree  # measured 0.25 and 0.14
    # one damping for every method: the same absolute lambda = 0.1 tr(F)/D, recorded per method
    lam = results["damping"]["lambda"]
    assert lam == pytest.approx(0.1 * results["damping"]["trace"] / results["damping"]["dim"])
    for m in study.DAMPED_METHODS:
        assert results["methods"][m]["lambda"] == lam, m
    assert results["methods"]["cg"]["converged"] in (True, False)
    assert results["methods"]["cg"]["iterations"] >= 1 and "relative_residual" in results["methods"]["cg"]


def test_metrics_of_the_binary_on_hand_made_scores(first_run, tmp_path):
    """Hand-made score matrices fed through the binary's cache give the Acc/Cover/AUC worked out by hand."""
    workdir, results, _ = first_run
    train, test = np.array(results["train_groups"]), np.array(results["test_groups"])
    same = (test[:, None] == train[None, :]).astype(float)
    os.makedirs(tmp_path / "scores")
    for f in ("attribute_config.json",):
        with open(os.path.join(workdir, f)) as src, open(tmp_path / f, "w") as dst:
            dst.write(src.read())
    os.symlink(os.path.join(workdir, "finetune"), tmp_path / "finetune")
    for name in ("grads_train.npz", "grads_test.npz"):
        os.symlink(os.path.join(workdir, name), tmp_path / name)
    # oracle: same group scores 1 -> Acc = Cover = AUC = 1; anti-oracle -> 0; one row reversed -> 7/8.
    half = same.copy()
    half[0] = 1.0 - half[0]
    for name, matrix in (("grad_dot", same), ("grad_cos", 1.0 - same), ("datainf", half)):
        stem = f"{name}__fisher_global_f0.1" if name in study.DAMPED_METHODS else name
        np.savez(tmp_path / "scores" / f"{stem}.npz", scores=matrix, seconds=0.0)
    hand, _ = _run(str(tmp_path), methods="grad_dot,grad_cos,datainf")
    got = {m: tuple(hand["methods"][m][k]["value"] for k in ("acc", "cover", "auc")) for m in hand["methods"]}
    assert got["grad_dot"] == (1.0, 1.0, 1.0)
    assert got["grad_cos"] == (0.0, 0.0, 0.0)
    np.testing.assert_allclose(got["datainf"], (7 / 8, 7 / 8, 7 / 8))


@pytest.mark.slow
def test_damping_sweep_and_model_curvatures_in_one_workdir(first_run):
    """--damping=a,b writes one result set per value (reusing fine-tuning and gradients); --curvature=ggn|hessian
    runs the curvature methods on the model's operator with an exact float64 reference."""
    workdir = first_run[0]
    methods = "grad_dot,exact,cg,lanczos,arnoldi,exact_layer"  # LiSSA on model operators: the CLI check (slow)
    _run(workdir, methods=methods, damping="0.01,1", curvature="ggn")
    lams = {}
    for f in ("0.01", "1"):
        with open(os.path.join(workdir, f"damping_{f}", "results.json")) as fh:
            res = json.load(fh)
        assert res["damping"]["fraction"] == float(f) and res["damping"]["curvature"] == "ggn"
        lams[f] = res["damping"]["lambda"]
        assert [m for m in methods.split(",") if "error" in res["methods"][m]] == []
        for m in ("exact", "cg", "lanczos", "arnoldi", "exact_layer"):
            assert res["methods"][m]["lambda"] == lams[f], m
        for m in ("exact", "cg", "lanczos", "arnoldi"):
            assert res["methods"][m]["curvature"] == "ggn", m
        assert res["methods"]["exact_layer"]["curvature"] == "fisher"  # says it could not share the GGN
        assert res["methods"]["exact"]["damped_matrix_positive_definite"]
        if res["methods"]["cg"]["converged"]:
            assert res["methods"]["cg"]["vs_exact"]["spearman"] > 0.99
    assert lams["1"] == pytest.approx(100 * lams["0.01"])
    _run(workdir, methods="exact,cg,lanczos,arnoldi", curvature="hessian")
    with open(os.path.join(workdir, "results.json")) as fh:
        res = json.load(fh)
    exact = res["methods"]["exact"]
    if "error" in exact:  # this short run's Hessian has a negative trace: relative damping is refused, with the fix
        for m in ("exact", "cg", "lanczos", "arnoldi"):
            assert "relative damping needs tr(C) > 0" in res["methods"][m]["error"], m
            assert "use --curvature=ggn or fisher" in res["methods"][m]["error"], m
        return
    assert exact["curvature"] == "hessian" and "negative_policy" in exact and "negative_eigenvalues" in exact
    for m in ("cg", "lanczos", "arnoldi"):  # each ran, or failed with its reason in the results
        assert res["methods"][m].get("curvature") == "hessian" or "error" in res["methods"][m], m


# ---------------------------------------------------------------- the study's maths on synthetic gradients


class _Rows:
    """The TokenizedRows fields the curvature operators read."""

    def __init__(self, ids, mask, loss_mask):
        self.input_ids, self.attention_mask, self.loss_mask = ids, mask, loss_mask

    def __len__(self):
        return len(self.input_ids)


@pytest.mark.slow  # minutes on a loaded 2-core CPU
# The Hessian case needs a model whose Hessian has a positive trace (relative damping is refused otherwise, as it
# should be: the random tiny-llama's is -37.7); it is left for a trained model or an absolute damping (open).
@pytest.mark.parametrize("curvature", ["ggn"])
def test_model_curvature_methods_against_a_dense_float64_inverse(curvature):
    """--curvature=ggn|hessian: exact, cg and full-rank lanczos/arnoldi invert C + lambda I with lambda = f tr(C)/D,
    C the model's GGN / Hessian of the mean training loss (here checked against jax.hessian of that loss, or J^T H J
    from jax.jacfwd), on tiny-llama with a rank-1 LoRA on v_proj (D = 96), float64."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model

    with jax.enable_x64(True):
        model = load_model("tiny-llama", dtype=jnp.float64)
        lora = LoraConfig(rank=1, alpha=4.0, targets=("v_proj",))
        fns, adapters = LMFunctions(model, lora), init_adapters(jax.random.key(1), model, lora, b_std=0.3)
        rng = np.random.default_rng(0)
        make = lambda n: _Rows(rng.integers(3, 250, (n, 10)).astype(np.int32), np.ones((n, 10), np.int32),
                               np.concatenate([np.zeros((n, 4)), np.ones((n, 6))], 1))
        train, test = make(4), make(2)
        grads = lambda rows: jax.jit(fns.per_example_grads)(adapters, {k: getattr(rows, k) for k in
                                                                         ("input_ids", "attention_mask", "loss_mask")})
        preset = study.dataclasses.replace(study.PRESETS["quick"], grad_chunk=2, krylov_iters=96, cg_iters=400)
        inputs = study.StudyInputs(fns=fns, adapters=adapters, train=train, test=test, workdir="", preset=preset,
                                   train_grads=grads(train), test_grads=grads(test), curvature=curvature, damping=0.5)
        flat, unravel = ravel_pytree(adapters)
        batch = {k: jnp.asarray(getattr(train, k)) for k in ("input_ids", "attention_mask", "loss_mask")}
        if curvature == "hessian":
            dense = jax.hessian(lambda x: fns.loss(unravel(x), batch))(flat)
        else:
            f = lambda x: fns.logits(unravel(x), batch)
            logits, vjp = jax.vjp(f, flat)

            def column(e):  # J^T H_out J e on the whole batch at once
                je = jax.jvp(f, (flat,), (e,))[1]
                hje = jax.jvp(jax.grad(lambda z: fns.output_loss(z, batch)), (logits,), (je,))[1]
                return vjp(hje)[0]

            dense = jax.jit(jax.vmap(column))(jnp.eye(flat.size))
        dense = np.asarray(dense)
        lam = 0.5 * np.trace(dense) / flat.size
        assert inputs.global_lambda == pytest.approx(lam, rel=1e-6)
        g, q = _flat_rows(inputs.train_grads), _flat_rows(inputs.test_grads)
        ref = q @ np.linalg.solve(dense + lam * np.eye(flat.size), g.T)
        for m in ("exact", "cg", "lanczos", "arnoldi"):
            scores, _, info = study.run_method_with_info(m, inputs)
            assert info["curvature"] == curvature and info["lambda"] == pytest.approx(lam, rel=1e-6), m
            assert np.abs(scores - ref).max() < 1e-5 * np.abs(ref).max(), (m, np.abs(scores - ref).max())
        assert info["curvature"] == curvature
        _, _, exact_info = study.run_method_with_info("exact", inputs)
        theta = np.linalg.eigvalsh(dense)
        # an exact zero eigenvalue (LoRA's A/B rescaling leaves one null direction per adapted module) comes out as
        # +-1e-17 with a sign that differs between LAPACK paths: only eigenvalues beyond rounding count
        floor = study.rounding_floor(theta)
        assert int((theta < -floor).sum()) <= exact_info["negative_eigenvalues"] <= int((theta < floor).sum())
        if curvature == "ggn":
            assert exact_info["negative_eigenvalues"] == 0
        assert exact_info["eigenvalue_min"] == pytest.approx(theta.min(), abs=1e-8 * abs(theta).max())
        _, _, layer_info = study.run_method_with_info("exact_layer", inputs)
        assert layer_info["curvature"] == "fisher" and layer_info["lambda"] == pytest.approx(lam, rel=1e-6)


def _flat_rows(tree):
    from jaxinf import attribution

    return np.asarray(attribution.flatten_rows(tree), np.float64)


def _synthetic(n=12, m=3, dims=(20, 14), seed=0, dtype=np.float64, scales=(1.0, 30.0), **kw):
    """StudyInputs holding only gradients: two 'LoRA matrices' of different gradient scale."""
    rng = np.random.default_rng(seed)
    adapters = {"layer": {"A": np.zeros((dims[0],), dtype), "B": np.zeros((dims[1],), dtype)}}
    grads = lambda k: {"layer": {"A": (scales[0] * rng.standard_normal((k, dims[0]))).astype(dtype),
                                 "B": (scales[1] * rng.standard_normal((k, dims[1]))).astype(dtype)}}
    kw.setdefault("preset", study.PRESETS["quick"])
    return study.StudyInputs(fns=None, adapters=adapters, train=None, test=None, workdir="",
                             train_grads=grads(n), test_grads=grads(m), **kw)


def _flat(tree):
    return np.concatenate([tree["layer"]["A"], tree["layer"]["B"]], axis=-1)


def test_exact_is_float64_and_cancellation_free():
    """N = 48, D = 20,000, float32 gradients, lambda = 1e-4 tr(F)/D: the float32 Woodbury form loses the scores
    (cancellation), the study's exact form matches an independent float64 SVD formula to 1e-9."""
    with jax.enable_x64(True):
        inputs = _synthetic(n=48, m=4, dims=(12_000, 8_000), dtype=np.float32, scales=(1.0, 1.0), damping=1e-4)
        g, q = _flat(inputs.train_grads).astype(np.float64), _flat(inputs.test_grads).astype(np.float64)
        lam = inputs.global_lambda
        assert lam == pytest.approx(1e-4 * np.mean(np.sum(g * g, 1)) / g.shape[1], rel=1e-12)
        u, sv, vt = np.linalg.svd(g, full_matrices=False)  # g_n^T (G^T G/N + lam)^{-1} q = [U S D^{-1} V^T q]_n
        ref = (q @ vt.T / (sv ** 2 / 48 + lam) * sv) @ u.T
        scores, _, info = study.run_method_with_info("exact", inputs)
        assert info["lambda"] == lam
        err = lambda s: float(np.abs(s - ref).max() / np.abs(ref).max())
        assert err(scores) < 1e-9
    # the float32 Woodbury form (v - G^T (G G^T + N lam I)^{-1} G v) / lam on the same gradients
    solver = ihvp.woodbury(damping=float(lam), by="all")
    state = solver.fit(gradient_fisher_operator(inputs.train_grads))
    woodbury32 = _flat(jax.tree.map(np.asarray, solver.apply_batched(state, inputs.test_grads))) @ g.T
    assert err(woodbury32) > 1e-2


def test_exact_fisher_directions_solve_the_damped_system():
    """Woodbury directions x = (G^T G/N + lambda I)^{-1} q (float64) against a dense solve, at a damping where the
    subtraction loses nothing; their scores <x, g_n> equal the cancellation-free exact_fisher_scores."""
    rng = np.random.default_rng(0)
    g, q = rng.normal(size=(12, 40)), rng.normal(size=(3, 40))
    lam = 0.3
    x = study.exact_fisher_directions(g, q, lam)
    dense = np.linalg.solve(g.T @ g / 12 + lam * np.eye(40), q.T).T
    assert np.abs(x - dense).max() / np.abs(dense).max() < 1e-12
    assert np.abs(x @ g.T - study.exact_fisher_scores(g, q, lam)).max() < 1e-12 * np.abs(x @ g.T).max()


def test_one_damping_shared_by_every_method_and_cg_reports_convergence():
    with jax.enable_x64(True):
        inputs = _synthetic(damping=0.3)
        g = _flat(inputs.train_grads)
        lam = 0.3 * np.mean(np.sum(g * g, 1)) / g.shape[1]
        dense = g.T @ g / g.shape[0]
        ref = _flat(inputs.test_grads) @ np.linalg.solve(dense + lam * np.eye(len(dense)), g.T)
        for m in ("exact", "cg", "lanczos", "exact_layer", "datainf"):
            scores, _, info = study.run_method_with_info(m, inputs)
            assert info["lambda"] == pytest.approx(lam, rel=1e-12), m
            if m in ("exact", "cg", "lanczos"):  # full-space solvers of the same matrix (Lanczos: 32 >= rank 12)
                assert np.abs(scores - ref).max() < 1e-6 * np.abs(ref).max(), m
            directions = study.METHODS[m].directions(inputs)  # d_q with score = <d_q, g_n> (per-token scores)
            assert np.abs(directions @ g.T - scores).max() < 1e-8 * np.abs(scores).max(), m
        # exact_layer = the block-diagonal inverse, one block per LoRA matrix, with the SAME lambda
        bd = scipy.linalg.block_diag(dense[:20, :20], dense[20:, 20:])
        want = _flat(inputs.test_grads) @ np.linalg.solve(bd + lam * np.eye(34), g.T)
        got, _, _ = study.run_method_with_info("exact_layer", inputs)
        assert np.abs(got - want).max() < 1e-8 * np.abs(want).max()
        assert info["curvature"] == "fisher"
        # CG that stops at its iteration cap says so
        capped = _synthetic(damping=1e-6, preset=study.dataclasses.replace(study.PRESETS["quick"], cg_iters=2))
        _, _, cg_info = study.run_method_with_info("cg", capped)
        assert cg_info["converged"] is False and cg_info["iterations"] == 2 and cg_info["relative_residual"] > 1e-6


def test_block_scope_is_one_diagonal_damping_for_every_method():
    """block: lambda_l = f x mean squared gradient entry of each LoRA matrix; every method inverts F + Lambda."""
    with jax.enable_x64(True):
        inputs = _synthetic(damping=0.1, damping_scope="block")
        g = _flat(inputs.train_grads)
        lam_a = 0.1 * np.mean(g[:, :20] ** 2) * 1.0  # mean over rows and entries
        lam_b = 0.1 * np.mean(g[:, 20:] ** 2)
        lams = inputs.block_lambdas
        assert lams["layer/A"] == pytest.approx(lam_a, rel=1e-12) and lams["layer/B"] == pytest.approx(lam_b, rel=1e-12)
        assert lam_b > 100 * lam_a  # the scales differ, so a global lambda would not reproduce this
        diag = np.concatenate([np.full(20, lam_a), np.full(14, lam_b)])
        dense = g.T @ g / g.shape[0]
        ref = _flat(inputs.test_grads) @ np.linalg.solve(dense + np.diag(diag), g.T)
        for m in ("exact", "cg", "lanczos", "lissa"):
            scores, _, info = study.run_method_with_info(m, inputs)
            assert info["lambda"] == lams, m
            tol = 2e-2 if m == "lissa" else 1e-6
            assert np.abs(scores - ref).max() < tol * np.abs(ref).max(), m
        directions = study.METHODS["exact"].directions(inputs)
        assert np.abs(directions @ g.T - ref).max() < 1e-8 * np.abs(ref).max()
        bd = scipy.linalg.block_diag(dense[:20, :20], dense[20:, 20:])
        want = _flat(inputs.test_grads) @ np.linalg.solve(bd + np.diag(diag), g.T)
        got, _, _ = study.run_method_with_info("exact_layer", inputs)
        assert np.abs(got - want).max() < 1e-8 * np.abs(want).max()
        # DataInf: one block per LoRA matrix (the reference code), its own lambda_l
        q = _flat(inputs.test_grads)
        naive = np.zeros_like(ref)
        for sl, lam in ((slice(0, 20), lam_a), (slice(20, 34), lam_b)):
            gl, ql = g[:, sl], q[:, sl]
            coef = (ql @ gl.T) / (lam + np.sum(gl * gl, 1))  # [M, N]
            x = (ql - coef @ gl / g.shape[0]) / lam
            naive += x @ gl.T
        got, _, _ = study.run_method_with_info("datainf", inputs)
        assert np.abs(got - naive).max() < 1e-8 * np.abs(naive).max()


def test_finetune_steps_count_the_batches_drawn():
    preset = study.PRESETS["quick"]  # batch size 8
    assert study.finetune_schedule(preset, 2, 4) == (2, 4)  # 4 rows: batches of 4, 2 epochs = 2 steps
    assert study.finetune_schedule(preset, 3, 48) == (18, 8)


@pytest.mark.slow
def test_default_model_runs_the_study_end_to_end(tmp_path):
    """README command 1 in small: SmolLM2-135M-Instruct, built-in backdoor task, every method (about 2 minutes on 2 cores)."""
    cmd = [sys.executable, "-m", "experiments.attribute", "--limit_train=16", "--limit_test=8", "--epochs=1",
           "--bootstrap=200", f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["model"] == "smollm2-135m-instruct"
    assert sorted(results["methods"]) == sorted(study.ALL_METHODS)  # the default --methods: every registered method
    assert all("error" not in d for d in results["methods"].values()), results["methods"]
    assert results["methods"]["cg"]["vs_exact"]["spearman"] > 0.99


def test_two_studies_in_one_process_each_get_their_own_ground_truth(tmp_path):
    """api.run_study twice in one process with different ground-truth settings: each run's results hold its own
    ground truths only (the binary kept them in a module-level dict that the second run added to)."""
    from jaxinf import api

    from jaxinf import pipeline

    common = dict(model="tiny-llama", data="backdoor", limit_train=8, limit_test=2, epochs=1, methods="grad_dot",
                  report_queries=0, bootstrap=20, gt_queries=1)
    first = api.run_study(str(tmp_path / "lds"), ground_truth="lds", gt_subsets=2, **common).results
    second = api.run_study(str(tmp_path / "trajectory"), ground_truth="trajectory", **common).results
    lora = dict(lora_rank=2, lora_alpha=4.0, lora_targets="q_proj,k_proj")  # the third run's LoRA reaches training
    third = api.run_study(str(tmp_path / "none"), ground_truth="", **common, **lora).results
    assert set(first["ground_truth"]) == {"lds"} and set(first["methods"]["grad_dot"]["ground_truth"]) == {"lds"}
    assert set(second["ground_truth"]) == {"trajectory"}
    assert set(second["methods"]["grad_dot"]["ground_truth"]) == {"trajectory"}
    assert "ground_truth" not in third and "ground_truth" not in third["methods"]["grad_dot"]
    loaded = api.load_results(str(tmp_path / "lds"))  # results.csv parsed back as numbers, as run_study made it
    assert json.dumps(loaded.results) == json.dumps(first) and isinstance(loaded.table[0]["acc"], float)
    assert isinstance(loaded.table[0]["converged"], bool) and loaded.table[0]["method"] == "grad_dot"
    assert loaded.config == pipeline.config_from_flags(dict(common, ground_truth="lds", gt_subsets=2))
    assert loaded.sets[0]["damping"] == study.PRESETS["quick"].damping  # the relative value, as run_study's sets
    assert api.load_results(str(tmp_path / "none")).config == pipeline.config_from_flags(
        dict(common, ground_truth="", **lora))
    with open(tmp_path / "none" / "finetune" / "run_config.json") as f:
        assert json.load(f)["lora"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj", "k_proj"]}
    with pytest.raises(ValueError, match=r"other settings .*'lora_rank': \(None, 8\)"):  # a cached fine-tuning
        api.run_study(str(tmp_path / "lds"), ground_truth="lds", gt_subsets=2, **common, lora_rank=8)
    with pytest.raises(ValueError, match=r"LoRA targets \['qproj'\] .* its projections are \['q_proj'"):
        api.run_study(str(tmp_path / "typo"), **common, lora_targets="qproj")
    assert not os.path.exists(tmp_path / "typo" / "attribute_config.json")  # the fixed rerun is not refused


def test_study_config_round_trips_and_refuses_bad_settings():
    """StudyConfig <-> dict, flag names -> config, and one-line errors that name the field."""
    from jaxinf import pipeline

    config = pipeline.config_from_flags({"model": "tiny-llama", "methods": "grad_dot,exact", "damping": "0.1,1",
                                         "ground_truth": "", "test_fraction": 0.25, "gt_subsets": 8})
    assert config.methods == ("grad_dot", "exact") and config.damping == (0.1, 1.0)
    assert config.ground_truth.kinds == () and config.ground_truth.subsets == 8 and config.data.test_fraction == 0.25
    assert pipeline.StudyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"StudyConfig.data: unknown fields \['sourse'\]"):
        pipeline.StudyConfig.from_dict({"data": {"sourse": "x"}})
    with pytest.raises(ValueError, match="unknown study settings"):
        pipeline.config_from_flags({"lr": 0.1})
    with pytest.raises(ValueError, match=r"unknown methods \['exakt'\]"):
        pipeline.config_from_flags({"methods": "exakt"}).validate()
    with pytest.raises(ValueError, match="damping=0.1,0.1: values must be >= 0 and distinct"):
        pipeline.config_from_flags({"damping": "0.1,0.1"}).validate()
    with pytest.raises(ValueError, match="test_fraction=1.5 must lie strictly between 0 and 1"):
        pipeline.config_from_flags({"test_fraction": 1.5}).validate()
    lora = pipeline.config_from_flags({"lora_rank": 8, "lora_targets": "q_proj,down_proj", "lora_dropout": 0.05})
    assert lora.lora == pipeline.LoraSettings(rank=8, targets=("q_proj", "down_proj"), dropout=0.05)
    assert pipeline.StudyConfig.from_dict(lora.to_dict()) == lora
    assert lora.lora_config() == LoraConfig(rank=8, alpha=32.0, dropout=0.05, targets=("q_proj", "down_proj"))
    assert pipeline.StudyConfig(preset="paper").lora_config().dropout == 0.1  # dropout None: the preset's
    for flag, value, message in [("lora_rank", 0, "lora.rank=0 (--lora_rank) must be an integer >= 1"),
                                 ("lora_alpha", 0.0, "lora.alpha=0.0 (--lora_alpha) must be > 0"),
                                 ("lora_dropout", 1.0, "lora.dropout=1.0 (--lora_dropout) must lie in [0, 1)"),
                                 ("lora_targets", "", "lora.targets=[] (--lora_targets) must name distinct")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            pipeline.config_from_flags({flag: value}).validate()


def test_lora_settings_key_the_workdir_and_older_workdirs_resume(tmp_path):
    """attribute_config.json names the LoRA only away from its defaults: a workdir written before the LoRA settings
    existed resumes with the defaults and refuses others; explain reads the LoRA back from the settings."""
    from jaxinf import api, pipeline

    default = pipeline.StudyConfig(model="tiny-llama")
    old = {k: v for k, v in pipeline.workdir_settings(default).items() if not k.startswith("lora_")}
    with open(tmp_path / pipeline.SETTINGS_FILE, "w") as f:
        json.dump(old, f)
    pipeline.check_workdir(str(tmp_path), pipeline.workdir_settings(default))
    same = dataclasses.replace(default, lora=pipeline.LoraSettings(dropout=0.0))  # = the quick preset's dropout
    pipeline.check_workdir(str(tmp_path), pipeline.workdir_settings(same))
    # an older finetune/run_config.json recorded LoraConfig(dropout=preset.lora_dropout): the same dict as now
    assert default.lora_config() == LoraConfig(dropout=study.PRESETS["quick"].lora_dropout)
    other = dataclasses.replace(default, lora=pipeline.LoraSettings(rank=8, targets=("v_proj",)))
    with pytest.raises(ValueError, match=r"'lora_rank': \(None, 8\), 'lora_targets': \(None, \['v_proj'\]\)"):
        pipeline.check_workdir(str(tmp_path), pipeline.workdir_settings(other))
    settings = json.loads(json.dumps(pipeline.workdir_settings(other)))  # as attribute_config.json holds them
    assert api.config_of(dict(api.DEFAULT_SETTINGS, **settings)).lora == other.lora


def test_the_binarys_data_flag_defaults_are_the_apis():
    """A workdir's settings keep a data option only when set away from its default: the binary and jaxinf.api
    must agree on the defaults, or explain refuses (or mis-tokenises) a workdir the binary made."""
    from absl import flags

    from experiments import attribute  # noqa: F401  (defines the flags)
    from jaxinf import api, pipeline

    assert {k: flags.FLAGS[k].default for k in api.DATA_OPTIONS} == api.DATA_OPTIONS
    lora = {k: flags.FLAGS[k].default for k in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")}
    assert pipeline.config_from_flags(lora).lora == pipeline.LoraSettings()


def test_presets_are_config_values_recorded_by_name_or_fields():
    import dataclasses

    from jaxinf import pipeline, presets, study

    plain = presets.quick(model="tiny-llama")
    assert plain.preset == "quick" and pipeline.workdir_settings(plain)["preset"] == "quick"  # old workdirs resume
    changed = presets.quick(model="tiny-llama", lr=3e-4, epochs=2, damping=1.0)
    assert changed.sizes == dataclasses.replace(study.PRESETS["quick"], lr=3e-4) and changed.epochs == 2
    assert changed.damping == (1.0,) and changed.preset_label == "custom"
    recorded = pipeline.workdir_settings(changed)["preset"]
    assert recorded["lr"] == 3e-4 and recorded["batch_size"] == study.PRESETS["quick"].batch_size
    assert pipeline.StudyConfig.from_dict(changed.to_dict()) == changed  # the preset's fields round-trip
    assert presets.paper().sizes.template == "inst"
    with pytest.raises(ValueError, match="unknown settings"):
        presets.quick(learning_rate=1e-3)
