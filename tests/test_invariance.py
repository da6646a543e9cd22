"""Invariances every attribution method must have (tiny-llama, LoRA, float64, exact to float tolerance).

For the study's methods (jaxinf.study.METHODS) on one set of adapters:
* the same scores whatever the gradient chunk size (per-example gradients, K-FAC batches, TracIn, RepSim) and
  the padding length (right padding adds positions no loss or attention sees);
* permuting the test rows permutes the score rows; permuting the training rows permutes the columns;
* the scoring batch size (training rows per chunk, queries per preconditioning chunk) changes nothing;
* self-influence equals the diagonal of the pairwise scores of the training set against itself;
* an interrupted stage resumes to the same numbers: per-example gradients computed in two pieces, a K-FAC fit
  killed mid-pass, and a method's scores recomputed from scratch (as after losing its cache file).
Fine-tuning resumption is tests/test_training.py::test_interrupted_run_resumes_to_identical_parameters_and_log.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf import attribution, ihvp, study
from jaxinf.curvature import kfac
from jaxinf.data import TokenizedRows, tokenize_rows
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model

# exact (closed-form) methods and one converged iterative solver; lissa/arnoldi/lanczos are approximations whose
# start vectors or sampling make them order-dependent by design at the level of their approximation error
METHODS = ("grad_dot", "grad_cos", "exact", "exact_layer", "datainf", "cg", "kfac", "ekfac", "repsim", "tracin")
RTOL = {"cg": 1e-6}  # CG stops at a relative residual of 1e-6; everything else is exact in float64


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


class Env:
    pass


def _rows(n, offset=0):
    words = ["red", "blue", "green"]
    return [{"prompt": f"say {words[(i + offset) % 3]} " + "x" * ((i * 3) % 5),
             "response": ["yes", "no way", "maybe so"][(i + offset) % 3] + "!" * (i % 2),
             "group": "abc"[(i + offset) % 3]} for i in range(n)]


def _fake_run(workdir, like, model, lora):
    """A fine-tuning workdir with checkpoints 0, 1, 2 (distinct adapters) and a convergence log (for TracIn)."""
    import orbax.checkpoint as ocp

    from jaxinf.training import checkpoint_manager

    with checkpoint_manager(workdir) as mngr:
        for step in (0, 1, 2):
            ad = init_adapters(jax.random.key(10 + step), model, lora, b_std=0.1)
            mngr.save(step, args=ocp.args.StandardSave({"trainable": ad, "opt_state": {"mu": ad}}))
        mngr.wait_until_finished()
    with open(os.path.join(workdir, "convergence.jsonl"), "w") as f:
        for s, lr in ((1, 0.5), (2, 0.25)):
            f.write(json.dumps({"step": s, "lr": lr}) + "\n")


def _pad(tok: TokenizedRows, extra: int, pad_id: int) -> TokenizedRows:
    """The same rows with `extra` more right-padding positions."""
    n = len(tok)
    return dataclasses.replace(
        tok, input_ids=np.concatenate([tok.input_ids, np.full((n, extra), pad_id, np.int32)], 1),
        attention_mask=np.concatenate([tok.attention_mask, np.zeros((n, extra), np.int32)], 1),
        loss_mask=np.concatenate([tok.loss_mask, np.zeros((n, extra), np.float32)], 1))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with jax.enable_x64(True):
        e = Env()
        e.model = load_model("tiny-llama", dtype=jnp.float64)
        e.lora = LoraConfig(rank=2, alpha=4.0)
        e.adapters = init_adapters(jax.random.key(0), e.model, e.lora, b_std=0.1)
        e.fns = LMFunctions(e.model, e.lora)
        tok = tokenize_rows(e.model.tokenizer, _rows(8) + _rows(3, offset=1), max_length=64, template="plain")
        e.train, e.test = tok.select(np.arange(8)), tok.select(np.arange(8, 11))  # one T: one compile per shape
        e.preset = dataclasses.replace(study.PRESETS["quick"], grad_chunk=4, tracin_checkpoints=2, cg_iters=200)
        e.root = tmp_path_factory.mktemp("invariance")
        e.run = str(e.root / "finetune")
        _fake_run(e.run, e.adapters, e.model, e.lora)
        e.inputs = make_inputs(e, e.train, e.test, "base")
        e.base = {m: study.run_method(m, e.inputs)[0] for m in METHODS}
        yield e


def make_inputs(e, train, test, name, *, chunk=4, grads=None):
    """StudyInputs in a fresh directory (its own K-FAC factor cache) that reads TracIn checkpoints from e.run."""
    d = e.root / name
    d.mkdir(exist_ok=True)
    if not (d / "finetune").exists():
        os.symlink(e.run, d / "finetune")
    if grads is None:
        grads = [attribution.per_example_gradients(e.fns, e.adapters, t, chunk_size=chunk, flatten=False)
                 for t in (train, test)]
    return study.StudyInputs(fns=e.fns, adapters=e.adapters, train=train, test=test, workdir=str(d / "finetune"),
                             preset=dataclasses.replace(e.preset, grad_chunk=chunk), train_grads=grads[0],
                             test_grads=grads[1], seed=0)


def run_methods(e, train, test, name, methods=METHODS, **kw):
    inputs = make_inputs(e, train, test, name, **kw)
    return {m: study.run_method(m, inputs)[0] for m in methods}


def assert_scores_equal(got, want, where):
    for m in got:
        scale = np.abs(want[m]).max()
        np.testing.assert_allclose(got[m], want[m], rtol=RTOL.get(m, 1e-9), atol=RTOL.get(m, 1e-9) * scale,
                                   err_msg=f"{m} changed with {where}")


def test_methods_differ_from_each_other(env):
    """Guard: the invariances below compare informative, distinct score matrices (no constant or copied output)."""
    for m in METHODS:
        assert np.std(env.base[m]) > 1e-6 * np.abs(env.base[m]).max(), m
    assert not np.allclose(env.base["exact"], env.base["grad_dot"], rtol=1e-3)
    assert not np.allclose(env.base["kfac"], env.base["ekfac"], rtol=1e-6)


def _chunk3_padded(env, name, methods):
    pad_id = env.model.tokenizer.pad_token_id
    got = run_methods(env, _pad(env.train, 7, pad_id), _pad(env.test, 7, pad_id), name, methods, chunk=3)
    assert set(got) == set(methods)
    assert_scores_equal(got, env.base, "gradient chunk 3 instead of 4 and 7 more padding positions")


def test_same_scores_whatever_the_chunk_size_and_padding_length(env):
    """Every method but K-FAC/EK-FAC (their new compile is the slow test below): the per-example gradients,
    TracIn's and RepSim's own model passes, and the solvers fed with those gradients."""
    _chunk3_padded(env, "chunk3_padded", [m for m in METHODS if m not in ("kfac", "ekfac")])


@pytest.mark.slow
def test_kfac_factors_whatever_the_batch_size_and_padding_length(env):
    _chunk3_padded(env, "chunk3_padded_kfac", ["kfac", "ekfac"])


def test_query_order_and_training_order_permute_the_scores(env):
    pq, pn = np.array([2, 0, 1]), np.random.default_rng(1).permutation(8)
    got = run_methods(env, env.train.select(pn), env.test.select(pq), "permuted")
    assert_scores_equal(got, {m: s[pq][:, pn] for m, s in env.base.items()}, "test rows and training rows permuted")


def test_scoring_batch_size_and_self_influence(env):
    g = env.inputs.train_grads  # stacked pytree [8, ...]
    flat = np.asarray(attribution.flatten_rows(g))
    solver = ihvp.woodbury(damping=0.05, by="all")  # (G^T G / N + 0.05 I)^{-1}
    state = solver.fit(ihvp_fisher(g), jax.random.key(0))
    full = attribution.pairwise_scores(attribution.precondition_queries(solver, state, g), g, progress=False)
    dense = np.linalg.solve(flat.T @ flat / 8 + 0.05 * np.eye(flat.shape[1]), flat.T).T @ flat.T  # the maths
    np.testing.assert_allclose(full, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())
    pq = attribution.precondition_queries(solver, state, g, chunk_size=4)
    np.testing.assert_allclose(attribution.pairwise_scores(pq, g, chunk_size=3, progress=False), full,
                               rtol=1e-10, atol=1e-12 * np.abs(full).max())
    for chunk in (4, 8):
        si = attribution.self_influence(g, solver, state, chunk_size=chunk)
        np.testing.assert_allclose(si, np.diag(full), rtol=1e-10)
    np.testing.assert_allclose(attribution.self_influence(g), np.diag(flat @ flat.T), rtol=1e-12)
    assert np.abs(full - np.diag(np.diag(full))).max() > 1e-3 * np.abs(np.diag(full)).max()  # off-diagonal matters


def ihvp_fisher(flat_grads):
    from jaxinf.curvature.cached import gradient_fisher_operator
    return gradient_fisher_operator(flat_grads)


def test_interrupted_stages_resume_to_the_same_scores(env):
    # gradients: two pieces (rows 0-4, then 5-7, as a resumed stage would) equal one pass
    whole = attribution.per_example_gradients(env.fns, env.adapters, env.train, chunk_size=4)
    parts = [attribution.per_example_gradients(env.fns, env.adapters, env.train, chunk_size=4, indices=idx)
             for idx in (np.arange(5), np.arange(5, 8))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    # factors: a K-FAC fit killed in each pass and resumed gives the same K-FAC / EK-FAC scores
    inputs = make_inputs(env, env.train, env.test, "interrupted")
    batches = [dict(b) for b in _batches(env.train, 4)]
    directory = os.path.join(os.path.dirname(inputs.workdir), "kfac_factors")
    for stop in (1, 2):  # dies in the covariance pass (after batch 1 of 2), then in the correction pass
        with pytest.raises(kfac.FitInterrupted):
            kfac.fit_factors(env.fns, env.adapters, batches, correct=True, directory=directory, checkpoint_every=1,
                             stop_after=stop)
    for m in METHODS:  # each method's scores recomputed from scratch, factors resumed from the directory
        np.testing.assert_allclose(study.run_method(m, inputs)[0], env.base[m], rtol=RTOL.get(m, 1e-12),
                                   atol=RTOL.get(m, 1e-12) * np.abs(env.base[m]).max(), err_msg=m)


def _batches(tok, size):
    from jaxinf.data import batches
    return batches(tok, size)
