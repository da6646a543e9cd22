"""One small interface over the two model runtimes: `CausalLM` (Hugging Face Flax classes, transformers 4.57.6) and
`DecoderLM` (jaxinf's own scanned decoder, `jaxinf.models.decoder`; at the end of this file).

`CausalLM` bundles a linen module, its frozen parameters, config and tokenizer. `CausalLM.apply` is a pure
function of `(params, input_ids, attention_mask)` that returns logits (and optionally the last hidden state).
Two corrections to the HF Flax code are applied through `flax.linen.intercept_methods`, so the HF modules
themselves are used unmodified:

* RoPE base: FlaxLlama / FlaxMistral build their rotary tables with base 10000 whatever `config.rope_theta`
  says. We recompute sin/cos with `rope_theta` (SmolLM2 uses 100000) in the activation dtype.
* float64 models stay float64: HF computes RMSNorm statistics and (for dtype != float32) the attention
  softmax in float32, which would cap float64 exactness tests at ~1e-7.
* Extra interceptors (LoRA adapters, layer capture for K-FAC) are composed around every call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Interceptor = Callable[..., Any]

_ROTARY_CLASSES = ("FlaxLlamaRotaryEmbedding", "FlaxMistralRotaryEmbedding")


def rotary_tables(position_ids: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """sin, cos of shape [B, T, 1, head_dim] for RoPE with base `theta` (HF's half-split convention).

    angle[p, i] = p * theta^(-2i / head_dim) for i < head_dim / 2, repeated over both halves.
    """
    wide = jnp.promote_types(dtype, jnp.float32)  # angles in float32, or float64 under x64
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=wide) / head_dim))
    angles = position_ids.astype(wide)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.sin(angles).astype(dtype), jnp.cos(angles).astype(dtype)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] on the two halves of the last axis."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _rope_interceptor(theta: float) -> Interceptor:
    def intercept(next_fun, args, kwargs, context):
        if type(context.module).__name__ not in _ROTARY_CLASSES or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        key, query, position_ids = args
        sin, cos = rotary_tables(position_ids, query.shape[-1], theta, query.dtype)
        return apply_rotary(key, sin, cos).astype(key.dtype), apply_rotary(query, sin, cos).astype(query.dtype)

    return intercept


def _float64_interceptor() -> Interceptor:
    """Keep float64 models in float64 end to end (for exactness tests).

    HF Llama/Mistral compute the RMSNorm variance in float32 and, whenever dtype != float32, the attention
    softmax in float32 too; in a float64 model that caps agreement between derivatives at ~1e-7.
    """

    def intercept(next_fun, args, kwargs, context):
        name, module = type(context.module).__name__, context.module
        if getattr(module, "dtype", None) != jnp.float64:
            return next_fun(*args, **kwargs)
        if context.method_name == "setup" and name.endswith("Attention"):
            out = next_fun(*args, **kwargs)
            object.__setattr__(module, "attention_softmax_in_fp32", False)
            return out
        if context.method_name == "__call__" and name.endswith("RMSNorm"):
            h = args[0]
            variance = jnp.mean(h * h, axis=-1, keepdims=True)
            return module.weight * (h / jnp.sqrt(variance + module.config.rms_norm_eps))
        return next_fun(*args, **kwargs)

    return intercept


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions count real tokens only (0 for the first real token), so left or right padding gives equal results."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM:
    """A causal LM: `module` (HF linen module), frozen `params`, `config`, `tokenizer`, `family` (gpt2/llama/mistral)."""

    name: str
    family: str
    config: Any
    module: nn.Module
    params: Any
    tokenizer: Any

    @property
    def max_length(self) -> int:
        """Longest sequence the model's position tables and causal mask accept."""
        return int(getattr(self.config, "max_position_embeddings", None) or self.config.n_positions)

    @property
    def dtype(self):
        return self.module.dtype

    def apply(
        self,
        params: Any,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        interceptors: Sequence[Interceptor] = (),
        output_hidden: bool = False,
    ):
        """Logits [B, T, V] (and the last hidden state [B, T, H] after the final norm if `output_hidden`)."""
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]} but model {self.name!r} accepts at most {self.max_length} "
                "tokens: lower max_length when tokenising (e.g. --max_length)."
            )
        stack = list(interceptors)
        if self.family in ("llama", "mistral"):
            stack.append(_rope_interceptor(float(getattr(self.config, "rope_theta", 10000.0))))
            if self.dtype == jnp.float64:
                stack.append(_float64_interceptor())
        outputs = _apply_with(
            stack,
            lambda: self.module.apply(
                {"params": params},
                input_ids,
                attention_mask,
                position_ids_from_mask(attention_mask),
                deterministic=True,
                output_hidden_states=output_hidden,
            ),
        )
        if output_hidden:
            return outputs.logits, outputs.hidden_states[-1]
        return outputs.logits


def _apply_with(interceptors: Sequence[Interceptor], fn: Callable[[], Any]):
    if not interceptors:
        return fn()
    with nn.intercept_methods(interceptors[0]):
        return _apply_with(interceptors[1:], fn)


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderLM:
    """A causal LM run by jaxinf's own scanned decoder (`jaxinf.models.decoder`): no Flax module, no interceptors.

    `config` is the `DecoderConfig`, `params` the stacked params pytree, `family` the Hugging Face model_type it
    came from. LoRA adapters keep jaxinf's flat per-layer format ({"model/layers/<i>/<self_attn|mlp>/<proj>":
    {"A", "B"}}, `jaxinf.models.lora`), stacked over layers on each call; capture for K-FAC goes through the
    decoder's zero taps (`jaxinf.curvature.capture`). `remat` is the decoder's per-layer rematerialisation
    ("none" | "layer" | "dots").
    """

    name: str
    family: str
    config: Any
    params: Any
    tokenizer: Any
    remat: str = "none"

    @property
    def max_length(self) -> int:
        return int(self.config.max_positions)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def apply(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, *, adapters=None,
              lora_scale: float | None = None, dropout: float = 0.0, dropout_rng: Optional[jax.Array] = None,
              output_hidden: bool = False, interceptors: Sequence[Interceptor] = ()):
        """Logits [B, T, V] (and the last hidden state [B, T, H] after the final norm if `output_hidden`).

        adapters: flat LoRA adapters (see the class docstring) or None; dropout applies to their inputs only
        when `dropout_rng` is given.
        """
        from jaxinf.models import decoder

        if interceptors:
            raise ValueError(f"model {self.name!r} runs on jaxinf's own decoder, which takes no linen interceptors: "
                             "pass LoRA adapters as `adapters=` and capture through jaxinf.curvature.capture")
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]} but model {self.name!r} accepts at most {self.max_length} "
                "tokens: lower max_length when tokenising (e.g. --max_length).")
        stacked = decoder.stack_adapters(self.config, adapters) if adapters else None
        return decoder.forward(self.config, params, input_ids, attention_mask, adapters=stacked,
                               lora_scale=lora_scale if stacked else None, remat=self.remat,
                               return_hidden=output_hidden, dropout=dropout, dropout_rng=dropout_rng)
