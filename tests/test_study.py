"""The study binary end to end on a tiny model and a built-in task, and its metrics on hand-made scores."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_METHODS = "grad_dot,grad_cos,tracin,datainf,exact_layer,exact,lissa,cg,arnoldi,lanczos,kfac,ekfac,repsim"


def _run(workdir, *flags):
    cmd = [sys.executable, "-m", "experiments.attribute", "--model=tiny-llama", "--data=backdoor",
           "--limit_train=24", "--limit_test=8", "--epochs=2", "--bootstrap=200", f"--workdir={workdir}", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f), proc.stdout


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    return workdir, *_run(workdir, f"--methods={FAST_METHODS}")


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
    assert min(agree["cg"], agree["lanczos"], agree["arnoldi"]) > 0.999, agree
    assert agree["grad_dot"] < 0.9 and agree["repsim"] < 0.9, agree
    s_exact = np.load(os.path.join(workdir, "scores", "exact.npz"))["scores"]
    assert s_exact.shape == (8, 24)


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
        np.savez(tmp_path / "scores" / f"{name}.npz", scores=matrix, seconds=0.0)
    hand, _ = _run(str(tmp_path), "--methods=grad_dot,grad_cos,datainf")
    got = {m: tuple(hand["methods"][m][k]["value"] for k in ("acc", "cover", "auc")) for m in hand["methods"]}
    assert got["grad_dot"] == (1.0, 1.0, 1.0)
    assert got["grad_cos"] == (0.0, 0.0, 0.0)
    np.testing.assert_allclose(got["datainf"], (7 / 8, 7 / 8, 7 / 8))


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
    assert sorted(results["methods"]) == sorted(FAST_METHODS.split(","))
    assert all("error" not in d for d in results["methods"].values()), results["methods"]
    assert results["methods"]["cg"]["vs_exact"]["spearman"] > 0.99
