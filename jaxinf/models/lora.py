"""LoRA adapters as their own pytree, applied by interception (base weights stay frozen and untouched).

For a target linear layer y = x W (W: [d_in, d_out]) the adapted layer is

    y = x W + (alpha / r) * dropout(x) A B,     A: [d_in, r],  B: [r, d_out],

so with dropout off it equals the base layer with W + (alpha/r) A B merged in. Adapters are a flat dict
`{"model/layers/0/self_attn/q_proj": {"A": ..., "B": ...}, ...}`: one entry per adapted layer, which is also the
"layer" unit of the block-diagonal curvature approximations (DataInf, per-layer exact inverse, K-FAC).
Initialisation follows PEFT: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxinf.models.causal_lm import CausalLM, DecoderLM


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), dropout on the adapter input, names of the target linear modules."""

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# GPT-2 has no q_proj/v_proj: its attention projection is the fused, transposed FlaxConv1D `c_attn`.
_FAMILY_DEFAULT_TARGETS = {"gpt2": ("c_attn",)}


def resolve_targets(model: CausalLM | DecoderLM, config: LoraConfig) -> tuple[str, ...]:
    if isinstance(model, DecoderLM):  # our decoder splits GPT-2's c_attn into q/k/v: the defaults apply
        return config.targets
    if config.targets == LoraConfig.targets and model.family in _FAMILY_DEFAULT_TARGETS:
        return _FAMILY_DEFAULT_TARGETS[model.family]
    return config.targets


def _transposed(model: CausalLM) -> bool:
    """HF GPT-2's FlaxConv1D stores its kernel as [d_out, d_in]."""
    return model.family == "gpt2"


def _decoder_target_shapes(model: DecoderLM, targets) -> dict[str, tuple[int, int]]:
    from jaxinf.models import decoder

    dims = decoder.projection_dims(model.config)
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no projection of {model.name!r}; its projections are "
                         f"{list(dims)}.")
    return {decoder.module_path(t, i): tuple(int(d) for d in dims[t])
            for i in range(model.config.num_layers) for t in targets}


def target_shapes(model: CausalLM | DecoderLM, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """{layer path: (d_in, d_out)} for every kernel whose module name is a target."""
    targets = resolve_targets(model, config)
    if isinstance(model, DecoderLM):
        return dict(sorted(_decoder_target_shapes(model, targets).items(), key=lambda kv: _natural_key(kv[0])))
    flat = traverse_util.flatten_dict(model.params)
    shapes = {}
    for path, leaf in flat.items():
        if path[-1] == "kernel" and path[-2] in targets:
            d0, d1 = leaf.shape
            shapes["/".join(path[:-1])] = (d1, d0) if _transposed(model) else (d0, d1)
    if not shapes:
        names = sorted({p[-2] for p in flat if p[-1] == "kernel"})
        raise ValueError(f"LoRA targets {targets} match no linear layer of {model.name!r}; its layers are {names}.")
    return dict(sorted(shapes.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in path.split("/")]


def init_adapters(key: jax.Array, model: CausalLM | DecoderLM, config: LoraConfig, *, b_std: float = 0.0) -> dict:
    """PEFT initialisation (B = 0 unless `b_std` > 0, useful in tests so the adapters change the output)."""
    adapters = {}
    for i, (path, (d_in, d_out)) in enumerate(target_shapes(model, config).items()):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(ka, (d_in, config.rank), model.dtype, -bound, bound)
        b = b_std * jax.random.normal(kb, (config.rank, d_out), model.dtype)
        adapters[path] = {"A": a, "B": b}
    return adapters


def merge_adapters(model: CausalLM | DecoderLM, adapters: dict, config: LoraConfig) -> Any:
    """Base params with W + (alpha/r) A B written into each adapted kernel (transposed for FlaxConv1D)."""
    if isinstance(model, DecoderLM):
        from jaxinf.models import decoder

        return decoder.merge_adapters(model.config, model.params, decoder.stack_adapters(model.config, adapters),
                                      config.scale)
    flat = dict(traverse_util.flatten_dict(model.params))
    for path, ab in adapters.items():
        key = tuple(path.split("/")) + ("kernel",)
        delta = config.scale * ab["A"] @ ab["B"]
        flat[key] = flat[key] + (delta.T if _transposed(model) else delta)
    return traverse_util.unflatten_dict(flat)


def lora_interceptor(adapters: dict, config: LoraConfig, dropout_rng: Optional[jax.Array] = None):
    """Interceptor adding (alpha/r) dropout(x) A B to each adapted module's output.

    Dropout (rate `config.dropout`) is applied only when `dropout_rng` is given; the mask of each layer uses
    `fold_in(dropout_rng, layer index)` so the same key gives the same masks.
    """
    index = {path: i for i, path in enumerate(adapters)}

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if path not in adapters:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        if dropout_rng is not None and config.dropout > 0.0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, index[path]), 1.0 - config.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - config.dropout), 0.0)
        ab = adapters[path]
        return y + (config.scale * (x.astype(ab["A"].dtype) @ ab["A"]) @ ab["B"]).astype(y.dtype)

    return intercept


def adapter_param_count(adapters: dict) -> int:
    return sum(int(v.size) for v in jax.tree.leaves(adapters))
