"""Attribution on tiny-llama with LoRA adapters (b_std = 0.1, so A and B gradients are nonzero), float64."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxinf.attribution import (LazyGradients, candidate_scores, flatten_rows, gradient_cosine, gradient_dot,
                                hidden_representations, load_scores, low_rank_queries, low_rank_scores,
                                pairwise_scores, per_example_gradients, per_token_losses, per_token_scores,
                                precondition_queries, query_batched_scores, repsim_scores, self_influence,
                                tfidf_candidates, token_id_docs, tracin_checkpoints, tracin_lr_weights,
                                tracin_scores, unflatten_rows, word_tokens)
from jaxinf.attribution.gradients import _chunk_grads
from jaxinf.data import tokenize_rows
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model


def _close(actual, expected):
    """rtol 1e-12 with an absolute floor at 1e-12 of the largest entry: score matrices mix signs, so an entry whose
    dot product cancels has a relative error far above 1e-12 with nothing wrong."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * float(np.abs(expected).max()))


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


class Setup:
    pass


@pytest.fixture(scope="module")
def env():
    with jax.enable_x64(True):  # jaxinf keeps float64 models in float64 (see jaxinf/models/causal_lm.py)
        e = Setup()
        e.model = load_model("tiny-llama", dtype=jnp.float64)
        e.lora = LoraConfig(rank=4, alpha=8.0)
        e.adapters = init_adapters(jax.random.key(0), e.model, e.lora, b_std=0.1)
        e.fns = LMFunctions(e.model, e.lora)
        rows = [{"prompt": "ask " + "xyz"[i % 3] * (1 + i % 4), "response": ["yes", "no way", "maybe so"][i % 3],
                 "group": "abc"[i % 3]} for i in range(13)]
        tok = tokenize_rows(e.model.tokenizer, rows, max_length=64, template="plain")
        e.tok, e.train, e.test = tok, tok.select(np.arange(10)), tok.select(np.arange(10, 13))
        e.grad_one = jax.jit(jax.grad(e.fns.loss))  # loss of a one-row batch = L_n
        e.G = per_example_gradients(e.fns, e.adapters, e.train, chunk_size=4)  # [10, D]
        e.Gq = per_example_gradients(e.fns, e.adapters, e.test, chunk_size=4)  # [3, D]
        d = e.G.shape[1]
        r = np.random.default_rng(0).normal(size=(d, d)) / np.sqrt(d)
        e.M = r @ r.T + 0.5 * np.eye(d)  # a symmetric positive definite "preconditioner" P
        e.solver = MatrixSolver(e.M)
        e.PQ = e.Gq @ e.M
        yield e


class MatrixSolver:
    """Stand-in iHVP solver with P = M: apply_batched(state, vs) = unravel(ravel(vs) @ M)."""

    def __init__(self, m):
        self.m = m

    def apply_batched(self, state, vs):
        return unflatten_rows(flatten_rows(vs) @ jnp.asarray(self.m), vs)


def _row(tok, i):
    return {k: jnp.asarray(getattr(tok, k)[i:i + 1]) for k in ("input_ids", "attention_mask", "loss_mask")}


# ----------------------------------------------------------------------------------------------- gradients
def test_per_example_gradient_chunks_equal_a_python_loop(env):
    loop = np.stack([ravel_pytree(env.grad_one(env.adapters, _row(env.train, i)))[0] for i in range(10)])
    np.testing.assert_allclose(env.G, loop, rtol=1e-12, atol=1e-14)
    assert env.G.dtype == np.float64
    tree = per_example_gradients(env.fns, env.adapters, env.train, chunk_size=4, flatten=False)
    # flatten=False and flatten=True are two compiled programs: equal up to rounding, not bit for bit
    np.testing.assert_allclose(flatten_rows(tree), env.G, rtol=1e-13, atol=1e-15 * np.abs(env.G).max())
    for layer in tree.values():  # every adapter factor of every layer gets gradient signal
        assert np.abs(layer["A"]).max() > 1e-6 and np.abs(layer["B"]).max() > 1e-6
    # A new chunk size compiles exactly once although the last chunk (10 = 3 + 3 + 3 + 1) is short.
    before = _chunk_grads._cache_size()
    g3 = per_example_gradients(env.fns, env.adapters, env.train, chunk_size=3, dtype=np.float32)
    compiled = _chunk_grads._cache_size()
    assert compiled - before <= 1  # 0 when an earlier test (or a rerun) already compiled chunk size 3
    per_example_gradients(env.fns, env.adapters, env.train, chunk_size=3, dtype=np.float32)
    assert _chunk_grads._cache_size() == compiled
    assert g3.dtype == np.float32
    np.testing.assert_allclose(g3, env.G, rtol=1e-5, atol=1e-7)
    lazy = LazyGradients(env.fns, env.adapters, env.train, chunk_size=4)
    np.testing.assert_allclose(np.asarray(lazy[2:7]), env.G[2:7], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(lazy[np.array([9, 0, 5])]), env.G[[9, 0, 5]], rtol=1e-12, atol=1e-14)
    assert len(lazy) == 10


