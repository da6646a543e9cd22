"""Layer capture: einsum('bti,bto->bio', a, g) is each example's exact kernel gradient (float64).

Float64 models stay float64 end to end (jaxinf.models.causal_lm corrects HF's float32 RMSNorm and softmax), so
the checks below are exact to rounding (1e-10).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.curvature import capture as cap
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model


@pytest.fixture(autouse=True)
def true_float64():
    """float64 throughout (jaxinf keeps HF Llama/Mistral's float32 RMSNorm and softmax in float64, see causal_lm)."""
    with jax.enable_x64(True):
        yield


def _batch(b=3, t=10, seed=0):
    """Right padding on the last row, first three tokens of every row are prompt (not targets)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[-1, -3:] = 0
    ids[-1, -3:] = 0
    loss_mask = mask.astype(np.float64)
    loss_mask[:, :3] = 0.0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def _rel_err(x, ref):
    return float(np.abs(np.asarray(x) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-mistral"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_capture_gives_exact_per_example_gradients(name, use_lora):
    model = load_model(name, dtype=jnp.float64)
    lora = LoraConfig(rank=2, alpha=8.0) if use_lora else None
    fns = LMFunctions(model, lora)
    trainable = init_adapters(jax.random.key(1), model, lora, b_std=0.3) if use_lora else model.params
    batch = _batch()
    layers = cap.lm_layers(fns, trainable)
    captured = jax.jit(lambda p, b: cap.capture(fns, p, b))(trainable, batch)
    per_example = jax.jit(fns.per_example_grads)(trainable, batch)

    if use_lora:
        assert len(layers) == 2 * len(trainable) and {l.kind for l in layers} == {cap.LORA_A, cap.LORA_B}
    else:  # every linear layer of the two blocks (+ Llama's untied head); GPT-2's are transposed FlaxConv1D
        expected = 8 if name == "tiny-gpt2" else 15
        assert len(layers) == expected
        assert all((l.kind == cap.CONV1D) == (name == "tiny-gpt2") for l in layers)
        assert all((l.bias is not None) == (name == "tiny-gpt2") for l in layers)
    for layer in layers:
        a, g = captured[layer.name]
        assert a.shape == (3, 10, layer.rows) and g.shape == (3, 10, layer.d_out)
        grads = jnp.einsum("bti,bto->bio", a, g)
        ref = layer.matrix_batched(per_example)  # kernel (transposed back for FlaxConv1D) + bias row
        assert _rel_err(grads, ref) < 1e-10, layer.name
        # causal model, right padding: padded positions carry no cotangent
        np.testing.assert_array_equal(np.asarray(g[-1, -3:]), 0.0)


def test_capture_layer_subset_and_lora_cotangent_scale():
    """Selecting layers by name; for B, g = scale * dJ/dy: compare with the base layer's own output cotangent."""
    model = load_model("tiny-llama", dtype=jnp.float64)
    lora = LoraConfig(rank=2, alpha=8.0)
    adapters = init_adapters(jax.random.key(1), model, lora, b_std=0.3)
    batch = _batch()
    name = "model/layers/1/self_attn/v_proj"
    captured = cap.capture(LMFunctions(model, lora), adapters, batch, layers=[name + "/B"])
    assert list(captured) == [name + "/B"]
    # dJ/dy of the adapted module, captured on the base model with the LoRA interceptor composed in
    from jaxinf.models import lora_interceptor
    from jaxinf.models.loss import masked_mean_nll

    base_layer = [l for l in cap.lm_layers(LMFunctions(model), model.params) if l.name == name]
    run = lambda icpt: masked_mean_nll(model.apply(model.params, batch["input_ids"], batch["attention_mask"],
                                                   interceptors=(lora_interceptor(adapters, lora),) + tuple(icpt)),
                                       batch)
    base, _ = cap.capture_linen(run, base_layer)
    # interceptor order: LoRA outermost, so the capture perturbation sits on the base output W x only; its
    # cotangent is dJ/dy all the same (y = W x + s x A B)
    np.testing.assert_allclose(captured[name + "/B"][1], lora.scale * base[name][1], rtol=1e-12, atol=1e-14)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, name="hidden", param_dtype=jnp.float64)(x))
        return nn.Dense(3, use_bias=False, name="out", param_dtype=jnp.float64)(h)


def test_capture_any_linen_model():
    """A plain linen MLP with rank-2 inputs (one token per example): discover, capture, exact gradients."""
    module = _MLP()
    x = jax.random.normal(jax.random.key(0), (6, 4), jnp.float64)
    y = jnp.arange(6) % 3
    params = module.init(jax.random.key(1), x)["params"]

    def losses(p):
        logits = module.apply({"params": p}, x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    run = lambda p: cap.run_under(lambda: losses(p))
    layers = cap.discover_layers(run(params), params)
    assert [(l.name, l.rows, l.d_out) for l in layers] == [("hidden", 5, 5), ("out", 5, 3)]
    captured, loss_values = cap.capture_linen(run(params), layers)
    np.testing.assert_allclose(loss_values, losses(params), rtol=1e-14)
    per_example = jax.vmap(jax.grad(lambda p, i: losses(p)[i]), in_axes=(None, 0))(params, jnp.arange(6))
    for layer in layers:
        a, g = captured[layer.name]
        assert a.shape[:2] == (6, 1)
        assert _rel_err(jnp.einsum("bti,bto->bio", a, g), layer.matrix_batched(per_example)) < 1e-12


def test_layer_matrix_round_trip():
    model = load_model("tiny-gpt2", dtype=jnp.float64)
    layers = cap.lm_layers(LMFunctions(model), model.params)
    sub = cap.restrict(model.params, layers[:2])
    back = cap.layers_to_tree(layers[:2], [l.matrix(sub) for l in layers[:2]], like=sub)
    jax.tree.map(np.testing.assert_array_equal, back, sub)
