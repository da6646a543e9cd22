"""K-FAC / EK-FAC factors and solvers, contracted pairwise scores, resumable fits (float64, tiny models).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxinf import curvature as cv
from jaxinf import ihvp
from jaxinf.attribution import contracted
from jaxinf.curvature import capture as cap
from jaxinf.curvature import kfac
from jaxinf.ihvp.ekfac import ekfac as ekfac_solver
from jaxinf.ihvp.ekfac import kfac as kfac_solver
from jaxinf.ihvp.ekfac import state_from_factors
from jaxinf.models import LMFunctions, LoraConfig, decoder, init_adapters, load_model


@pytest.fixture(autouse=True)
def true_float64():
    """float64 throughout (the decoder has no hidden float32 casts)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def llama_lora():
    with jax.enable_x64(True):
        model = load_model("tiny-llama", dtype=jnp.float64)
        lora = LoraConfig(rank=2, alpha=8.0)
        return LMFunctions(model, lora), init_adapters(jax.random.key(1), model, lora, b_std=0.3)


@pytest.fixture(scope="module")
def gpt2_full():
    with jax.enable_x64(True):
        model = load_model("tiny-gpt2", dtype=jnp.float64)
        return LMFunctions(model), model.params


@pytest.fixture(scope="module")
def qwen2_full():
    """Full parameters of a decoder model: stacked kernels [L, d_in, d_out], q/k/v biases."""
    with jax.enable_x64(True):
        model = load_model("tiny-qwen2", dtype=jnp.float64)
        return LMFunctions(model), model.params


def _out_projections(layers):
    """(index, layer) of layer 0's attention output and MLP down projections: their inputs at padded positions
    are real activations (a key projection's output at a masked key gets no gradient at all)."""
    wanted = (decoder.module_path("o_proj", 0), decoder.module_path("down_proj", 0))
    return [(j, layer) for j, layer in enumerate(layers) if layer.name in wanted]


