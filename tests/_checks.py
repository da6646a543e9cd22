"""Assertions several test files share."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_teacher_forced_greedy(logits, answer, slack=1e-3):
    """Each answer token is the model's top choice given the true prefix, up to `slack` nats: a float32 near-tie
    between the top two tokens (possible after a 135M-parameter pass whose matmul kernels differ by CPU) does not
    decide the test. logits: [len(answer), V], row t predicting answer[t]."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    chosen = logp[np.arange(len(answer)), np.asarray(answer)]
    assert np.all(chosen >= logp.max(-1) - slack), (chosen - logp.max(-1)).tolist()
