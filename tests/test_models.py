"""Models: tiny families, RoPE, LoRA = merged weights, padding invariance, loss definition, local folders."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from _checks import assert_teacher_forced_greedy
from jaxinf.models import LMFunctions, LoraConfig, init_adapters, load_model, merge_adapters, token_nll
from jaxinf.models import decoder

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-gpt2"]


def _batch(seed=0, b=3, t=12, pad=(0, 3, 5)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i, p in enumerate(pad[:b]):
        if p:
            mask[i, -p:] = 0
            ids[i, -p:] = 0
    loss_mask = mask.astype(np.float64).copy()
    loss_mask[:, :4] = 0.0  # first four tokens are "prompt"
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def test_rotary_matches_direct_complex_rotation():
    """The decoder's RoPE as pairs (x_i, x_{i+d/2}) multiplied by exp(i p theta^(-2i/d)), computed in numpy
    complex; its inverse frequencies are theta^(-2i/d) for the plain rule."""
    with enable_x64(True):
        d, theta = 8, 100000.0
        config = decoder.from_hf_config(dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2, rope_theta=theta))
        freq = theta ** (-np.arange(0, d, 2) / d)
        np.testing.assert_allclose(decoder.rope_inv_freq(config, theta, None), freq, rtol=1e-14)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1, 5, 2, d))
        pos = np.array([[0, 1, 2, 7, 30]])
        angles = pos[..., None, None] * freq  # [1, 5, 1, d/2]
        ours = np.asarray(decoder._apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles)))
        z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * angles)
        direct = np.concatenate([z.real, z.imag], axis=-1)
        np.testing.assert_allclose(ours, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_rope_theta_is_honoured(name):
    """The config's rope_theta reaches the logits: another base changes them well beyond float32 noise (the
    logits at the default base equal Hugging Face's, tests/test_decoder.py)."""
    import dataclasses

    model = load_model(name)
    batch = _batch()
    ours = np.asarray(model.apply(model.params, batch["input_ids"], batch["attention_mask"]))
    other_config = dataclasses.replace(model.config, rope_theta=100000.0)
    other = np.asarray(dataclasses.replace(model, config=other_config).apply(
        model.params, batch["input_ids"], batch["attention_mask"]))
    real = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_array_equal(ours[:, 0][real[:, 0]], other[:, 0][real[:, 0]])  # position 0: no rotation
    assert np.abs(other - ours)[real].max() > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_equals_merged_weights(name):
    """Adapter output == base model with W + (alpha/r) B A merged in (float64, dropout off)."""
    with enable_x64(True):
        model = load_model(name, dtype=jnp.float64)
        lora = LoraConfig(rank=2, alpha=8.0)
        adapters = init_adapters(jax.random.key(1), model, lora, b_std=0.3)
        batch = _batch()
        adapted = LMFunctions(model, lora).logits(adapters, batch)
        merged = LMFunctions(model).logits(merge_adapters(model, adapters, lora), batch)
        base = LMFunctions(model).logits(model.params, batch)
        chex.assert_trees_all_close(adapted, merged, rtol=1e-10, atol=1e-10)
        assert np.abs(np.asarray(adapted - base)).max() > 1e-3  # the adapters really act


def test_lora_dropout_is_keyed_and_off_without_key():
    model = load_model("tiny-llama")
    lora = LoraConfig(rank=2, alpha=8.0, dropout=0.5)
    adapters = init_adapters(jax.random.key(1), model, lora, b_std=0.3)
    fns, batch = LMFunctions(model, lora), _batch()
    a = fns.loss(adapters, batch, jax.random.key(3))
    b = fns.loss(adapters, batch, jax.random.key(3))
    c = fns.loss(adapters, batch, jax.random.key(4))
    d = fns.loss(adapters, batch)
    assert a == b and a != c and a != d


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_never_changes_per_example_loss(name):
    with enable_x64(True):
        model = load_model(name, dtype=jnp.float64)
        fns = LMFunctions(model)
        batch = _batch(pad=(0, 0, 0))
        padded = {k: jnp.pad(v, ((0, 0), (0, 6))) for k, v in batch.items()}
        chex.assert_trees_all_close(fns.per_example_loss(model.params, batch),
                                    fns.per_example_loss(model.params, padded), rtol=1e-13)