def _batch(b, t, seed, prompt=3):
    """Random tokens, ragged right padding, the first `prompt` tokens of each row are not targets."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for r, length in enumerate(rng.integers(t // 2, t + 1, size=b)):
        mask[r, length:] = 0
        ids[r, length:] = 0
    loss_mask = mask.astype(np.float64)
    loss_mask[:, :prompt] = 0.0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def _one_token_batch(first_tokens, targets, t=8):
    """Each row: one real input token x0 and one target y predicted from it (y is a label, not an input), padded
    to length t (the same shape as the other GPT-2 batches, so compiled steps are reused)."""
    n = len(first_tokens)
    ids = np.zeros((n, t), np.int32)
    ids[:, 0], ids[:, 1] = first_tokens, targets
    mask, loss_mask = np.zeros((n, t), np.int32), np.zeros((n, t))
    mask[:, 0], loss_mask[:, 1] = 1, 1.0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def _rel(x, ref):
    """max |x - ref| / max |ref| (0 when both are exactly zero, e.g. q_proj with a single visible token)."""
    err, scale = np.abs(np.asarray(x) - np.asarray(ref)).max(), np.abs(np.asarray(ref)).max()
    return float(err / scale) if scale > 0 else float(err)


_JITTED = {}


def _per_example_grads(fns, trainable, batch):
    """LMFunctions.per_example_grads, jitted once per fns (its eager vmap-of-grad is slow on the CPU)."""
    if fns not in _JITTED:
        _JITTED[fns] = jax.jit(fns.per_example_grads)
    return _JITTED[fns](trainable, batch)


def _layer_grads(fns, trainable, layers, batch):
    """[N, rows * d_out] per-example gradient rows per layer, from LMFunctions.per_example_grads (no capture)."""
    per_example = _per_example_grads(fns, trainable, batch)
    n = batch["input_ids"].shape[0]
    return [np.asarray(layer.matrix_batched(per_example)).reshape(n, -1) for layer in layers]


def _fisher_blocks(fns, trainable, layers, batch):
    """Exact empirical-Fisher block (1/N) sum_n vec(G_n) vec(G_n)^T per layer."""
    return [g.T @ g / g.shape[0] for g in _layer_grads(fns, trainable, layers, batch)]


def _eigenbasis(f, j):
    return np.kron(f.a_eig[j][1], f.s_eig[j][1])


@pytest.mark.parametrize("which", ["gpt2_full", "llama_lora", "qwen2_full"])
def test_kfac_reproduces_exact_fisher_when_input_is_constant(which, request):
    """One input token per example, the same for all 4 examples (different labels): every layer's input a is the
    same for all examples, so A (x) S = (1/N) sum_n a a^T (x) g_n g_n^T is the exact Fisher block; so is EK-FAC."""
    fns, trainable = request.getfixturevalue(which)
    batch = _one_token_batch([65, 65, 65, 65], [66, 120, 7, 200])
    f = kfac.fit_factors(fns, trainable, [batch])
    assert f.num_tokens == 4 and f.num_examples == 4
    grads = _layer_grads(fns, trainable, f.layers, batch)
    rng = np.random.default_rng(0)
    for j, layer in enumerate(f.layers):
        # compare the [d, d] matrices through 8 random probes V: F V = G^T (G V) / N (d up to 3168 here)
        probes = rng.normal(size=(layer.size, 8))
        exact = grads[j].T @ (grads[j] @ probes) / 4
        qa, qs = f.a_eig[j][1], f.s_eig[j][1]
        p = probes.reshape(layer.rows, layer.d_out, 8)
        kron = np.einsum("ij,jpk,op->iok", f.a_cov[j], p, f.s_cov[j]).reshape(-1, 8)  # (A (x) S) vec(V)
        rot = np.einsum("ji,jpk,po->iok", qa, p, qs) * f.corrected[j][..., None]
        eig = np.einsum("ij,jpk,op->iok", qa, rot, qs).reshape(-1, 8)  # Q diag(Lambda) Q^T vec(V)
        assert _rel(kron, exact) < 1e-10, layer.name
        assert _rel(eig, exact) < 1e-10, layer.name


def test_ekfac_on_one_example_equals_dense_damped_fisher_inverse(llama_lora):
    """One example (one input token): EK-FAC and K-FAC apply == (F_l + lambda_l I)^{-1} v_l with the exact
    empirical-Fisher block F_l and lambda_l = 0.1 tr(F_l) / d_l (relative damping). (Adapters on v_proj and
    up_proj: with a single visible token q_proj's gradient is exactly zero, and so would be its relative damping.)"""
    model = llama_lora[0].model
    lora = LoraConfig(rank=2, alpha=8.0, targets=("v_proj", "up_proj"))
    fns, trainable = LMFunctions(model, lora), init_adapters(jax.random.key(2), model, lora, b_std=0.3)
    batch = _one_token_batch([40], [99])
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), trainable)
    for solver in (ekfac_solver(ihvp.relative(0.1)), kfac_solver(ihvp.relative(0.1))):
        state = solver.fit(fns, trainable, [batch])
        x = solver.apply(state, v)
        exact = _fisher_blocks(fns, trainable, state.layers, batch)
        for j, layer in enumerate(state.layers):
            lam = 0.1 * np.trace(exact[j]) / layer.size
            np.testing.assert_allclose(float(state.dampings[j]), lam, rtol=1e-10)
            ref = np.linalg.solve(exact[j] + lam * np.eye(layer.size), np.asarray(layer.matrix(v)).ravel())
            assert _rel(np.asarray(layer.matrix(x)).ravel(), ref) < 1e-8, (solver.name, layer.name)


def test_factors_and_solvers_against_explicit_kronecker_algebra(gpt2_full):
    """Many tokens, padding, biases, transposed kernels: A, S, EK-FAC eigenvalues and both solvers by definition."""
    fns, trainable = gpt2_full
    batches = [_batch(4, 8, 0), _batch(4, 8, 1)]
    f = kfac.fit_factors(fns, trainable, batches)
    assert f.num_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    captures = [jax.jit(lambda b: cap.capture(fns, trainable, b))(b) for b in batches]
    per_example = [_per_example_grads(fns, trainable, b) for b in batches]
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(4), x.shape, x.dtype),
                     cap.restrict(trainable, f.layers))
    xk = kfac_solver(1e-3).apply(state_from_factors(f, "kfac", 1e-3, trainable), v)
    xe = ekfac_solver(1e-3).apply(state_from_factors(f, "ekfac", 1e-3, trainable), v)
    for j, layer in _out_projections(f.layers):  # dense algebra on o_proj [33x32] and down_proj [65x32]
        a = np.concatenate([np.asarray(c[layer.name][0])[np.asarray(b["attention_mask"], bool)]
                            for c, b in zip(captures, batches)])
        g = np.concatenate([np.asarray(c[layer.name][1])[np.asarray(b["attention_mask"], bool)]
                            for c, b in zip(captures, batches)])
        assert _rel(f.a_cov[j], a.T @ a / len(a)) < 1e-12  # mean over real tokens
        assert _rel(f.s_cov[j], g.T @ g / 8) < 1e-12  # token sum, mean over the 8 examples
        grads = np.concatenate([np.asarray(layer.matrix_batched(p)) for p in per_example])
        rot = np.einsum("ij,nio,op->njp", f.a_eig[j][1], grads, f.s_eig[j][1])
        assert _rel(f.corrected[j], np.mean(rot ** 2, axis=0)) < 1e-10
        vec = np.asarray(layer.matrix(v)).ravel()
        ref_k = np.linalg.solve(np.kron(f.a_cov[j], f.s_cov[j]) + 1e-3 * np.eye(layer.size), vec)
        q = _eigenbasis(f, j)
        ref_e = q @ ((q.T @ vec) / (f.corrected[j].ravel() + 1e-3))
        assert _rel(np.asarray(layer.matrix(xk)).ravel(), ref_k) < 1e-8, layer.name
        assert _rel(np.asarray(layer.matrix(xe)).ravel(), ref_e) < 1e-8, layer.name


