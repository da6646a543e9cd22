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

Every per-layer linear projection (`PROJECTIONS`: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj) goes through one helper, `linear`, which is where LoRA and layer capture live::

    y = x W (+ b) (+ lora_scale * (x A) B) (+ tap)

`forward(..., adapters=, lora_scale=, taps=, record=)` takes LoRA adapters as a pytree of their own, stacked over
layers like the params ({"q_proj": {"A": [L, d_in, r], "B": [L, r, d_out]}, ...}; `init_adapters`,
`merge_adapters`), zero "taps" [L, B, T, d_out] added to tracked projections' outputs (the gradient with respect
to a tap is that projection's output cotangent g) and returns, with `record`, the tracked projections' inputs
a [L, B, T, d_in]. Adapters and taps are scanned inputs, recorded inputs scanned outputs, so this works under
scan and remat. `capture_projections` returns (a, g) for K-FAC, `lora_grads_from_capture` the per-example adapter
gradients they give, and `check_capture_coverage` refuses a capture that leaves a trainable adapter out.

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
    """RMSNorm or LayerNorm in float32 (or float64). Divides by sqrt rather than multiplying by lax.rsqrt: on the
    CPU (jax 0.10.2), vmap of rsqrt's VJP over 32 or more float32 cotangents returns wrong values (relative error
    ~0.4; `tests/test_decoder.py::test_batched_reverse_mode_equals_one_at_a_time` reproduces it), which broke
    dense_matrix's 64-column chunks of the GGN on float32 models."""
    wide = _wide(x.dtype)
    xf = x.astype(wide)
    if config.norm == "rms":
        y = xf / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + config.norm_eps)
        y = y * (config.norm_offset + p["scale"].astype(wide))
    else:
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        y = centred / jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + config.norm_eps)
        y = y * p["scale"].astype(wide) + p["bias"].astype(wide)
    return y.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, lora: Mapping | None = None,
           lora_scale: float | None = None, tap: jax.Array | None = None, dropout: float = 0.0,
           dropout_key: jax.Array | None = None) -> jax.Array:
    """The one linear projection of the decoder: y = x w (+ b) (+ lora_scale * (drop(x) A) B) (+ tap).

    x: [..., d_in]; w: [d_in, d_out]; b: [d_out]; lora: {"A": [d_in, r], "B": [r, d_out]} (computed in the
    adapters' dtype, added in y's); tap: [..., d_out], normally zeros: the gradient of a loss with respect to it
    is the cotangent of this projection's output y (the K-FAC "g"). With `dropout_key` and `dropout` > 0 the
    adapter's input is inverted dropout of x (keep with probability 1 - dropout, scaled by 1 / (1 - dropout)),
    as PEFT's LoRA dropout; the base path x w never sees dropout.
    """
    y = jnp.einsum("...i,io->...o", x, w)
    if b is not None:
        y = y + b
    if lora is not None:
        if lora_scale is None:
            raise ValueError("linear: a LoRA adapter needs lora_scale (alpha / rank)")
        a, bb = lora["A"], lora["B"]
        xa = x.astype(a.dtype)
        if dropout_key is not None and dropout > 0.0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - dropout, xa.shape)
            xa = jnp.where(keep, xa / (1.0 - dropout), 0.0).astype(a.dtype)
        y = y + (lora_scale * ((xa @ a) @ bb)).astype(y.dtype)
    if tap is not None:
        y = y + tap.astype(y.dtype)
    return y


