"""The report: top/bottom rows against dense float64 oracles, per-token contributions against an independent
Jacobian, the HTML self-contained, and the page as headless Chromium renders it (skipped without chromium)."""

import dataclasses
import html as htmlmod
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf import attribution, report, study
from jaxinf.data import tokenize_rows
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model

METHODS = ["grad_dot", "grad_cos", "exact", "cg", "repsim"]
K = 3


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with jax.enable_x64(True):
        e = Env()
        e.model = load_model("tiny-llama", dtype=jnp.float64)
        e.lora = LoraConfig(rank=4, alpha=8.0)
        e.adapters = init_adapters(jax.random.key(0), e.model, e.lora, b_std=0.1)
        e.fns = LMFunctions(e.model, e.lora)
        words = ["red fox", "blue whale", "green frog", "grey wolf"]
        e.rows = [{"prompt": f"name animal {i}", "response": words[i % 4] + " runs" * (i % 3), "group": "abcd"[i % 4]}
                  for i in range(14)]
        tok = tokenize_rows(e.model.tokenizer, e.rows, max_length=48, template="plain")
        e.train, e.test = tok.select(np.arange(11)), tok.select(np.arange(11, 14))
        e.train_rows, e.test_rows = e.rows[:11], e.rows[11:]
        g = attribution.per_example_gradients(e.fns, e.adapters, e.train, chunk_size=4, flatten=False)
        q = attribution.per_example_gradients(e.fns, e.adapters, e.test, chunk_size=4, flatten=False)
        e.inputs = study.StudyInputs(fns=e.fns, adapters=e.adapters, train=e.train, test=e.test,
                                     workdir=str(tmp_path_factory.mktemp("ft") / "finetune"),
                                     preset=study.PRESETS["quick"], train_grads=g, test_grads=q)
        e.G, e.Q = np.asarray(attribution.flatten_rows(g)), np.asarray(attribution.flatten_rows(q))
        e.ex = report.explain(METHODS, e.inputs, tokenizer=e.model.tokenizer, train_rows=e.train_rows,
                              test_rows=e.test_rows, k=K, progress=False)
        yield e


def _rtol(method):
    """Direct solves and dot products agree with the float64 oracle to 1e-6; CG stops at the study's relative
    residual (1e-6), so its direction, and every score from it, is only as accurate as cond(F + lambda I) x 1e-6."""
    return 1e-4 if method == "cg" else 1e-6


def _oracle(env, method):
    """Dense float64 score matrices computed here, independently of jaxinf.study."""
    g, q = env.G, env.Q
    if method == "grad_dot":
        return q @ g.T
    if method == "grad_cos":
        return (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    fisher = g.T @ g / len(g)
    lam = study.PRESETS["quick"].damping * np.trace(fisher) / len(fisher)  # relative damping: f x mean eigenvalue
    return q @ np.linalg.solve(fisher + lam * np.eye(len(fisher)), g.T)


@pytest.mark.parametrize("method", ["grad_dot", "grad_cos", "exact", "cg"])
def test_rows_shown_are_the_oracles_top_and_bottom_k(env, method):
    oracle = _oracle(env, method)
    for qi, ex in enumerate(env.ex):
        res = ex["methods"][method]
        top, bottom = [r["index"] for r in res["top"]], [r["index"] for r in res["bottom"]]
        np.testing.assert_array_equal(top, np.argsort(-oracle[qi], kind="stable")[:K])
        np.testing.assert_array_equal(bottom, np.argsort(oracle[qi], kind="stable")[:K])
        np.testing.assert_allclose([r["score"] for r in res["top"] + res["bottom"]], oracle[qi, top + bottom],
                                   rtol=_rtol(method))
        assert all(r["group"] == env.train_rows[r["index"]]["group"] for r in res["top"])
        assert all(r["response"] == env.train_rows[r["index"]]["response"] for r in res["bottom"])


def _oracle_direction(env, method, qi, n):
    """d with score(q, n) = <d, g_n> for training row n, solved densely here."""
    q = env.Q[qi]
    if method == "grad_dot":
        return q
    if method == "grad_cos":
        return q / np.linalg.norm(q) / np.linalg.norm(env.G[n])
    fisher = env.G.T @ env.G / len(env.G)
    lam = study.PRESETS["quick"].damping * np.trace(fisher) / len(fisher)
    return np.linalg.solve(fisher + lam * np.eye(len(fisher)), q)


@pytest.mark.parametrize("method", ["grad_dot", "grad_cos", "exact", "cg"])
def test_token_scores_sum_to_each_rows_score_and_equal_a_dense_jacobian(env, method):
    """sum_t s_t = score, and per token s_t = <d l_t / d theta, d_q> with the Jacobian formed densely."""
    with jax.enable_x64(True):
        flat0, unravel = jax.flatten_util.ravel_pytree(env.adapters)
        jac_fn = jax.jit(jax.jacrev(lambda f, b: attribution.per_token_losses(env.fns, unravel(f), b)[0]))
        for qi, ex in enumerate(env.ex):
            res = ex["methods"][method]
            assert res["per_token"]
            for j, r in enumerate(res["top"] + res["bottom"]):
                s = np.asarray(r["token_scores"])
                assert len(s) == len(r["tokens"]) == len(r["target"])
                np.testing.assert_allclose(s.sum(), r["score"], rtol=1e-8)
                np.testing.assert_allclose(r["token_sum"], r["score"], rtol=1e-8)
                assert np.all(s[~np.asarray(r["target"])] == 0.0)  # prompt tokens carry no loss
                if qi or j not in (0, len(res["top"])):  # the Jacobian: best and worst row of the first query
                    continue
                n = r["index"]
                batch = {k: jnp.asarray(getattr(env.train, k)[n:n + 1])
                         for k in ("input_ids", "attention_mask", "loss_mask")}
                jac = np.asarray(jac_fn(flat0, batch))  # [T, D]
                keep = np.asarray(env.train.attention_mask[n]) > 0
                expected = (jac @ _oracle_direction(env, method, qi, n))[keep]
                np.testing.assert_allclose(s, expected, rtol=_rtol(method),
                                           atol=1e-3 * _rtol(method) * np.abs(expected).max())
                assert np.count_nonzero(np.abs(expected) > 1e-6 * np.abs(expected).max()) >= 2


def test_repsim_rows_have_no_token_split(env):
    res = env.ex[0]["methods"]["repsim"]
    assert not res["per_token"] and "RepSim" in res["note"]
    assert all("token_scores" not in r for r in res["top"])


def test_html_is_self_contained_and_shows_query_rows_and_shading(env):
    page = report.render_html(env.ex, meta=["tiny-llama test"])
    assert not re.search(r"<script|<link|src=|url\(|https?://", page)
    for ex in env.ex:
        assert htmlmod.escape(ex["query"]["prompt"]) in page
        for name, res in ex["methods"].items():
            assert f'data-method="{name}"' in page
            for r in res["top"] + res["bottom"]:
                assert f'data-index="{r["index"]}"' in page
    assert page.count("background:rgba(") > 20


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium; "
                                                 ".ci/run installs it)")