def test_padding_that_carries_loss_enters_the_factors(gpt2_full):
    """loss_on="all_with_padding": padding targets carry loss, so the padding positions before them have nonzero
    output gradients g_t; S must hold every nonzero g_t g_t^T (the sum over ALL positions), A the inputs of those
    positions, N_tok their count."""
    fns, trainable = gpt2_full
    batch = _batch(4, 8, 0)
    batch = dict(batch, loss_mask=jnp.ones_like(batch["loss_mask"]).at[:, 0].set(0.0))  # loss on padding too
    assert int(batch["attention_mask"].sum()) < 4 * 7  # there is padding with loss
    # full parameters: the embedding, positions and norms are not linear layers, and the fit says so
    with pytest.warns(UserWarning, match=r"K-FAC covers 12 of 20 trainable leaves; \['embed', 'final_norm/bias'"):
        f = kfac.fit_factors(fns, trainable, [batch])
    c = jax.jit(lambda b: cap.capture(fns, trainable, b))(batch)
    counted = np.zeros((4, 8), bool)
    counted[:, :7] = True  # every position t < 7 predicts a target t + 1 with loss; the last one predicts none
    counted |= np.asarray(batch["attention_mask"], bool)
    assert f.num_tokens == int(counted.sum())
    for j, layer in _out_projections(f.layers):
        a, g = np.asarray(c[layer.name][0]), np.asarray(c[layer.name][1])
        assert np.abs(g[~np.asarray(batch["attention_mask"], bool)]).max() > 0  # padding gradients are real
        g_all = g.reshape(-1, g.shape[-1])
        assert _rel(f.s_cov[j], g_all.T @ g_all / 4) < 1e-12, layer.name  # every nonzero g_t counted
        a_c = a[counted]
        assert _rel(f.a_cov[j], a_c.T @ a_c / len(a_c)) < 1e-12, layer.name


def test_contracted_scores_equal_explicit_gradient_dot_products(gpt2_full):
    """score[q, n] = sum_l einsum('qio,nti,nto->qn') == <P_q, grad_n> with explicit per-example gradients."""
    fns, trainable = gpt2_full
    layers = cap.lm_layers(fns, trainable)
    train = [_batch(4, 8, 5), _batch(4, 8, 6)]
    pre = cap.restrict(trainable, layers)
    pre = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), (2,) + x.shape, x.dtype), pre)
    scores = contracted.contracted_scores(fns, trainable, pre, train, chunk=3)  # chunks of 3 + 1 rows
    spec = cv.TreeSpec.of(cap.restrict(trainable, layers))
    grads = np.concatenate([np.asarray(jax.vmap(spec.ravel)(cap.restrict(_per_example_grads(fns, trainable, b),
                                                                         layers))) for b in train])
    explicit = np.asarray(jax.vmap(spec.ravel)(pre)) @ grads.T
    assert scores.shape == (2, 8)
    assert _rel(scores, explicit) < 1e-10
    # query gradients from a capture equal LMFunctions.per_example_grads
    q = contracted.query_gradients(fns, trainable, train[0])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12), q,
                 cap.restrict(_per_example_grads(fns, trainable, train[0]), layers))


