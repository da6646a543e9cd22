"""bfloat16 models: base weights and activations in bfloat16, adapters, gradients, K-FAC sums and scores in float32;
the scores rank training rows as the float32 model's do (tiny-llama LoRA, built-in backdoor task)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxinf import attribution
from jaxinf import data as jdata
from jaxinf.curvature.kfac import fit_factors
from jaxinf.ihvp import relative
from jaxinf.ihvp.ekfac import ekfac, state_from_factors
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model

LORA = LoraConfig(rank=4, alpha=32.0)
THRESHOLD = 0.995  # mean per-query Spearman; measured 0.9995 (grad_dot and EK-FAC, 32 train x 6 test rows)


@pytest.fixture(scope="module")
def task():
    model = load_model("tiny-llama")
    kw = dict(max_length=160, template="chat", loss_on="response")
    train = jdata.tokenize_rows(model.tokenizer, jdata.load_rows("backdoor", "train", limit=16, seed=0), **kw)
    test = jdata.tokenize_rows(model.tokenizer, jdata.load_rows("backdoor", "test", limit=4, seed=0), **kw)
    return train, test, init_adapters(jax.random.key(1), model, LORA, b_std=0.3)  # float32 adapters


def _scores(dtype, task, grad_cast=None):
    """grad_dot and EK-FAC score matrices [test, train] of the model in `dtype` (adapters float32 as given)."""
    train, test, adapters = task
    fns = LMFunctions(load_model("tiny-llama", dtype=dtype), LORA)
    g_train = attribution.per_example_gradients(fns, adapters, train, chunk_size=8)
    g_test = attribution.per_example_gradients(fns, adapters, test, chunk_size=8)
    if grad_cast is not None:
        g_train, g_test = (np.asarray(np.asarray(g, grad_cast), np.float32) for g in (g_train, g_test))
    factors = fit_factors(fns, adapters, list(jdata.batches(train, 8)), correct=True)
    state = state_from_factors(factors, "ekfac", relative(0.1), adapters)
    pq = ekfac(relative(0.1)).apply_batched(state, attribution.unflatten_rows(jnp.asarray(g_test), adapters,
                                                                              stacked=False))
    out = {"grad_dot": attribution.pairwise_scores(g_test, g_train, progress=False),
           "ekfac": attribution.pairwise_scores(np.asarray(attribution.flatten_rows(pq)), g_train, progress=False)}
    return out, g_train, factors


def _rho(a, b) -> float:
    return float(np.mean([scipy.stats.spearmanr(x, y).statistic for x, y in zip(a, b)]))


@pytest.mark.slow  # over a minute of CPU: the default job stays near 10 minutes
def test_bfloat16_scores_rank_like_float32(task):
    ref, _, _ = _scores(jnp.float32, task)
    got, grads, factors = _scores(jnp.bfloat16, task)
    assert grads.dtype == np.float32 and got["ekfac"].dtype == np.float32  # float32 gradients and score sums
    assert factors.param_dtype == "float32" and factors.a_cov[0].dtype == np.float64
    for method in ref:
        assert np.all(np.isfinite(got[method]))
        assert not np.allclose(got[method], ref[method], rtol=1e-6, atol=0)  # it really ran in bfloat16
        assert _rho(got[method], ref[method]) > THRESHOLD, method