# ----------------------------------------------------------------------------------------------- pairwise scores
class Flaky:
    """A row source that counts accesses and raises on access number `fail_at`."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.inner[index]


def test_preconditioned_queries_and_streamed_resumable_scores(env, tmp_path):
    gq_tree = unflatten_rows(env.Gq, env.adapters, stacked=False)
    pq = precondition_queries(env.solver, None, gq_tree, chunk_size=2)
    np.testing.assert_allclose(pq, env.PQ, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(precondition_queries(env.solver, None, env.Gq, like=env.adapters), env.PQ,
                               rtol=1e-12, atol=1e-12)
    expected = env.PQ @ env.G.T  # one-shot [3, 10]

    lazy = LazyGradients(env.fns, env.adapters, env.train, chunk_size=4)
    out = str(tmp_path / "scores")
    flaky = Flaky(lazy, fail_at=3)
    with pytest.raises(RuntimeError, match="interruption"):
        pairwise_scores(pq, flaky, chunk_size=3, out_dir=out, progress=False)
    saved = sorted(f for f in os.listdir(out) if f.endswith(".npy"))
    assert saved == ["scores_000000000_000000003.npy", "scores_000000003_000000006.npy"]
    counting = Flaky(lazy)
    resumed = pairwise_scores(pq, counting, chunk_size=3, out_dir=out, progress=False)
    assert counting.calls == 2  # only the chunks [6, 9) and [9, 10) were computed
    np.testing.assert_allclose(resumed, expected, rtol=1e-12, atol=1e-14)
    uninterrupted = pairwise_scores(pq, lazy, chunk_size=3, progress=False)
    np.testing.assert_array_equal(resumed, uninterrupted)
    np.testing.assert_array_equal(load_scores(out), resumed)
    # Same directory, other queries: refused instead of silently mixing results.
    with pytest.raises(ValueError, match="another computation"):
        pairwise_scores(2 * pq, lazy, chunk_size=3, out_dir=out, progress=False)
    # Matrix and stacked-pytree training gradients give the same matrix.
    _close(pairwise_scores(pq, env.G, chunk_size=4, progress=False), expected)
    tree = unflatten_rows(env.G, env.adapters, stacked=False)
    _close(pairwise_scores(pq, tree, chunk_size=7, progress=False), expected)


def test_self_influence_and_gradient_baselines(env):
    lazy = LazyGradients(env.fns, env.adapters, env.train, chunk_size=4)
    expected = np.einsum("nd,de,ne->n", env.G, env.M, env.G)
    _close(self_influence(lazy, env.solver, None, chunk_size=3), expected)
    _close(self_influence(env.G, chunk_size=4), (env.G ** 2).sum(1))
    _close(gradient_dot(env.Gq, lazy, progress=False), env.Gq @ env.G.T)
    cos = np.array([[q @ g / np.sqrt(q @ q) / np.sqrt(g @ g) for g in env.G] for q in env.Gq])
    _close(gradient_cosine(env.Gq, lazy, progress=False), cos)
    assert np.abs(cos).max() <= 1.0 + 1e-12


def test_per_token_scores_sum_to_sequence_scores(env):
    batch = {k: getattr(env.train, k)[:5] for k in ("input_ids", "attention_mask", "loss_mask")}
    directions = unflatten_rows(env.PQ, env.adapters, stacked=False)
    tok = per_token_scores(env.fns, env.adapters, batch, directions)  # [3, 5, T]
    assert tok.shape == (3, 5, batch["input_ids"].shape[1])
    np.testing.assert_allclose(tok.sum(-1), env.PQ @ env.G[:5].T, rtol=0, atol=1e-8)
    assert np.all(tok[:, batch["loss_mask"] == 0] == 0.0)  # only target tokens contribute
    assert (np.abs(tok) > 1e-8).sum(-1).min() >= 2  # spread over several tokens, not one
    single = per_token_scores(env.fns, env.adapters, batch, jax.tree.map(lambda x: x[1], directions))
    np.testing.assert_allclose(single, tok[1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(per_token_scores(env.fns, env.adapters, batch, env.PQ[1]), tok[1], rtol=1e-12,
                               atol=1e-15)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = jax.jit(lambda p, b: (per_token_losses(env.fns, p, b).sum(-1), env.fns.per_example_loss(p, b)))
    np.testing.assert_allclose(*losses(env.adapters, jb), rtol=1e-13)


# ----------------------------------------------------------------------------------------------- query batching
def test_query_batching_full_rank_equals_no_batching(env):
    queries = unflatten_rows(env.PQ, env.adapters, stacked=False)  # LoRA leaves: A [32, 4], B [4, 32 or 16]
    exact = env.PQ @ env.G.T
    full = low_rank_queries(queries, rank=4)
    lazy_tree = LazyGradients(env.fns, env.adapters, env.train, chunk_size=4, flatten=False)
    np.testing.assert_allclose(low_rank_scores(full, lazy_tree), exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(low_rank_scores(full, env.G, chunk_size=3), exact, rtol=1e-10, atol=1e-12)

    # Rank 1 is an approximation equal to an independent numpy truncated SVD of every layer matrix.
    r1 = low_rank_queries(queries, rank=1)
    assert r1.num_stored() < env.PQ.size
    trunc = []
    for leaf in jax.tree.leaves(queries):
        u, s, vt = np.linalg.svd(np.asarray(leaf), full_matrices=False)
        trunc.append(np.einsum("qi,qj->qij", u[:, :, 0] * s[:, :1], vt[:, 0, :]))
    manual = np.concatenate([t.reshape(3, -1) for t in trunc], axis=1) @ env.G.T
    approx = low_rank_scores(r1, lazy_tree)
    np.testing.assert_allclose(approx, manual, rtol=1e-10, atol=1e-12)
    assert np.abs(approx - exact).max() > 1e-3 * np.abs(exact).max()  # rank 1 really is approximate here

    res = query_batched_scores(queries, lazy_tree, rank=1, top_k=3)
    np.testing.assert_allclose(res.approx, manual, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.sort(res.top_indices, 1), np.sort(np.argsort(-manual, 1)[:, :3], 1))
    _close(res.top_scores, np.take_along_axis(exact, res.top_indices, 1))
    merged = res.scores()
    rows = np.arange(3)[:, None]
    _close(merged[rows, res.top_indices], exact[rows, res.top_indices])
    res_full = query_batched_scores(queries, env.G, rank=4, top_k=10)
    np.testing.assert_allclose(res_full.scores(), exact, rtol=1e-10, atol=1e-12)


def test_query_batching_generic_tree_keeps_vectors_exact():
    rng = np.random.default_rng(1)
    q = {"w": rng.normal(size=(2, 6, 5)), "b": rng.normal(size=(2, 5))}
    g = {"w": rng.normal(size=(7, 6, 5)), "b": rng.normal(size=(7, 5))}
    exact = flatten_rows(q) @ flatten_rows(g).T
    np.testing.assert_allclose(low_rank_scores(low_rank_queries(q, 5), g), exact, rtol=1e-10)
    u, s, vt = np.linalg.svd(q["w"], full_matrices=False)
    w2 = np.einsum("qik,qk,qkj->qij", u[:, :, :2], s[:, :2], vt[:, :2])
    manual = np.einsum("qij,nij->qn", w2, g["w"]) + q["b"] @ g["b"].T
    np.testing.assert_allclose(low_rank_scores(low_rank_queries(q, 2), g), manual, rtol=1e-10)


# ----------------------------------------------------------------------------------------------- TF-IDF
def test_tfidf_hand_example_and_candidate_scores(env):
    train = ["The cat sat.", "the dog sat", "A bird flew"]
    idx, sims = tfidf_candidates(["cat CAT unknownword"], train, 3)
    # idf = ln((1 + 3) / (1 + df)) + 1: df(the) = df(sat) = 2, df(cat) = 1.
    idf1, idf2 = np.log(4 / 2) + 1, np.log(4 / 3) + 1
    cos0 = idf1 / np.sqrt(2 * idf2 ** 2 + idf1 ** 2)  # the query is the unit vector on "cat"
    assert idx[0, 0] == 0
    _close(sims[0], [cos0, 0.0, 0.0])
    assert word_tokens("Hello, WORLD_1 x") == ["hello", "world_1", "x"]
    # Two queries over the model's training rows by token ids: each row's best match is itself.
    docs = token_id_docs(env.train)
    idx2, sims2 = tfidf_candidates([docs[4], docs[7]], docs, 4)
    np.testing.assert_array_equal(idx2[:, 0], [4, 7])
    _close(sims2[:, 0], 1.0)
    # Gradient scores restricted to the TF-IDF candidates.
    lazy = LazyGradients(env.fns, env.adapters, env.train, chunk_size=4)
    cs = candidate_scores(env.PQ[:2], lazy, idx2, chunk_size=3)
    full = env.PQ[:2] @ env.G.T
    mask = np.zeros_like(full, bool)
    mask[np.arange(2)[:, None], idx2] = True
    _close(cs[mask], full[mask])
    assert np.all(np.isneginf(cs[~mask]))


# ----------------------------------------------------------------------------------------------- TracIn
def test_tracin_lr_weights_from_log(tmp_path):
    rows = [{"step": s, "lr": lr, "loss": 1.0} for s, lr in zip([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])]
    np.testing.assert_allclose(tracin_lr_weights(rows, [0, 2]), [0.1 + 0.2, 0.3 + 0.4])
    np.testing.assert_allclose(tracin_lr_weights(rows, [0, 2, 4]), [0.3, 0.7, 0.0])
    np.testing.assert_allclose(tracin_lr_weights(rows, [0, 2, 4], rule="right"), [0.0, 0.3, 0.7])
    np.testing.assert_allclose(tracin_lr_weights(rows, [1, 3], rule="right"), [0.1, 0.2 + 0.3])
    with pytest.raises(ValueError, match="lacks steps"):
        tracin_lr_weights(rows[:2], [0, 2, 4])


def test_tracin_against_hand_computation_on_two_fake_checkpoints(env, tmp_path):
    import orbax.checkpoint as ocp

    from jaxinf.training import checkpoint_manager

    workdir = str(tmp_path / "run")
    ckpts = {0: init_adapters(jax.random.key(1), env.model, env.lora, b_std=0.1),
             2: init_adapters(jax.random.key(2), env.model, env.lora, b_std=0.1)}
    with checkpoint_manager(workdir) as mngr:
        for step, ad in ckpts.items():
            mngr.save(step, args=ocp.args.StandardSave({"trainable": ad, "opt_state": {"mu": ad}}))
        mngr.wait_until_finished()
    with open(os.path.join(workdir, "convergence.jsonl"), "w") as f:
        for s, lr in zip([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]):
            f.write(json.dumps({"step": s, "lr": lr}) + "\n")
    loaded = tracin_checkpoints(workdir, env.adapters)
    assert [w for _, w in loaded] == pytest.approx([0.3, 0.7])
    ours = tracin_scores(env.fns, loaded, env.test, env.train, chunk_size=4)
    hand = np.zeros((3, 10))
    for (step, ad), w in zip(ckpts.items(), [0.3, 0.7]):
        for q in range(3):
            gq = ravel_pytree(env.grad_one(ad, _row(env.test, q)))[0]
            for n in range(10):
                hand[q, n] += w * float(gq @ ravel_pytree(env.grad_one(ad, _row(env.train, n)))[0])
    np.testing.assert_allclose(ours, hand, rtol=1e-10, atol=1e-14)
    # One checkpoint alone is different: both really contribute.
    assert np.abs(tracin_scores(env.fns, loaded[:1], env.test, env.train, chunk_size=4) - hand).max() > 1e-6


# ----------------------------------------------------------------------------------------------- RepSim
def test_repsim_equals_numpy_cosine(env):
    def reps(tok):
        """Hidden states of the padded batch by a direct model call; positions picked in numpy."""
        _, h = env.model.apply(env.model.params, jnp.asarray(tok.input_ids), jnp.asarray(tok.attention_mask),
                               adapters=env.adapters, lora_scale=env.lora.scale, output_hidden=True)
        h = np.asarray(h)
        end, mean = [], []
        for i in range(len(tok)):
            n, pe = int(tok.attention_mask[i].sum()), int(tok.prompt_end[i])
            end.append(h[i, pe])
            mean.append(h[i, pe + 1:n].mean(0))  # the response tokens
        return np.array(end), np.array(mean)

    def cos(a, b):
        return np.array([[x @ y / np.sqrt(x @ x) / np.sqrt(y @ y) for y in b] for x in a])

    end, mean = reps(env.tok)  # rows 0..9 are the training rows, 10..12 the test rows
    (qe, qm), (te, tm) = (end[10:], mean[10:]), (end[:10], mean[:10])
    np.testing.assert_allclose(hidden_representations(env.fns, env.adapters, env.test), qe, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(repsim_scores(env.fns, env.adapters, env.test, env.train), cos(qe, te),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(repsim_scores(env.fns, env.adapters, env.test, env.train, pooling="response_mean"),
                               cos(qm, tm), rtol=1e-10, atol=1e-12)
    assert np.abs(cos(qe, te) - cos(qm, tm)).max() > 1e-3  # the two poolings really differ
