"""jaxinf's own decoder-only transformer: one pure function of a params pytree for every supported family.

Families (`from_hf_config` reads their Hugging Face config.json): llama (with the `llama3` or `linear` RoPE
rules), mistral (sliding window), qwen2 (q/k/v biases), qwen3 (per-head q/k RMSNorm), gemma2 (soft-caps,
post-norms, alternating local/global layers), gemma3_text (q/k norm, 5 local : 1 global layers, local RoPE base)
and gpt2 (LayerNorm, learned positions, biases).

Params::

    {"embed": [V, H],
     "pos_embed": [P, H],                      # learned positions (GPT-2) only
     "layers": {                               # every leaf has a leading layer axis L
        "attn_norm": {"scale": [L, H], "bias": [L, H] (LayerNorm only)},
        "q": {"kernel": [L, H, N*D], "bias": [L, N*D]}, "k"/"v": {"kernel": [L, H, K*D], ...},
        "o": {"kernel": [L, N*D, H], "bias": [L, H]},
        "q_norm"/"k_norm": {"scale": [L, D]},                     # qk_norm
        "post_attn_norm"/"post_mlp_norm": {"scale": [L, H]},     # post_norms
        "mlp_norm": {...},
        "gate": {"kernel": [L, H, I]} (gated MLPs only),
        "up": {"kernel": [L, H, I], "bias"}, "down": {"kernel": [L, I, H], "bias"}},
     "final_norm": {"scale": [H], "bias": [H] (LayerNorm only)},
     "lm_head": {"kernel": [H, V]}}            # absent when the embeddings are tied

Kernels are (in, out). Norm scales are stored as HF stores them: Gemma's RMSNorm multiplies by
`norm_offset + scale` (offset 1), the others by `scale` (offset 0).

`forward` runs the layers with `jax.lax.scan`; which layers are local (sliding window) and each layer's RoPE
inverse frequencies are scanned inputs, so local and global layers share one scan body. Attention is plain XLA
(einsum and a masked softmax), with no custom derivative rules: jvp, vjp, vmap and forward-over-reverse all work.

Positions count real tokens only (``cumsum(attention_mask) - 1``), so left- and right-padded rows give the same
logits on their real tokens. Causal and sliding-window masks are on sequence indices.

dtype: the computation follows the params' dtype. float64 params stay float64 end to end; for lower precisions
(bfloat16, float16) norms, attention scores and softmax, RoPE angles and the logits are computed in float32 (so
the logits of a bfloat16 model are float32, ready for the loss).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "gpt2")
_NORMS = ("rms", "layer")
_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
_POSITIONS = ("rope", "learned")
_REMAT = ("none", "layer", "dots")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static description of a decoder (hashable, so it can be a static argument of `jax.jit`).

    rope_scaling: None, ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` or ``{"rope_type": "linear", "factor"}``; a dict given here is stored
    as a sorted tuple of items (`rope_scaling_dict` gives it back). It applies to every layer, except that when
    `rope_local_theta` is set (Gemma 3) local layers use that base without scaling.
    query_scale: attention scores are multiplied by ``query_scale ** -0.5`` (Gemma's query_pre_attn_scalar);
    None means head_dim.
    local_layers: per layer, whether it attends within `sliding_window` only (q - k < sliding_window); None
    means every layer when `sliding_window` is set (Mistral), none otherwise.
    dtype: the dtype `init_params` uses when given none; `forward` follows the params' dtype.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    activation: str = "silu"
    gated_mlp: bool = True
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None
    rope_scaling: Any = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] | None = None
    tied_embeddings: bool = False
    max_positions: int = 2048
    dtype: str = "float32"

    def __post_init__(self):
        for field, value, allowed in (("norm", self.norm, _NORMS), ("activation", self.activation, _ACTIVATIONS),
                                      ("positions", self.positions, _POSITIONS)):
            if value not in allowed:
                raise ValueError(f"DecoderConfig.{field}={value!r} is not one of {allowed}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even for RoPE")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        scaling = self.rope_scaling_dict
        if scaling is not None:
            kind = scaling.get("rope_type")
            need = {"llama3": _LLAMA3_KEYS, "linear": ("factor",)}.get(kind)
            if need is None:
                raise ValueError(f"DecoderConfig.rope_scaling type {kind!r} is not supported (llama3, linear)")
            missing = [k for k in need if k not in scaling]
            if missing:
                raise ValueError(f"DecoderConfig.rope_scaling ({kind}) lacks {missing}")
        if self.local_layers is not None:
            object.__setattr__(self, "local_layers", tuple(bool(x) for x in self.local_layers))
            if len(self.local_layers) != self.num_layers:
                raise ValueError(f"DecoderConfig.local_layers has {len(self.local_layers)} entries for "
                                 f"{self.num_layers} layers")
            if any(self.local_layers) and not self.sliding_window:
                raise ValueError("DecoderConfig.local_layers marks local layers but sliding_window is not set")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def is_local(self) -> tuple[bool, ...]:
        """Per layer: attends within the sliding window only."""
        if self.local_layers is not None:
            return self.local_layers
        return (self.sliding_window is not None,) * self.num_layers


# --------------------------------------------------------------------------------------------------------------
# Hugging Face configs


def _required(cfg: Mapping, key: str, model_type: str):
    if cfg.get(key) is None:
        raise ValueError(f"{model_type} config lacks {key!r}")
    return cfg[key]


def _activation(cfg: Mapping, key: str, default: str, model_type: str) -> str:
    name = cfg.get(key) or default
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "gelu": "gelu"}
    if name not in table:
        raise ValueError(f"{model_type} config {key}={name!r} is not supported ({sorted(table)})")
    return table[name]


def _rope_scaling(cfg: Mapping, model_type: str) -> dict | None:
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        missing = [k for k in _LLAMA3_KEYS if k not in scaling]
        if missing:
            raise ValueError(f"{model_type} config rope_scaling (llama3) lacks {missing}")
        return {"rope_type": "llama3", **{k: float(scaling[k]) for k in _LLAMA3_KEYS}}
    raise ValueError(f"{model_type} config rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def _layer_types(cfg: Mapping, model_type: str, num_layers: int) -> tuple[bool, ...] | None:
    """Which layers are local (sliding window), by HF's rules for each family."""
    if model_type == "llama":
        return None
    if model_type == "mistral":  # MistralModel ignores layer_types: every layer slides when sliding_window is set
        return (True,) * num_layers if cfg.get("sliding_window") is not None else None
    types = cfg.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown or len(types) != num_layers:
            raise ValueError(f"{model_type} config layer_types={types!r} is not supported "
                             f"(sliding_attention / full_attention, one per layer)")
        return tuple(t == "sliding_attention" for t in types)
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            return None
        first = cfg.get("max_window_layers", 28)
        return tuple(i >= first for i in range(num_layers))
    if model_type == "gemma2":
        return tuple(i % 2 == 0 for i in range(num_layers))
    pattern = cfg.get("sliding_window_pattern", 6)  # gemma3_text
    return tuple(bool((i + 1) % pattern) for i in range(num_layers))


