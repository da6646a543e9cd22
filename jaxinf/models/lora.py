"""LoRA adapters as their own pytree, applied inside the decoder's projections (base weights stay frozen).

For a target linear layer y = x W (W: [d_in, d_out]) the adapted layer is

    y = x W + (alpha / r) * dropout(x) A B,     A: [d_in, r],  B: [r, d_out],

so with dropout off it equals the base layer with W + (alpha/r) A B merged in. Adapters are a flat dict
`{"model/layers/0/self_attn/q_proj": {"A": ..., "B": ...}, ...}`: one entry per adapted layer, which is also the
"layer" unit of the block-diagonal curvature approximations (DataInf, per-layer exact inverse, K-FAC).
Initialisation follows PEFT: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0. The decoder stacks the flat dict over
layers on each call (`decoder.stack_adapters`) and applies it in `decoder.linear`, where dropout also lives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.models.causal_lm import DecoderLM


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


def target_shapes(model: DecoderLM, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """{layer path: (d_in, d_out)} for every (layer, target projection), layers in order."""
    from jaxinf.models import decoder

    if not isinstance(model, DecoderLM):
        raise ValueError(f"LoRA needs a model on jaxinf's decoder; {getattr(model, 'name', model)!r} is a "
                         f"{type(model).__name__} (docs/models.md: train all its parameters instead)")
    dims = decoder.projection_dims(model.config)
    unknown = [t for t in config.targets if t not in dims]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no projection of {model.name!r}; its projections are "
                         f"{list(dims)}.")
    shapes = {decoder.module_path(t, i): tuple(int(d) for d in dims[t])
              for i in range(model.config.num_layers) for t in config.targets}
    return dict(sorted(shapes.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in path.split("/")]


def init_adapters(key: jax.Array, model: DecoderLM, config: LoraConfig, *, b_std: float = 0.0) -> dict:
    """PEFT initialisation (B = 0 unless `b_std` > 0, useful in tests so the adapters change the output)."""
    adapters = {}
    for i, (path, (d_in, d_out)) in enumerate(target_shapes(model, config).items()):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(ka, (d_in, config.rank), model.dtype, -bound, bound)
        b = b_std * jax.random.normal(kb, (config.rank, d_out), model.dtype)
        adapters[path] = {"A": a, "B": b}
    return adapters


def merge_adapters(model: DecoderLM, adapters: dict, config: LoraConfig) -> Any:
    """Base params with W + (alpha/r) A B written into each adapted (stacked) kernel."""
    from jaxinf.models import decoder

    return decoder.merge_adapters(model.config, model.params, decoder.stack_adapters(model.config, adapters),
                                  config.scale)


def adapter_param_count(adapters: dict) -> int:
    return sum(int(v.size) for v in jax.tree.leaves(adapters))
