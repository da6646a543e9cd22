"""jaxinf.models.hf_weights' writer (`state_from_params`, `save_decoder`): the exact inverse of the loader.

* On the reference checkpoints of tests/data/decoders/ (state dicts HF's `save_pretrained` wrote), loading and
  writing back gives HF's very names, layouts and values.
* For every family, random params -> save_decoder -> load_decoder gives the same config, bit-identical params
  and identical logits.
* Where torch and transformers' PyTorch classes are importable (slow), HF's model loads the folder and gives the
  decoder's logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models import decoder as dec
from jaxinf.models import hf_weights

DATA = os.path.join(os.path.dirname(__file__), "data", "decoders")
REFERENCES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2")

_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    # o and MLP biases, untied head
    "llama": dict(_LLAMA, model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "llama-tied": dict(_LLAMA, model_type="llama", tie_word_embeddings=True),
    "mistral": dict(_LLAMA, model_type="mistral", sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(_LLAMA, model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(_LLAMA, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "gemma2": dict(_LLAMA, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    "gemma3_text": dict(_LLAMA, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "gpt2": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64),
    "gpt2-untied": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        tie_word_embeddings=False),
}


def _random_params(config, seed=0):
    """Every leaf random (biases and norm scales too), so a misplaced tensor changes the values."""
    params = dec.init_params(config, jax.random.key(seed), jnp.float32)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _logits(config, params):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 9:].set(0)
    return np.asarray(jax.jit(lambda p: dec.forward(config, p, ids, mask))(params)), np.asarray(ids)


@pytest.mark.parametrize("family", REFERENCES)
def test_writer_gives_hf_state_dict(family):
    with np.load(os.path.join(DATA, f"{family}.npz")) as z:
        state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    with open(os.path.join(DATA, f"{family}.json")) as f:
        config = dec.from_hf_config(json.load(f))
    written = hf_weights.state_from_params(config, hf_weights.params_from_hf_state(config, state))
    assert sorted(written) == sorted(state)
    for name, value in state.items():
        assert written[name].dtype == np.float32 and written[name].flags.c_contiguous, name
        np.testing.assert_array_equal(written[name], value, err_msg=name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_round_trip(name, tmp_path):
    hf_config = CONFIGS[name]
    config = dec.from_hf_config(hf_config)
    params = _random_params(config)
    hf_weights.save_decoder(str(tmp_path), hf_config, params)
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == hf_config
    loaded_config, loaded = hf_weights.load_decoder(str(tmp_path))
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(loaded)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(_logits(config, loaded)[0], _logits(config, params)[0])


def test_save_refuses_mismatched_params_and_the_multimodal_gemma3(tmp_path):
    config = dec.from_hf_config(CONFIGS["llama"])
    params = _random_params(config)
    with pytest.raises(ValueError, match="differ from the config"):
        hf_weights.save_decoder(str(tmp_path), CONFIGS["llama-tied"], params)  # lm_head the config does not have
    with pytest.raises(ValueError, match="gemma3_text"):
        hf_weights.save_decoder(str(tmp_path), {"model_type": "gemma3", "text_config": CONFIGS["gemma3_text"]},
                                params)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_pytorch_loads_the_folder(name, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    if not transformers.utils.is_torch_available():
        pytest.skip("transformers' PyTorch classes are off (jaxinf sets USE_TORCH=0: set USE_TORCH=1 first)")
    hf_config = CONFIGS[name]
    config = dec.from_hf_config(hf_config)
    params = _random_params(config)
    hf_weights.save_decoder(str(tmp_path), hf_config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                              torch_dtype=torch.float32).eval()
    expected, ids = _logits(config, params)
    mask = (np.arange(ids.shape[1])[None] < np.array([[12], [9]])).astype(np.int64)  # right padding as _logits
    with torch.no_grad():
        got = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    real = mask.astype(bool)
    np.testing.assert_allclose(got.numpy()[real], expected[real], rtol=1e-5, atol=1e-5)