def from_hf_config(cfg: Mapping) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face config dict (config.json), with HF's defaults for absent keys."""
    cfg = dict(cfg)
    model_type = cfg.get("model_type")
    if model_type == "gemma3":
        if not isinstance(cfg.get("text_config"), Mapping):
            raise ValueError("gemma3 config lacks 'text_config'")
        cfg = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **cfg["text_config"],
               "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type == "gpt2":
        return _gpt2_config(cfg)

    mt = model_type
    hidden = int(_required(cfg, "hidden_size", mt))
    heads = int(_required(cfg, "num_attention_heads", mt))
    layers = int(_required(cfg, "num_hidden_layers", mt))
    gemma = mt in ("gemma2", "gemma3_text")
    if mt == "qwen3":
        head_dim = cfg.get("head_dim", 128)
    elif gemma:
        head_dim = cfg.get("head_dim", 256)
    else:
        head_dim = cfg.get("head_dim") or hidden // heads
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{mt} config partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"{mt} config use_bidirectional_attention=True is not supported")
    attention_bias = bool(cfg.get("attention_bias", False))
    local = _layer_types(cfg, mt, layers)
    window = cfg.get("sliding_window") if local is not None and any(local) else None
    if local is not None and any(local) and window is None:
        raise ValueError(f"{mt} config has sliding layers but sliding_window is None")
    default_pos = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "gemma2": 8192,
                   "gemma3_text": 131072}[mt]
    return DecoderConfig(
        vocab_size=int(_required(cfg, "vocab_size", mt)),
        hidden_size=hidden,
        intermediate_size=int(_required(cfg, "intermediate_size", mt)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if gemma else 0.0,
        activation=_activation(cfg, "hidden_activation" if gemma else "hidden_act",
                               "gelu_pytorch_tanh" if gemma else "silu", mt),
        gated_mlp=True,
        positions="rope",
        rope_theta=float(cfg.get("rope_theta", 1_000_000.0 if mt == "gemma3_text" else 10000.0)),
        rope_local_theta=float(cfg.get("rope_local_base_freq", 10000.0)) if mt == "gemma3_text" else None,
        rope_scaling=_rope_scaling(cfg, mt),
        qkv_bias=True if mt == "qwen2" else (attention_bias and mt != "mistral"),
        o_bias=attention_bias and mt not in ("qwen2", "mistral"),
        mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
        qk_norm=mt in ("qwen3", "gemma3_text"),
        post_norms=gemma,
        embed_scale=math.sqrt(hidden) if gemma else None,
        attn_softcap=cfg.get("attn_logit_softcapping", 50.0) if mt == "gemma2" else (
            cfg.get("attn_logit_softcapping") if gemma else None),
        final_softcap=cfg.get("final_logit_softcapping", 30.0) if mt == "gemma2" else (
            cfg.get("final_logit_softcapping") if gemma else None),
        query_scale=float(cfg.get("query_pre_attn_scalar", 256)) if gemma else None,
        sliding_window=int(window) if window is not None else None,
        local_layers=local,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        max_positions=int(cfg.get("max_position_embeddings") or default_pos),
        dtype=_dtype_name(cfg.get("torch_dtype") or cfg.get("dtype")),
    )


def _gpt2_config(cfg: Mapping) -> DecoderConfig:
    mt = "gpt2"
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2 config scale_attn_by_inverse_layer_idx=True is not supported")
    hidden = int(cfg.get("n_embd", 768))
    heads = int(cfg.get("n_head", 12))
    return DecoderConfig(
        vocab_size=int(cfg.get("vocab_size", 50257)),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
        num_layers=int(cfg.get("n_layer", 12)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        norm="layer",
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(cfg, "activation_function", "gelu_new", mt),
        gated_mlp=False,
        positions="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        query_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_positions=int(cfg.get("n_positions", 1024)),
        dtype=_dtype_name(cfg.get("torch_dtype") or cfg.get("dtype")),
    )


def _dtype_name(name) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}.get(str(name), "float32")


# --------------------------------------------------------------------------------------------------------------
# Parameters


def param_shapes(config: DecoderConfig) -> dict:
    """The params pytree with shape tuples as leaves."""
    c = config
    L, H, I, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def norm(*lead, width=H):
        out = {"scale": (*lead, width)}
        if c.norm == "layer":
            out["bias"] = (*lead, width)
        return out

    def dense(d_in, d_out, bias):
        out = {"kernel": (L, d_in, d_out)}
        if bias:
            out["bias"] = (L, d_out)
        return out

    layers = {"attn_norm": norm(L), "q": dense(H, qd, c.qkv_bias), "k": dense(H, kd, c.qkv_bias),
              "v": dense(H, kd, c.qkv_bias), "o": dense(qd, H, c.o_bias), "mlp_norm": norm(L)}
    if c.qk_norm:
        layers["q_norm"] = norm(L, width=c.head_dim)
        layers["k_norm"] = norm(L, width=c.head_dim)
    if c.post_norms:
        layers["post_attn_norm"] = norm(L)
        layers["post_mlp_norm"] = norm(L)
    if c.gated_mlp:
        layers["gate"] = dense(H, I, c.mlp_bias)
    layers["up"] = dense(H, I, c.mlp_bias)
    layers["down"] = dense(I, H, c.mlp_bias)
    shapes = {"embed": (V, H), "layers": layers, "final_norm": norm()}
    if c.positions == "learned":
        shapes["pos_embed"] = (c.max_positions, H)
    if not c.tied_embeddings:
        shapes["lm_head"] = {"kernel": (H, V)}
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_params(config: DecoderConfig, key: jax.Array, dtype=None) -> Params:
    """Random params: matrices and embeddings ~ N(0, 0.02^2), biases 0, norms the identity."""
    dtype = jnp.dtype(dtype or config.dtype)
    shapes = param_shapes(config)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(paths))
    leaves = []
    for (path, shape), k in zip(paths, keys):
        names = [getattr(p, "key", None) for p in path]
        if names[-1] == "bias":
            leaves.append(jnp.zeros(shape, dtype))
        elif names[-1] == "scale":
            scale = 1.0 - config.norm_offset if config.norm == "rms" else 1.0
            leaves.append(jnp.full(shape, scale, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------------------------
# Building blocks


def _wide(dtype) -> jnp.dtype:
    """The dtype for norms, softmax, RoPE angles and logits: float32, or float64 for float64 models."""
    return jnp.promote_types(dtype, jnp.float32)


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions count real tokens only (0 for the first real token)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _norm(config: DecoderConfig, p: Mapping, x: jax.Array) -> jax.Array:
    wide = _wide(x.dtype)
    xf = x.astype(wide)
    if config.norm == "rms":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + config.norm_eps)
        y = y * (config.norm_offset + p["scale"].astype(wide))
    else:
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + config.norm_eps)
        y = y * p["scale"].astype(wide) + p["bias"].astype(wide)
    return y.astype(x.dtype)