class _Projections:
    """One layer's view of the adapters, taps and recorded inputs (a fresh one per scan step).

    `layer_key`: this layer's LoRA dropout key (None: no dropout); projection i of `PROJECTIONS` draws its mask
    with fold_in(layer_key, i), so the same key gives the same masks."""

    def __init__(self, adapters: Mapping, lora_scale: float | None, taps: Mapping, record: tuple[str, ...],
                 dropout: float = 0.0, layer_key: jax.Array | None = None):
        self.adapters, self.lora_scale, self.taps, self.record = adapters, lora_scale, taps, record
        self.dropout, self.layer_key = dropout, layer_key
        self.inputs: dict[str, jax.Array] = {}

    def __call__(self, name: str, p: Mapping, x: jax.Array) -> jax.Array:
        if name in self.record:
            self.inputs[name] = x
        key = None
        if self.layer_key is not None and name in self.adapters:
            key = jax.random.fold_in(self.layer_key, _PROJECTION_INDEX[name])
        return linear(x, p["kernel"], p.get("bias"), lora=self.adapters.get(name), lora_scale=self.lora_scale,
                      tap=self.taps.get(name), dropout=self.dropout, dropout_key=key)


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


def _attention(config, p, x, mask, positions, inv_freq, proj):
    """x: [B, T, H] (normed); mask: [B, T, T] bool (query, key); inv_freq: [D/2] or None."""
    c = config
    B, T, _ = x.shape
    dtype, wide = x.dtype, _wide(x.dtype)
    K, G, D = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    q = proj("q_proj", p["q"], x).reshape(B, T, K * G, D)
    k = proj("k_proj", p["k"], x).reshape(B, T, K, D)
    v = proj("v_proj", p["v"], x).reshape(B, T, K, D)
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
    return proj("o_proj", p["o"], out)


def _layer(config, p, h, mask, positions, inv_freq, proj):
    c = config
    a = _attention(c, p, _norm(c, p["attn_norm"], h), mask, positions, inv_freq, proj)
    if c.post_norms:
        a = _norm(c, p["post_attn_norm"], a)
    h = h + a
    x = _norm(c, p["mlp_norm"], h)
    if c.gated_mlp:
        y = _activate(c, proj("gate_proj", p["gate"], x)) * proj("up_proj", p["up"], x)
    else:
        y = _activate(c, proj("up_proj", p["up"], x))
    y = proj("down_proj", p["down"], y)
    if c.post_norms:
        y = _norm(c, p["post_mlp_norm"], y)
    return h + y


def output_weight(config: DecoderConfig, params: Params) -> tuple[jax.Array, bool]:
    """(weight, tied): the embedding [V, H] when tied, else lm_head's kernel [H, V]."""
    if config.tied_embeddings:
        return params["embed"], True
    return params["lm_head"]["kernel"], False


def project(config: DecoderConfig, params: Params, hidden: jax.Array, tap: jax.Array | None = None) -> jax.Array:
    """Logits [..., V] of final hidden states [..., H] (the output projection and the final soft-cap).

    tap: [..., V], normally zeros, added to hidden @ W before the soft-cap: the gradient with respect to it is
    the output head's output cotangent (`capture_projections` with "lm_head" tracked).
    With a large vocabulary, project only the positions needed (e.g. ``hidden[:, -1]`` for the next token), or
    use `token_nll_chunked` for the loss: neither builds [B, T, V].
    """
    weight, tied = output_weight(config, params)
    spec = "...h,vh->...v" if tied else "...h,hv->...v"
    logits = jnp.einsum(spec, hidden, weight, preferred_element_type=_wide(hidden.dtype))
    if tap is not None:
        logits = logits + tap.astype(logits.dtype)
    if config.final_softcap is not None:
        logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits


# --------------------------------------------------------------------------------------------------------------
# Projections: names, LoRA adapters, taps

# The per-layer linear projections by their Hugging Face (Llama) names -> the params key under "layers".
# GPT-2's fused c_attn is split into q/k/v by hf_weights, so its projections carry the same names (its c_fc is
# "up_proj", its mlp.c_proj "down_proj", attn.c_proj "o_proj").
PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
               "down_proj": "down"}
