"""Pure loss and measurement functions of the trainable parameters.

A batch is a dict of arrays [B, T]: `input_ids` (int), `attention_mask` (1 = real token) and `loss_mask`
(float; loss_mask[b, t] = 1 iff token t is a target predicted from tokens < t, so loss_mask[:, 0] = 0).

Per-example loss of row b: the mean next-token negative log-likelihood over its targets,

    L_b = sum_t loss_mask[b, t] * -log p(x_{b,t} | x_{b,<t}) / max(1, sum_t loss_mask[b, t]),

and the batch loss is the plain mean of L_b over rows (every example weighs the same, as in the influence
objective (1/n) sum_i L_i). With right padding and causal attention, padding never changes L_b.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from jaxinf.models import decoder
from jaxinf.models.causal_lm import DecoderLM
from jaxinf.models.lora import LoraConfig

Batch = dict


def token_nll(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """-log p(x_t | x_<t) for t = 1..T-1, padded with 0 at t = 0: shape [B, T], computed in float32 or wider.

    As logsumexp_v z_{t-1, v} - z_{t-1, x_t} over the logits z, so no [B, T, V] array of log-probabilities is
    formed (or kept for the backward pass, whose softmax is recomputed from z): one vocabulary-sized buffer fewer
    in every gradient of the loss."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    z = logits.astype(dtype)
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))  # position t predicts token t + 1 (last: unused)
    nll = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return jnp.pad(nll[:, :-1], ((0, 0), (1, 0)))


def masked_mean_nll(logits: jax.Array, batch: Batch) -> jax.Array:
    """Per-example mean NLL over `loss_mask` targets, shape [B]."""
    nll = token_nll(logits, batch["input_ids"])
    mask = batch["loss_mask"].astype(nll.dtype).at[:, 0].set(0.0)
    return (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class LMFunctions:
    """Pure functions of `trainable` (LoRA adapters, or the full params when `lora` is None).

    Frozen base weights are closed over. `rng`, when given, turns LoRA dropout on (training only).
    """

    model: Any  # a DecoderLM, or any model with the same pure `apply` (full-parameter training only)
    lora: Optional[LoraConfig] = None

    def with_base(self, base_params: Any) -> "LMFunctions":
        """The same functions with other frozen weights. Inside `jax.jit`, pass the model's params as an
        argument and call this on them: closed-over weights would be baked into the program as constants
        (slow to compile, and XLA constant-folds e.g. the transposed 49152 x 576 embedding)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, params=base_params))

    def _apply(self, trainable, batch, rng, output_hidden):
        if self.lora is None:
            return self.model.apply(trainable, batch["input_ids"], batch["attention_mask"],
                                    output_hidden=output_hidden)
        if not isinstance(self.model, DecoderLM):
            raise ValueError(f"LoRA needs a model on jaxinf's decoder; {type(self.model).__name__} is not one "
                             "(docs/models.md): use LMFunctions(model) to train every parameter")
        return self.model.apply(self.model.params, batch["input_ids"], batch["attention_mask"], adapters=trainable,
                                lora_scale=self.lora.scale, dropout=self.lora.dropout, dropout_rng=rng,
                                output_hidden=output_hidden)

    def logits(self, trainable: Any, batch: Batch, rng: Optional[jax.Array] = None) -> jax.Array:
        return self._apply(trainable, batch, rng, False)

    def logits_and_hidden(self, trainable: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return self._apply(trainable, batch, None, True)

    def per_example_loss(self, trainable: Any, batch: Batch, rng: Optional[jax.Array] = None) -> jax.Array:
        """L_b of the module docstring, [B]; over vocabulary chunks when the model sets `loss_chunk`."""
        chex.assert_equal_shape([batch["input_ids"], batch["loss_mask"]])
        chunk = getattr(self.model, "loss_chunk", None)
        if not chunk:
            return masked_mean_nll(self.logits(trainable, batch, rng), batch)
        model = self.model
        if self.lora is None:
            params, lora = trainable, {}
        else:
            params = model.params
            lora = dict(adapters=trainable, lora_scale=self.lora.scale, dropout=self.lora.dropout, dropout_rng=rng)
        hidden = model.hidden(params, batch["input_ids"], batch["attention_mask"], **lora)
        weight, tied = decoder.output_weight(model.config, params)
        mask = batch["loss_mask"][:, 1:]
        nll = decoder.token_nll_chunked(hidden[:, :-1], weight, batch["input_ids"][:, 1:], mask, chunk, tied=tied,
                                        softcap=model.config.final_softcap)  # position t predicts token t + 1
        return nll.sum(-1) / jnp.maximum(mask.astype(nll.dtype).sum(-1), 1.0)  # nll is already masked

    def loss(self, trainable: Any, batch: Batch, rng: Optional[jax.Array] = None) -> jax.Array:
        """Scalar mean of the per-example losses."""
        return self.per_example_loss(trainable, batch, rng).mean()

    def output_loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """The loss as a function of the logits only (the convex outer part for Gauss-Newton products)."""
        return masked_mean_nll(logits, batch).mean()

    def example_loss_fn(self) -> Callable[[Any, Batch], jax.Array]:
        """loss(trainable, one example) with the example's arrays of shape [T] (for vmap over examples)."""

        def single(trainable, example):
            batch = jax.tree.map(lambda x: x[None], example)
            return self.per_example_loss(trainable, batch)[0]

        return single

    def per_example_grads(self, trainable: Any, batch: Batch) -> Any:
        """Gradients of each row's loss L_b, stacked on a leading axis [B, ...] (vmap of grad)."""
        return jax.vmap(jax.grad(self.example_loss_fn()), in_axes=(None, 0))(trainable, batch)
