"""Layer capture: einsum('bti,bto->bio', a, g) is each example's exact kernel gradient (float64).

Float64 models stay float64 end to end on jaxinf's decoder, so the checks below are exact to rounding (1e-10).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.curvature import capture as cap
from jaxinf.models import LMFunctions, LoraConfig, decoder, init_adapters, load_model


@pytest.fixture(autouse=True)
def true_float64():
    """float64 throughout (the decoder has no hidden float32 casts)."""
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
    else:  # every projection of the two blocks (q, k, v, o, [gate,] up, down) + an untied head (GPT-2's is tied)
        expected = 12 if name == "tiny-gpt2" else 15
        assert len(layers) == expected and {l.kind for l in layers} == {cap.DENSE}
        assert (layers[-1].name == "lm_head") == (name != "tiny-gpt2")
        assert all((l.bias is not None) == (name == "tiny-gpt2") for l in layers)
    for layer in layers:
        a, g = captured[layer.name]
        assert a.shape == (3, 10, layer.rows) and g.shape == (3, 10, layer.d_out)
        grads = jnp.einsum("bti,bto->bio", a, g)
        ref = layer.matrix_batched(per_example)  # kernel + bias row
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
    # dJ/dy of the adapted projection's output y = x W + s (x A) B, from the decoder's own taps
    from jaxinf.models.loss import masked_mean_nll

    stacked = decoder.stack_adapters(model.config, adapters)
    full, _ = decoder.capture_projections(
        model.config, model.params, batch["input_ids"], batch["attention_mask"],
        lambda h: masked_mean_nll(decoder.project(model.config, model.params, h), batch), ("q_proj", "v_proj"),
        adapters=stacked, lora_scale=lora.scale)
    np.testing.assert_allclose(captured[name + "/B"][1], lora.scale * full["v_proj"][1][1], rtol=1e-12, atol=1e-14)


def test_head_capture_needs_an_untied_head_and_a_decoder_model():
    """A tied head is the embedding, not a layer of its own: tracking it is refused; a model that is not on the
    decoder gets a one-line error instead of a silent capture gap."""
    model = load_model("tiny-gpt2", dtype=jnp.float64)
    batch = _batch()
    with pytest.raises(ValueError, match="tied to the embedding"):
        decoder.capture_projections(model.config, model.params, batch["input_ids"], batch["attention_mask"],
                                    lambda h, tap: h.sum((1, 2)), ("q_proj", decoder.HEAD))

    class NotOurs:
        name = "not-ours"

    with pytest.raises(ValueError, match="not on jaxinf's decoder"):
        cap.lm_layers(LMFunctions(NotOurs()), {})


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_layer_matrix_round_trip(name):
    """Layer.matrix / layers_to_tree are inverse on every slice of a stacked kernel (+ bias) and on the head;
    slices of layers not given come back as zeros."""
    model = load_model(name, dtype=jnp.float64)
    layers = cap.lm_layers(LMFunctions(model), model.params)
    chosen = [l for l in layers if l.module in ("q_proj", "lm_head")]
    sub = cap.restrict(model.params, chosen)
    back = cap.layers_to_tree(chosen, [l.matrix(sub) for l in chosen], like=sub)
    jax.tree.map(np.testing.assert_array_equal, back, sub)
    first = cap.layers_to_tree(chosen[:1], [chosen[0].matrix(sub)])
    np.testing.assert_array_equal(first["layers"]["q"]["kernel"][1], 0.0)
    np.testing.assert_array_equal(first["layers"]["q"]["kernel"][0], sub["layers"]["q"]["kernel"][0])
