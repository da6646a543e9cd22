"""Bring your own model: a causal LM that is not jaxinf's (a pure-JAX bigram model with a hidden layer) gets the
gradient methods and the exact damped-Fisher inverse through the documented contract (docs/models.md), checked
in float64 against a dense computation by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxinf import attribution, ihvp
from jaxinf.curvature import operators
from jaxinf.data.byte_tokenizer import byte_level_tokenizer
from jaxinf.models import LMFunctions


@dataclasses.dataclass(frozen=True, eq=False)
class BigramLM:
    """Not ours: logits of token t from token t alone, through one tanh layer. The contract: name, params,
    tokenizer, max_length, dtype, and apply(params, input_ids, attention_mask, *, output_hidden=False) -> logits
    [B, T, V] (and the last hidden state with output_hidden)."""

    name: str
    params: dict
    tokenizer: object
    max_length: int = 64

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def apply(self, params, input_ids, attention_mask, *, output_hidden=False):
        h = jnp.tanh(params["embed"][input_ids] @ params["w"])
        logits = h @ params["out"]
        return (logits, h) if output_hidden else logits


def _rows(tokenizer, texts):
    tok = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    ids, mask = np.asarray(tok["input_ids"]), np.asarray(tok["attention_mask"])
    loss_mask = mask.astype(np.float64)
    loss_mask[:, 0] = 0.0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def test_a_model_that_is_not_ours_gets_gradients_and_the_exact_inverse():
    with jax.enable_x64(True):
        tokenizer = byte_level_tokenizer()
        V, H = len(tokenizer), 6
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        params = {"embed": 0.5 * jax.random.normal(k1, (V, H), jnp.float64),
                  "w": 0.5 * jax.random.normal(k2, (H, H), jnp.float64),
                  "out": 0.5 * jax.random.normal(k3, (H, V), jnp.float64)}
        model = BigramLM("bigram", params, tokenizer)
        fns = LMFunctions(model)  # full parameters: every leaf is trainable
        train = _rows(tokenizer, ["abc", "abd", "hello", "help me", "xyz", "xy"])
        test = _rows(tokenizer, ["abe", "hello there"])

        def by_hand(batch):  # each row's mean next-token NLL over its targets, differentiated row by row
            def loss(p, i):
                logits = jnp.tanh(p["embed"][batch["input_ids"][i]] @ p["w"]) @ p["out"]
                logp = jax.nn.log_softmax(logits[:-1], -1)
                nll = -jnp.take_along_axis(logp, batch["input_ids"][i][1:, None], -1)[:, 0]
                m = batch["loss_mask"][i][1:]
                return (nll * m).sum() / m.sum()

            return np.stack([np.asarray(ravel_pytree(jax.grad(loss)(params, i))[0])
                             for i in range(batch["input_ids"].shape[0])])

        g_train = attribution.per_example_gradients(fns, params, train, chunk_size=4)
        g_test = attribution.per_example_gradients(fns, params, test, chunk_size=4)
        np.testing.assert_allclose(g_train, by_hand(train), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g_test, by_hand(test), rtol=1e-10, atol=1e-13)

        # the exact inverse of the damped empirical Fisher, (F + lambda I)^-1 g_q, through jaxinf's Woodbury solver
        op = operators.fisher_operator(fns.per_example_loss, params, [train])
        lam = 1e-3
        solver = ihvp.woodbury(lam, by="all")
        state = solver.fit(op)
        _, unravel = ravel_pytree(params)
        fisher = g_train.T @ g_train / len(g_train)
        for q in range(len(g_test)):
            x = ravel_pytree(solver.apply(state, unravel(jnp.asarray(g_test[q]))))[0]
            want = np.linalg.solve(fisher + lam * np.eye(len(fisher)), g_test[q])
            np.testing.assert_allclose(np.asarray(x), want, rtol=1e-8, atol=1e-12 * np.abs(want).max())