_PROJECTION_INDEX = {name: i for i, name in enumerate(PROJECTIONS)}
HEAD = "lm_head"  # the untied output head, trackable by `capture_projections` (not a per-layer projection)
_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def projection_dims(config: DecoderConfig) -> dict[str, tuple[int, int]]:
    """{projection name: (d_in, d_out)} for the projections this config has (no gate_proj without a gated MLP)."""
    layers = param_shapes(config)["layers"]
    return {name: layers[key]["kernel"][1:] for name, key in PROJECTIONS.items() if key in layers}


def _check_names(config: DecoderConfig, names, what: str) -> None:
    dims = projection_dims(config)
    unknown = [n for n in names if n not in dims]
    if unknown:
        raise ValueError(f"{what} names {unknown} that are no projection of this decoder ({', '.join(dims)})")


def _check_adapters(config: DecoderConfig, adapters: Mapping) -> None:
    _check_names(config, list(adapters), "adapters")
    dims, L = projection_dims(config), config.num_layers
    for name, ab in adapters.items():
        if not isinstance(ab, Mapping) or set(ab) != {"A", "B"}:
            raise ValueError(f"adapters[{name!r}] must be {{'A': [L, d_in, r], 'B': [L, r, d_out]}}, "
                             f"got {type(ab).__name__} {list(ab) if isinstance(ab, Mapping) else ''}")
        d_in, d_out = dims[name]
        a, b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if len(a) != 3 or len(b) != 3 or a[:2] != (L, d_in) or b[0] != L or b[2] != d_out or a[2] != b[1]:
            raise ValueError(f"adapters[{name!r}] has A {a} and B {b}; expected A ({L}, {d_in}, r) and "
                             f"B ({L}, r, {d_out})")


def tap_shapes(config: DecoderConfig, batch: int, seq: int, tracked) -> dict[str, tuple[int, ...]]:
    """{name: (L, batch, seq, d_out)} for the tracked projections: the shapes of `forward`'s taps."""
    _check_names(config, list(tracked), "tracked")
    dims = projection_dims(config)
    return {name: (config.num_layers, batch, seq, dims[name][1]) for name in tracked}