def test_loss_is_mean_of_masked_token_nll():
    """Per-example loss = mean NLL over loss_mask targets, computed here with an explicit loop."""
    with enable_x64(True):
        model = load_model("tiny-llama", dtype=jnp.float64)
        fns = LMFunctions(model)
        batch = _batch()
        logits = np.asarray(fns.logits(model.params, batch))
        ids, lm = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
        expected = []
        for b in range(ids.shape[0]):
            terms = []
            for t in range(1, ids.shape[1]):
                if lm[b, t]:
                    z = logits[b, t - 1]
                    terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[b, t]])
            expected.append(np.mean(terms))
        np.testing.assert_allclose(np.asarray(fns.per_example_loss(model.params, batch)), expected, rtol=1e-10)
        np.testing.assert_allclose(float(fns.loss(model.params, batch)), np.mean(expected), rtol=1e-10)
        assert token_nll(jnp.asarray(logits), batch["input_ids"]).shape == ids.shape
        # its gradient in the logits: softmax(z_{t-1}) - onehot(x_t) at each position t-1 that predicts a token
        grad = np.asarray(jax.grad(lambda z: token_nll(z, batch["input_ids"]).sum())(jnp.asarray(logits)))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        expected_grad = p / p.sum(-1, keepdims=True)
        expected_grad[:, -1] = 0.0
        for b in range(ids.shape[0]):
            for t in range(1, ids.shape[1]):
                expected_grad[b, t - 1, ids[b, t]] -= 1.0
        np.testing.assert_allclose(grad, expected_grad, atol=1e-12)


def test_per_example_grads_match_individual_grads():
    with enable_x64(True):
        model = load_model("tiny-llama", dtype=jnp.float64)
        lora = LoraConfig(rank=2, alpha=8.0)
        adapters = init_adapters(jax.random.key(0), model, lora, b_std=0.1)
        fns, batch = LMFunctions(model, lora), _batch()
        stacked = fns.per_example_grads(adapters, batch)
        for b in range(3):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            chex.assert_trees_all_close(jax.tree.map(lambda g: g[b], stacked), jax.grad(fns.loss)(adapters, one),
                                        rtol=1e-9, atol=1e-12)


def test_unknown_model_error_names_local_alternatives():
    with pytest.raises(ValueError, match="local directory"):
        load_model("meta-llama/Llama-2-7b-chat-hf")


def test_sequence_longer_than_model_is_rejected():
    model = load_model("tiny-gpt2")
    ids = jnp.zeros((1, model.max_length + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_length"):
        model.apply(model.params, ids, jnp.ones_like(ids))


PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in Mainz, Germany. His invention made it possible to "
    "produce books quickly and cheaply, and within a few decades printing shops had spread to "
    "cities across Europe, transforming how knowledge was shared."
)


def _nll(model, ids):
    ids = jnp.asarray(ids, jnp.int32)[None]
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones(ids.shape)}
    return float(LMFunctions(model).loss(model.params, batch))


def test_smollm2_loads_with_tied_head_and_its_rope_base():
    """Real weights on jaxinf's decoder: English NLL far below a random model's (ln V = 10.8), and the correct
    RoPE base (100000) beats HF Flax's hard-coded 10000 (measured 2.49 vs 2.65). A wrong tie or base fails here."""
    import dataclasses

    model = load_model("smollm2-135m-instruct")
    assert model.config.tied_embeddings and "lm_head" not in model.params  # the head is the embedding
    ids = model.tokenizer(PARAGRAPH)["input_ids"]
    nll = _nll(model, ids)
    assert model.config.rope_theta == 100000.0
    wrong = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_theta=10000.0))
    nll_wrong_base = _nll(wrong, ids)
    assert nll < 2.6 and nll < nll_wrong_base - 0.08, (nll, nll_wrong_base)
    # The default system prompt makes the question long enough that the RoPE base decides the answer.
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               tokenize=False, add_generation_prompt=True)
    prompt = model.tokenizer(text)["input_ids"]
    answer = model.tokenizer("The capital of France is Paris.<|im_end|>")["input_ids"]
    ids = jnp.asarray(prompt + answer, jnp.int32)[None]
    logits = model.apply(model.params, ids, jnp.ones_like(ids))[0]
    assert_teacher_forced_greedy(logits[len(prompt) - 1:-1], answer)