def test_report_renders_in_headless_chromium(env, tmp_path):
    path = report.write_report(str(tmp_path / "report.html"), env.ex, meta=["tiny-llama test"])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}"]  # own profile: no shared lock
    url = "file://" + os.path.abspath(path)
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=600)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "<body" in page and "Query 1" in page
    for ex in env.ex:
        assert htmlmod.escape(ex["query"]["prompt"]) in page
        for r in ex["methods"]["exact"]["top"]:
            assert f'data-index="{r["index"]}"' in page
    shaded = re.findall(r'<span class="tok resp" data-score="([^"]+)" style="background:rgba\(', page)
    assert len(shaded) > 20  # shaded token spans survived parsing
    shot = tmp_path / "shot.png"
    run = subprocess.run([_chromium(), *flags, "--window-size=1400,900", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))
    assert img.shape[0] == 900 and img.shape[1] == 1400
    greenish = (img[..., 1] > img[..., 0] + 0.1) & (img[..., 1] > img[..., 2] + 0.1)
    reddish = (img[..., 0] > img[..., 1] + 0.1) & (img[..., 0] > img[..., 2] + 0.1)
    assert greenish.sum() > 50 and reddish.sum() > 50  # both shades are painted


def test_the_reports_queries_reuse_the_studys_fitted_solver_state(env):
    """Values derived from the training data are kept per training set: directions for a few report queries use
    the state the study's scores were fitted with (no second fit, the same d_q), and a copy with other training
    rows fits its own (the same directions as a fresh start on those rows, never the first set's Fisher)."""
    with jax.enable_x64(True):
        inputs = dataclasses.replace(env.inputs, _cache={})
        full = study.METHODS["lanczos"].directions(inputs)
        (key,) = [k for k in inputs._derived() if k[:2] == ("state", "lanczos")]
        state = inputs._derived()[key]
        rows = np.array([2, 0])
        sub = dataclasses.replace(inputs, test=inputs.test.select(rows),
                                  test_grads=attribution.take_rows(inputs.test_grads, rows))
        np.testing.assert_allclose(report.method_directions("lanczos", sub), full[rows], rtol=1e-10, atol=1e-12)
        assert sub._derived()[key] is state
        other = dataclasses.replace(inputs, train_grads=attribution.take_rows(inputs.train_grads, np.arange(6)))
        got = report.method_directions("exact_layer", other)
        fresh = report.method_directions("exact_layer", dataclasses.replace(other, _cache={}))
        np.testing.assert_allclose(got, fresh, rtol=1e-10, atol=1e-12)
        assert not np.allclose(got, report.method_directions("exact_layer", inputs), rtol=1e-3)
