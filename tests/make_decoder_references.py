"""Write the reference outputs that tests/test_decoder.py checks jaxinf's own decoder against.

Run with the benchmark environment, which has torch (the test environment has none):

    .venv-bench/bin/python tests/make_decoder_references.py

For each family it builds a tiny random Hugging Face PyTorch causal LM (transformers 4.57.6, eager attention),
redraws every parameter so that norms, biases and soft-caps all matter, saves it with `save_pretrained` (so the
parameter names are the ones HF writes to safetensors, tied heads left out) and stores, in
tests/data/decoders/<family>.npz:

* ``param/<hf name>``: the weights (float32), read back from the saved safetensors file;
* ``input_ids``, ``attention_mask`` [3, T]: one full row, one right-padded row, one left-padded row;
* ``logits``: HF's float32 logits [3, T, V]. (No float64 reference: HF computes RMSNorm, the RoPE tables and
  the attention softmax in float32 even in a float64 model, and its float64 masks turn left-padded rows into
  NaN, so a float64 HF run is no tighter reference than the float32 one.)

and the config.json that `save_pretrained` wrote in tests/data/decoders/<family>.json.

Positions are passed explicitly as ``cumsum(attention_mask) - 1`` (clipped at 0), the convention of
jaxinf.models.decoder.forward: HF's default (arange) would shift left-padded rows.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "decoders")
VOCAB = 128
SEQ = 16


def _configs() -> dict:
    t = transformers
    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    return {
        "llama": t.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **common),
        # llama3 rope rule, tied embeddings, head_dim 16 so that the 8 frequencies span all three llama3 regimes
        # (wavelengths below 16, between 16 and 64, above 64 positions).
        "llama3": t.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}, **common),
        "mistral": t.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=10000.0, sliding_window=5, tie_word_embeddings=False, **common),
        "qwen2": t.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=1000.0, tie_word_embeddings=False, **common),
        # head_dim * heads (64) != hidden_size (32), as in real Qwen3 models
        "qwen3": t.Qwen3Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=True, **common),
        # soft-caps small enough to bite; query_pre_attn_scalar != head_dim
        "gemma2": t.Gemma2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0, max_position_embeddings=128, **common),
        # 6 layers: 5 sliding (local RoPE base 100, no scaling) and 1 global (base 10000, linear scaling 4)
        "gemma3_text": t.Gemma3TextConfig(
            hidden_size=32, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, query_pre_attn_scalar=12, sliding_window=5, rope_theta=10000.0, rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0}, max_position_embeddings=128, **common),
        "gpt2": t.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common),
    }


def _randomise(model: torch.nn.Module, family: str, gen: torch.Generator) -> None:
    """Redraw every parameter: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm weights around their identity."""
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "norm" in name or ".ln_" in name:
                if name.endswith("bias"):
                    value = 0.1 * noise
                else:  # Gemma stores w with scale (1 + w); the others store the scale itself
                    value = 0.3 * noise + (0.0 if gemma else 1.0)
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "embed" in name or "wte" in name or "wpe" in name:
                value = (0.3 if gemma else 1.0) * noise
            else:
                fan_in = p.shape[0] if family == "gpt2" else p.shape[1]  # GPT-2's Conv1D stores (in, out)
                value = noise * (1.5 / fan_in**0.5)
            p.copy_(value.to(p.dtype))


def _batch(gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=gen).numpy()
    mask = np.ones((3, SEQ), np.int64)
    mask[1, -5:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def make(family: str, config, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    _randomise(model, family, gen)
    if config.tie_word_embeddings:
        model.tie_weights()
    ids, mask = _batch(gen)
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(_positions(mask)))
    with torch.no_grad():
        logits = model(**inputs).logits.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state = load_file(os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json")) as f:
            hf_config = json.load(f)
    arrays = {f"param/{k}": v.astype(np.float32) for k, v in state.items()}
    np.savez_compressed(os.path.join(OUT, f"{family}.npz"), input_ids=ids.astype(np.int32),
                        attention_mask=mask.astype(np.int32), logits=logits.astype(np.float32), **arrays)
    with open(os.path.join(OUT, f"{family}.json"), "w") as f:
        json.dump(hf_config, f, indent=1, sort_keys=True)
    real = mask.astype(bool)
    print(f"{family:12s} params={sum(v.size for v in state.values()):6d} "
          f"logit std={logits[real].std():.3f} "
          f"size={os.path.getsize(os.path.join(OUT, family + '.npz')) // 1024} KB")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(1)
    for seed, (family, config) in enumerate(_configs().items()):
        make(family, config, seed)


if __name__ == "__main__":
    main()