def zero_taps(config: DecoderConfig, batch: int, seq: int, tracked, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Zero taps for the tracked projections (their gradient is each projection's output cotangent)."""
    return {name: jnp.zeros(shape, dtype) for name, shape in tap_shapes(config, batch, seq, tracked).items()}


def init_adapters(config: DecoderConfig, key: jax.Array, targets=("q_proj", "v_proj"), rank: int = 4,
                  dtype=None, *, b_std: float = 0.0) -> dict:
    """LoRA adapters {name: {"A": [L, d_in, r], "B": [L, r, d_out]}} with PEFT's initialisation:
    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (torch's kaiming_uniform(a=sqrt(5)) bound), B = 0 (so the adapted model
    starts as the base model). `b_std` > 0 draws B ~ N(0, b_std^2) instead (tests: adapters that change the
    output). dtype defaults to config.dtype.
    """
    dtype = jnp.dtype(dtype or config.dtype)
    _check_names(config, list(targets), "targets")
    dims, L = projection_dims(config), config.num_layers
    adapters = {}
    for i, name in enumerate(targets):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        d_in, d_out = dims[name]
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(ka, (L, d_in, rank), jnp.float32, -bound, bound).astype(dtype)
        b = (b_std * jax.random.normal(kb, (L, rank, d_out), jnp.float32)).astype(dtype)
        adapters[name] = {"A": a, "B": b}
    return adapters


def merge_adapters(config: DecoderConfig, params: Params, adapters: Mapping, lora_scale: float) -> Params:
    """Params with W + lora_scale * A B written into each adapted kernel (per layer; in the kernel's dtype)."""
    _check_adapters(config, adapters)
    layers = dict(params["layers"])
    for name, ab in adapters.items():
        key = PROJECTIONS[name]
        kernel = layers[key]["kernel"]
        delta = lora_scale * jnp.einsum("lir,lro->lio", ab["A"], ab["B"])
        layers[key] = {**layers[key], "kernel": (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)}
    return {**params, "layers": layers}


def module_path(name: str, layer: int) -> str:
    """The flat adapter key of jaxinf.models.lora for one layer's projection: 'model/layers/3/self_attn/q_proj'."""
    return f"model/layers/{layer}/{_MODULES[name]}/{name}"


def unstack_adapters(adapters: Mapping) -> dict:
    """Stacked adapters -> the flat per-layer dict of jaxinf.models.lora {module path: {"A": [d_in, r], ...}}."""
    flat = {}
    for name, ab in adapters.items():
        for i in range(ab["A"].shape[0]):
            flat[module_path(name, i)] = {"A": ab["A"][i], "B": ab["B"][i]}
    return flat


def stack_adapters(config: DecoderConfig, flat: Mapping) -> dict:
    """The flat per-layer dict of jaxinf.models.lora -> stacked adapters (every layer of a projection needed)."""
    by_name: dict[str, dict[int, Mapping]] = {}
    for path, ab in flat.items():
        parts = path.split("/")
        name, module = parts[-1], parts[-2]
        if (len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit()
                or _MODULES.get(name) != module):
            raise ValueError(f"adapter key {path!r} is not 'model/layers/<i>/<self_attn|mlp>/<projection>'")
        by_name.setdefault(name, {})[int(parts[2])] = ab
    stacked = {}
    for name, per_layer in by_name.items():
        if sorted(per_layer) != list(range(config.num_layers)):
            missing = sorted(set(range(config.num_layers)) - set(per_layer))
            raise ValueError(f"adapters for {name} lack layers {missing}: stacked adapters cover every layer")
        stacked[name] = {k: jnp.stack([per_layer[i][k] for i in range(config.num_layers)]) for k in ("A", "B")}
    _check_adapters(config, stacked)
    return stacked


def check_capture_coverage(config: DecoderConfig, adapters, tracked) -> None:
    """Raise (one line) unless every trainable adapter matrix can be built from the captured projections.

    adapters: the trainable adapters (a mapping name -> {"A", "B"}, or just the names); tracked: the projections
    whose input a and output cotangent g are captured. An adapter's grad_A = scale x^T (g B^T) and
    grad_B = scale (x A)^T g need its projection's (x, g); an untracked one would silently get no curvature.
    """
    names = list(adapters)
    _check_names(config, names, "adapters")
    _check_names(config, list(tracked), "tracked")
    tracked = set(tracked)
    gaps = [f"{name}/{m}" for name in names if name not in tracked
            for m in (adapters[name] if isinstance(adapters, Mapping) else ("A", "B"))]
    if gaps:
        raise ValueError(f"capture does not cover trainable LoRA matrices {gaps}: their projections are not "
                         f"tracked (tracked: {sorted(tracked)}); track {sorted({g.split('/')[0] for g in gaps})} "
                         f"too, or freeze those adapters")


def _record_names(record, taps: Mapping) -> tuple[str, ...]:
    if record is False or record is None:
        return ()
    if record is True:
        if not taps:
            raise ValueError("record=True records the tapped projections' inputs but no taps were given: pass "
                             "taps, or record=('q_proj', ...) to name the projections")
        return tuple(taps)
    if isinstance(record, str):
        return (record,)
    return tuple(record)


# --------------------------------------------------------------------------------------------------------------
# Forward


def forward_hidden(config: DecoderConfig, params: Params, input_ids: jax.Array,
                   attention_mask: jax.Array | None = None, *, adapters: Mapping | None = None,
                   lora_scale: float | None = None, taps: Mapping | None = None, record=False,
                   remat: str = "none", dropout: float = 0.0, dropout_rng: jax.Array | None = None):
    """The last hidden state [B, T, H] after the final norm (the input of `project`), and with `record` the
    recorded projection inputs (see `forward`): ``hidden`` or ``(hidden, recorded)``."""
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
    adapters, taps = dict(adapters or {}), dict(taps or {})
    if adapters:
        _check_adapters(c, adapters)
        if lora_scale is None:
            raise ValueError("forward: adapters were given without lora_scale (alpha / rank)")
    if taps:
        expected = tap_shapes(c, B, T, list(taps))
        wrong = {n: tuple(t.shape) for n, t in taps.items() if tuple(t.shape) != expected[n]}
        if wrong:
            raise ValueError(f"taps have shapes {wrong}; expected {({n: expected[n] for n in wrong})} "
                             "([layers, batch, time, d_out])")
    recorded_names = _record_names(record, taps)
    _check_names(c, list(recorded_names), "record")

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

    # adapters and taps are scanned inputs (one layer's slice per step), recorded inputs scanned outputs
    drop = dropout_rng is not None and dropout > 0.0 and bool(adapters)

    def body(h, xs):
        p, local, inv_freq, lora, tap, index = xs
        if mixed:
            mask = jnp.where(local, local_mask, global_mask)
        else:
            mask = local_mask if any(is_local) else global_mask
        layer_key = jax.random.fold_in(dropout_rng, index) if drop else None
        proj = _Projections(lora, lora_scale, tap, recorded_names, dropout, layer_key)
        h = _layer(c, p, h, mask, positions, inv_freq if uses_rope else None, proj)
        return h, proj.inputs

    if remat == "layer":
        body = jax.checkpoint(body, prevent_cse=False)
    elif remat == "dots":
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots)

    inv_freq = jnp.asarray(rope_table(c) if uses_rope else np.zeros((c.num_layers, 1)), _wide(dtype))
    xs = (params["layers"], jnp.asarray(is_local), inv_freq, adapters, taps, jnp.arange(c.num_layers))
    h, recorded = jax.lax.scan(body, h, xs)
    h = _norm(c, params["final_norm"], h)
    return (h, recorded) if record else h


def forward(config: DecoderConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            *, adapters: Mapping | None = None, lora_scale: float | None = None, taps: Mapping | None = None,
            record=False, remat: str = "none", return_hidden: bool = False, dropout: float = 0.0,
            dropout_rng: jax.Array | None = None):
    """Logits [B, T, V] (float32 for bfloat16 params, else the params' dtype).

    Returns ``logits``, with `return_hidden` ``(logits, hidden)`` (the last hidden state [B, T, H] after the
    final norm, the input of the output projection), and with `record` the recorded inputs appended:
    ``(logits, recorded)`` or ``(logits, hidden, recorded)``.

    adapters: LoRA {projection: {"A": [L, d_in, r], "B": [L, r, d_out]}} over any projections (`PROJECTIONS`),
    adding ``lora_scale * (x A) B`` to the projection's output (required with adapters: alpha / rank).
    taps: {projection: [L, B, T, d_out]} added to the projection's output; pass zeros and differentiate with
    respect to them for each projection's output cotangent (`capture_projections`).
    record: True records the input [L, B, T, d_in] of every tapped projection; a tuple of names records those.
    remat: "none"; "layer" (recompute each layer in the backward pass, saving only its input); "dots"
    (`jax.checkpoint_policies.checkpoint_dots`: keep the matmul outputs, recompute the rest).
    dropout, dropout_rng: LoRA dropout on the adapters' inputs (training only): layer l's projection i draws its
    mask from fold_in(fold_in(dropout_rng, l), i); no key, no dropout.
    """
    out = forward_hidden(config, params, input_ids, attention_mask, adapters=adapters, lora_scale=lora_scale,
                         taps=taps, record=record, remat=remat, dropout=dropout, dropout_rng=dropout_rng)
    h, recorded = out if record else (out, None)
    logits = project(config, params, h)
    result = (logits, h) if return_hidden else (logits,)
    if record:
        result = result + (recorded,)
    return result[0] if len(result) == 1 else result


# --------------------------------------------------------------------------------------------------------------
# Capture (K-FAC's a and g)


def capture_projections(config: DecoderConfig, params: Params, input_ids: jax.Array,
                        attention_mask: jax.Array | None, loss_fn, tracked, *, adapters: Mapping | None = None,
                        lora_scale: float | None = None, remat: str = "none") -> tuple[dict, jax.Array]:
    """({name: (a [L, B, T, d_in], g [L, B, T, d_out])}, losses [B]) for the tracked projections.

    loss_fn(hidden [B, T, H]) -> per-example losses [B] (use `project` or `token_nll_chunked` on the hidden
    state). a is each projection's input, g the cotangent of its output for J = sum_b losses[b] (the SUM over
    examples), obtained as the gradient of J with respect to zero taps. Rows do not interact, so example b's
    own gradient of a projection's kernel is sum_t a[:, b, t]^T g[:, b, t] (plus sum_t g for a bias), and of its
    adapters see `lora_grads_from_capture`. Pure and jit-able.

    `tracked` may also name HEAD ("lm_head", an untied output head only): then loss_fn is called as
    loss_fn(hidden, head_tap) and must pass head_tap [B, T, V] to `project(..., tap=head_tap)`; the result
    holds "lm_head": (hidden [B, T, H], dJ/dlogits [B, T, V]) (no layer axis; logits before the soft-cap).
    """
    tracked = tuple(tracked)
    head = HEAD in tracked
    if head and config.tied_embeddings:
        raise ValueError("capture_projections: the output head is tied to the embedding (not a linear layer of "
                         "its own), so it cannot be tracked; drop 'lm_head' from tracked")
    projections = tuple(name for name in tracked if name != HEAD)
    if adapters:
        check_capture_coverage(config, adapters, projections)
    B, T = input_ids.shape
    dtype = params["embed"].dtype

    def total(taps):
        taps = dict(taps)
        head_tap = taps.pop(HEAD, None)
        hidden, recorded = forward_hidden(config, params, input_ids, attention_mask, adapters=adapters,
                                          lora_scale=lora_scale, taps=taps, record=True, remat=remat)
        losses = loss_fn(hidden, head_tap) if head else loss_fn(hidden)
        if losses.ndim != 1 or losses.shape[0] != B:
            raise ValueError(f"loss_fn must return per-example losses [{B}], got shape {losses.shape}")
        if head:
            recorded = {**recorded, HEAD: hidden}
        return losses.sum(), (losses, recorded)

    taps = zero_taps(config, B, T, projections, dtype)
    if head:
        taps[HEAD] = jnp.zeros((B, T, config.vocab_size), _wide(dtype))
    g, (losses, a) = jax.grad(total, has_aux=True)(taps)
    return {name: (a[name], g[name]) for name in tracked}, losses


def lora_grads_from_capture(captured: Mapping, adapters: Mapping, lora_scale: float) -> dict:
    """Per-example adapter gradients {name: {"A": [B, L, d_in, r], "B": [B, L, r, d_out]}} from a capture:

        grad_B = scale (x A)^T g,   grad_A = scale x^T (g B^T)   (summed over tokens, per layer and example)

    with x, g the projection's input and output cotangent (`capture_projections`, tracked must cover the
    adapters).
    """
    grads = {}
    for name, ab in adapters.items():
        if name not in captured:
            raise ValueError(f"capture lacks projection {name!r}, which has adapters")
        x, g = captured[name]
        a, b = ab["A"].astype(x.dtype), ab["B"].astype(x.dtype)
        xa = jnp.einsum("lbti,lir->lbtr", x, a)
        gb = jnp.einsum("lbto,lro->lbtr", g.astype(x.dtype), b)
        grads[name] = {"A": lora_scale * jnp.einsum("lbti,lbtr->blir", x, gb),
                       "B": lora_scale * jnp.einsum("lbtr,lbto->blro", xa, g.astype(x.dtype))}
    return grads


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