def _hf_config(name, model):
    from jaxinf.models import registry

    return {**registry._TINY_DECODERS[name], "vocab_size": model.config.vocab_size}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_local_hf_directory_round_trip(tmp_path, name):
    """A model saved as a Hugging Face folder (config.json, tokenizer, model.safetensors in HF's names and
    layouts, read without torch) loads by path and gives the same logits."""
    from jaxinf.models import hf_weights

    model = load_model(name)
    hf_weights.save_decoder(str(tmp_path), _hf_config(name, model), model.params)
    model.tokenizer.save_pretrained(tmp_path)
    local = load_model(str(tmp_path))
    batch = _batch()
    np.testing.assert_array_equal(np.asarray(model.apply(model.params, batch["input_ids"], batch["attention_mask"])),
                                  np.asarray(local.apply(local.params, batch["input_ids"], batch["attention_mask"])))
    assert local.tokenizer("hi there")["input_ids"] == model.tokenizer("hi there")["input_ids"]
    assert local.family == model.family and local.name == tmp_path.name


def test_transformers_without_torch_by_default(tmp_path):
    """jaxinf keeps transformers from importing torch (about 0.5 GB of resident memory), and a local folder with
    PyTorch .bin weights only gets a one-line error that names the fix (in a fresh process: the switch is read
    when transformers is first imported)."""
    import json
    import os
    import subprocess
    import sys

    model = load_model("tiny-llama")
    (tmp_path / "config.json").write_text(json.dumps(_hf_config("tiny-llama", model)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    code = ("import sys, jaxinf, transformers; from jaxinf.models import load_model\n"
            "print(transformers.utils.is_torch_available(), 'torch' in sys.modules)\n"
            f"load_model({str(tmp_path)!r})")
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.split() == ["False", "False"], proc.stdout + proc.stderr[-2000:]
    assert "no model.safetensors (found ['pytorch_model.bin'])" in proc.stderr, proc.stderr[-2000:]
    assert "safe_serialization=True" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("name,use_lora", [("tiny-llama", True), ("tiny-gemma2", False)])
def test_chunked_loss_equals_the_full_logit_loss(name, use_lora):
    """With `loss_chunk` the per-example loss runs over vocabulary chunks (never [B, T, V] logits): the losses and
    their gradients equal the full-logit ones in float64 (untied head with LoRA; Gemma 2's tied head and final
    soft-cap; 261 tokens in chunks of 100, so the last chunk is padded). Small vocabularies keep full logits."""
    import dataclasses

    with enable_x64(True):
        model = load_model(name, dtype=jnp.float64)
        assert model.loss_chunk is None  # 261 tokens
        lora = LoraConfig(rank=2, alpha=8.0) if use_lora else None
        trainable = init_adapters(jax.random.key(1), model, lora, b_std=0.3) if use_lora else model.params
        full = LMFunctions(model, lora)
        chunked = LMFunctions(dataclasses.replace(model, loss_chunk=100), lora)
        batch = _batch()
        np.testing.assert_allclose(chunked.per_example_loss(trainable, batch), full.per_example_loss(trainable, batch),
                                   rtol=1e-12)
        chex.assert_trees_all_close(jax.grad(chunked.loss)(trainable, batch), jax.grad(full.loss)(trainable, batch),
                                    rtol=1e-10, atol=1e-14)