def test_interrupted_fit_resumes_to_identical_factors(llama_lora, tmp_path):
    fns, trainable = llama_lora
    batches = [_batch(2, 8, 10 + i) for i in range(5)]
    opts = dict(fisher="true", key=jax.random.key(11), num_samples=2, checkpoint_every=2)
    reference = kfac.fit_factors(fns, trainable, batches, **opts)
    d = str(tmp_path / "factors")
    with pytest.raises(kfac.FitInterrupted):  # dies in the covariance pass after 3 batches (checkpoint at 2)
        kfac.fit_factors(fns, trainable, batches, directory=d, stop_after=3, **opts)
    with pytest.raises(kfac.FitInterrupted):  # resumes at batch 2, dies in the correction pass
        kfac.fit_factors(fns, trainable, batches, directory=d, stop_after=4, **opts)
    resumed = kfac.fit_factors(fns, trainable, batches, directory=d, **opts)
    reused = kfac.fit_factors(fns, trainable, batches, directory=d, stop_after=0, **opts)  # loads, no pass
    for got in (resumed, reused):
        for name in ("a_cov", "s_cov", "corrected"):
            for x, y in zip(getattr(got, name), getattr(reference, name)):
                np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="different fit"):
        kfac.fit_factors(fns, trainable, batches[:4], directory=d, **opts)
    # save / load, and a solver fitted from saved factors
    kfac.save_factors(str(tmp_path / "saved"), reference)
    loaded = kfac.load_factors(str(tmp_path / "saved"))
    assert loaded.layers == reference.layers
    solver = ekfac_solver(ihvp.relative(0.1))
    v = jax.tree.map(jnp.ones_like, trainable)
    jax.tree.map(np.testing.assert_array_equal, solver.apply(solver.fit(loaded), v),
                 solver.apply(solver.fit(reference, trainable), v))


def test_ekfac_influence_rank_correlates_with_exact_ggn_influence(llama_lora):
    """Measured agreement with the exact damped Gauss-Newton inverse (tiny-llama, LoRA r=2 on q/v, 448 params).

    24 training x 8 test sequences of 16 random tokens; exact: direct(lambda) on the dense GGN of the mean training
    loss; EK-FAC / K-FAC: true Fisher (8 label draws per example, which estimates the same GGN), the same absolute
    lambda = 0.1 * mean GGN eigenvalue. Spearman over all 192 test x train pairs of <P grad_test, grad_train>.

    Measured here (seed 0): EK-FAC 0.576, K-FAC 0.450, no preconditioner 0.231. Over 10 seeds of this set-up
    (adapters and tokens redrawn): EK-FAC median 0.57 (min 0.38), K-FAC median 0.50, identity median 0.25, and the
    exact per-layer block-diagonal GGN inverse median 0.89 (min 0.83): on tiny random models most of the gap is the
    within-layer Kronecker factorisation, not the block-diagonal structure. EK-FAC above K-FAC holds in the median
    but not for every seed (0.57 vs 0.50), so it is not asserted; what is: both preconditioners beat none, EK-FAC by
    a margin of 0.1 (0.345 here; 0.151 with the tiny model's seed shifted by 7, `pytest --tiny-seed=7`), and the
    true-Fisher convention through the trace of each layer's GGN block
    (an empirical-Fisher fit has ~1/K of it with K targets per row). The exact K-FAC/EK-FAC algebra has its own
    tests against explicit Kronecker products above.
    """
    fns, trainable = llama_lora
    train = [_batch(8, 16, 20 + i, prompt=4) for i in range(3)]
    test = [_batch(8, 16, 30, prompt=4)]
    op = cv.ggn_operator(fns.logits, fns.output_loss, trainable, train)
    dense = np.asarray(cv.dense_matrix(op))  # [448, 448] in ravel_pytree order
    lam = 0.1 * np.trace(dense) / len(dense)
    exact_state = ihvp.fit_matrix(jnp.asarray(dense), op.spec, lam)
    queries = contracted.query_gradients(fns, trainable, test[0])
    exact = contracted.contracted_scores(fns, trainable, ihvp.direct(lam).apply_batched(exact_state, queries), train)

    factors = kfac.fit_factors(fns, trainable, train, fisher="true", key=jax.random.key(0), num_samples=32)
    # the true-Fisher convention: EK-FAC eigenvalues sum to the trace of the layer's GGN block (in expectation; with
    # 32 label draws per example the ratio is within 0.1 of 1 on every layer here, 8 draws scatter it by ~0.3)
    flat_index = op.spec.unravel(jnp.arange(op.spec.size, dtype=jnp.float64))
    for j, layer in enumerate(factors.layers):
        idx = np.asarray(layer.matrix(flat_index)).ravel().astype(int)
        assert abs(factors.corrected[j].sum() / np.trace(dense[np.ix_(idx, idx)]) - 1) < 0.15, layer.name

    rho = {}
    for kind in ("ekfac", "kfac"):
        state = state_from_factors(factors, kind, lam, trainable)
        scores = contracted.pairwise_scores(fns, trainable, test, train, ekfac_solver(), state)
        rho[kind] = scipy.stats.spearmanr(scores.ravel(), exact.ravel())[0]
    identity = contracted.contracted_scores(fns, trainable, queries, train)
    rho["identity"] = scipy.stats.spearmanr(identity.ravel(), exact.ravel())[0]
    print("spearman vs exact GGN influence:", rho)
    assert rho["ekfac"] > rho["identity"] + 0.1, rho
    assert rho["kfac"] > rho["identity"], rho