def _dense(p: Mapping, x: jax.Array) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x, p["kernel"])
    if "bias" in p:
        y = y + p["bias"]
    return y


def _activate(config: DecoderConfig, x: jax.Array) -> jax.Array:
    if config.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=config.activation == "gelu_tanh")


def rope_inv_freq(config: DecoderConfig, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (float64 numpy) for base `theta` and an optional scaling rule."""
    dim = config.head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def rope_table(config: DecoderConfig) -> np.ndarray:
    """Per-layer inverse frequencies [L, head_dim / 2]: local layers use `rope_local_theta` when it is set."""
    scaling = config.rope_scaling_dict
    global_freq = rope_inv_freq(config, config.rope_theta, scaling)
    if config.rope_local_theta is None:
        return np.tile(global_freq, (config.num_layers, 1))
    local_freq = rope_inv_freq(config, config.rope_local_theta, None)
    return np.stack([local_freq if is_local else global_freq for is_local in config.is_local])


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's half-split rotation: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; x: [B, T, N, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    xf1, xf2 = x1.astype(cos.dtype), x2.astype(cos.dtype)
    out = jnp.concatenate([xf1 * cos - xf2 * sin, xf2 * cos + xf1 * sin], axis=-1)
    return out.astype(x.dtype)


def _attention(config, p, x, mask, positions, inv_freq):
    """x: [B, T, H] (normed); mask: [B, T, T] bool (query, key); inv_freq: [D/2] or None."""
    c = config
    B, T, _ = x.shape
    dtype, wide = x.dtype, _wide(x.dtype)
    K, G, D = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    q = _dense(p["q"], x).reshape(B, T, K * G, D)
    k = _dense(p["k"], x).reshape(B, T, K, D)
    v = _dense(p["v"], x).reshape(B, T, K, D)
    if c.qk_norm:
        q = _norm(c, p["q_norm"], q)
        k = _norm(c, p["k_norm"], k)
    if inv_freq is not None:
        angles = positions.astype(wide)[:, :, None, None] * inv_freq.astype(wide)  # [B, T, 1, D/2]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
    q = q.reshape(B, T, K, G, D)  # query head h uses kv head h // G, as HF's repeat_kv
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=wide)
    scores = scores * jnp.asarray((c.query_scale or D) ** -0.5, wide)
    if c.attn_softcap is not None:
        scores = c.attn_softcap * jnp.tanh(scores / c.attn_softcap)
    # Rows with no visible key (left padding) get a uniform softmax instead of NaN; their outputs are padding.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(wide).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, K * G * D)
    return _dense(p["o"], out)


def _layer(config, p, h, mask, positions, inv_freq):
    c = config
    a = _attention(c, p, _norm(c, p["attn_norm"], h), mask, positions, inv_freq)
    if c.post_norms:
        a = _norm(c, p["post_attn_norm"], a)
    h = h + a
    x = _norm(c, p["mlp_norm"], h)
    if c.gated_mlp:
        y = _activate(c, _dense(p["gate"], x)) * _dense(p["up"], x)
    else:
        y = _activate(c, _dense(p["up"], x))
    y = _dense(p["down"], y)
    if c.post_norms:
        y = _norm(c, p["post_mlp_norm"], y)
    return h + y


def output_weight(config: DecoderConfig, params: Params) -> tuple[jax.Array, bool]:
    """(weight, tied): the embedding [V, H] when tied, else lm_head's kernel [H, V]."""
    if config.tied_embeddings:
        return params["embed"], True
    return params["lm_head"]["kernel"], False


def _project(config, params, h):
    weight, tied = output_weight(config, params)
    spec = "bth,vh->btv" if tied else "bth,hv->btv"
    logits = jnp.einsum(spec, h, weight, preferred_element_type=_wide(h.dtype))
    if config.final_softcap is not None:
        logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits


def forward(config: DecoderConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            *, remat: str = "none", return_hidden: bool = False):
    """Logits [B, T, V] (float32 for bfloat16 params, else the params' dtype); with `return_hidden`, also the
    last hidden state [B, T, H] after the final norm (the input of the output projection).

    remat: "none"; "layer" (recompute each layer in the backward pass, saving only its input); "dots"
    (`jax.checkpoint_policies.checkpoint_dots`: keep the matmul outputs, recompute the rest).
    """
    c = config
    if remat not in _REMAT:
        raise ValueError(f"remat={remat!r} is not one of {_REMAT}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    if T > c.max_positions:
        raise ValueError(f"sequence length {T} exceeds max_positions={c.max_positions}")
    dtype = params["embed"].dtype
    positions = position_ids_from_mask(attention_mask)

    h = jnp.take(params["embed"], input_ids, axis=0)
    if c.embed_scale is not None:
        h = h * jnp.asarray(c.embed_scale, dtype)  # HF casts sqrt(H) to the weights' dtype first
    if c.positions == "learned":
        h = h + jnp.take(params["pos_embed"], positions, axis=0)

    q_idx = jnp.arange(T)[:, None]
    k_idx = jnp.arange(T)[None, :]
    global_mask = (k_idx <= q_idx)[None] & attention_mask.astype(bool)[:, None, :]  # [B, T(query), T(key)]
    is_local = c.is_local
    mixed = any(is_local) and not all(is_local)
    if any(is_local):
        local_mask = global_mask & (q_idx - k_idx < c.sliding_window)[None]
    uses_rope = c.positions == "rope"

    def body(h, xs):
        p, local, inv_freq = xs
        if mixed:
            mask = jnp.where(local, local_mask, global_mask)
        else:
            mask = local_mask if any(is_local) else global_mask
        return _layer(c, p, h, mask, positions, inv_freq if uses_rope else None), None

    if remat == "layer":
        body = jax.checkpoint(body, prevent_cse=False)
    elif remat == "dots":
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots)

    inv_freq = jnp.asarray(rope_table(c) if uses_rope else np.zeros((c.num_layers, 1)), _wide(dtype))
    h, _ = jax.lax.scan(body, h, (params["layers"], jnp.asarray(is_local), inv_freq))
    h = _norm(c, params["final_norm"], h)
    logits = _project(c, params, h)
    return (logits, h) if return_hidden else logits


# --------------------------------------------------------------------------------------------------------------
# Loss


def token_nll_chunked(hidden: jax.Array, lm_head_or_embed: jax.Array, targets: jax.Array, mask: jax.Array,
                      chunk: int, *, tied: bool = False, softcap: float | None = None) -> jax.Array:
    """Per-token NLL [B, T] = logsumexp(z) - z[target], z = hidden @ W, over vocabulary chunks of `chunk`.

    `lm_head_or_embed` is lm_head's kernel [H, V], or with `tied` the embedding [V, H] (see `output_weight`);
    `softcap` is the model's final soft-cap (Gemma 2), applied to z first. Never builds the [B, T, V] logits:
    a scan over chunks keeps a running max and sum of exponentials, and its body is rematerialised, so the
    backward pass recomputes one [B, T, chunk] block at a time too. Computed in float32 (float64 for float64
    inputs); positions where `mask` is 0 give 0.
    """
    wide = _wide(hidden.dtype)
    weight = lm_head_or_embed if tied else lm_head_or_embed.T  # [V, H]
    V, H = weight.shape
    chunk = int(min(chunk, V))
    n_chunks = -(-V // chunk)
    pad = n_chunks * chunk - V
    if pad:
        weight = jnp.concatenate([weight, jnp.zeros((pad, H), weight.dtype)], axis=0)
    blocks = weight.reshape(n_chunks, chunk, H)
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    lowest = jnp.finfo(wide).min
    targets = targets.astype(jnp.int32)

    def body(carry, xs):
        m, s, z_target = carry
        block, start = xs
        z = jnp.einsum("bth,ch->btc", hidden, block, preferred_element_type=wide)
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        cols = start + jnp.arange(chunk, dtype=jnp.int32)
        z = jnp.where(cols < V, z, lowest)
        # the max only stabilises the sum: logsumexp = m + log(sum exp(z - m)) holds for any m
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(z, axis=-1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
        z_target = z_target + jnp.sum(jnp.where(cols == targets[..., None], z, 0.0), axis=-1)
        return (m_new, s, z_target), None

    body = jax.checkpoint(body, prevent_cse=False)
    shape = targets.shape
    init = (jnp.full(shape, lowest, wide), jnp.zeros(shape, wide), jnp.zeros(shape, wide))
    (m, s, z_target), _ = jax.lax.scan(body, init, (blocks, starts))
    nll = m + jnp.log(s) - z_target
    return nll * mask.astype(wide)


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token NLL [B, T] from full logits (the reference for `token_nll_chunked`)."""
    logits = logits.astype(_wide(logits.dtype))
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -picked * mask.astype(logits.dtype)
