"""`DecoderLM`: a causal LM run by jaxinf's own scanned decoder (`jaxinf.models.decoder`), with its tokenizer.

`DecoderLM.apply` is a pure function of `(params, input_ids, attention_mask)` that returns logits (and optionally
the last hidden state); LoRA adapters and dropout are arguments, so there is no mutable state and nothing to
intercept. Any other object with the same `apply` / `params` / `tokenizer` / `max_length` / `dtype` works with the
gradient-only methods (docs/models.md, "Bring your own model").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import chex
import jax

from jaxinf.models import decoder
from jaxinf.models.decoder import position_ids_from_mask  # noqa: F401  (re-exported: jaxinf.models)


LOSS_CHUNK = 32768


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderLM:
    """A causal LM run by jaxinf's own scanned decoder (`jaxinf.models.decoder`).

    `config` is the `DecoderConfig`, `params` the stacked params pytree, `family` the Hugging Face model_type it
    came from. LoRA adapters keep jaxinf's flat per-layer format ({"model/layers/<i>/<self_attn|mlp>/<proj>":
    {"A", "B"}}, `jaxinf.models.lora`), stacked over layers on each call; capture for K-FAC goes through the
    decoder's zero taps (`jaxinf.curvature.capture`). `remat` is the decoder's per-layer rematerialisation
    ("none" | "layer" | "dots"). `loss_chunk`: when set, the training loss (`LMFunctions.per_example_loss`) runs
    over vocabulary chunks of this many tokens (`decoder.token_nll_chunked`), so [B, T, V] logits are never whole;
    `load_model` sets it to `LOSS_CHUNK` for vocabularies above `2 * LOSS_CHUNK` (Gemma 3's 262,144 tokens).
    """

    name: str
    family: str
    config: Any
    params: Any
    tokenizer: Any
    remat: str = "none"
    loss_chunk: Optional[int] = None

    @property
    def max_length(self) -> int:
        return int(self.config.max_positions)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def apply(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, *, adapters=None,
              lora_scale: float | None = None, dropout: float = 0.0, dropout_rng: Optional[jax.Array] = None,
              output_hidden: bool = False):
        """Logits [B, T, V] (and the last hidden state [B, T, H] after the final norm if `output_hidden`).

        adapters: flat LoRA adapters (see the class docstring) or None; dropout applies to their inputs only
        when `dropout_rng` is given.
        """
        stacked = self._check(input_ids, attention_mask, adapters)
        return decoder.forward(self.config, params, input_ids, attention_mask, adapters=stacked,
                               lora_scale=lora_scale if stacked else None, remat=self.remat,
                               return_hidden=output_hidden, dropout=dropout, dropout_rng=dropout_rng)

    def hidden(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, *, adapters=None,
               lora_scale: float | None = None, dropout: float = 0.0, dropout_rng: Optional[jax.Array] = None):
        """The last hidden state [B, T, H] after the final norm (the output projection's input), without logits."""
        stacked = self._check(input_ids, attention_mask, adapters)
        return decoder.forward_hidden(self.config, params, input_ids, attention_mask, adapters=stacked,
                                      lora_scale=lora_scale if stacked else None, remat=self.remat,
                                      dropout=dropout, dropout_rng=dropout_rng)

    def _check(self, input_ids, attention_mask, adapters):
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]} but model {self.name!r} accepts at most {self.max_length} "
                "tokens: lower max_length when tokenising (e.g. --max_length).")
        return decoder.stack_adapters(self.config, adapters) if adapters else None
