"""Greedy decoding with one compiled forward over a fixed-size buffer (no KV cache: simple, and fine for demos)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.models.loss import LMFunctions


def greedy_generate(fns: LMFunctions, trainable, prompt: str, *, max_new_tokens: int = 48,
                    chat: bool = True) -> str:
    """The model's greedy continuation of `prompt` (wrapped in the chat template if `chat`), up to eos."""
    tok = fns.model.tokenizer
    text = (tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            if chat else prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    length = min(len(ids) + max_new_tokens, fns.model.max_length)
    buf = np.full((1, length), tok.pad_token_id or 0, np.int32)
    buf[0, :len(ids)] = ids
    # the base weights enter as an argument: closed over, XLA would bake them in as constants (see with_base)
    logits_fn = jax.jit(lambda base, t, input_ids, mask: fns.with_base(base).logits(
        t, {"input_ids": input_ids, "attention_mask": mask}))
    n = len(ids)
    while n < length:
        mask = (np.arange(length) < n).astype(np.int32)[None]
        nxt = int(jnp.argmax(logits_fn(fns.model.params, trainable, jnp.asarray(buf), jnp.asarray(mask))[0, n - 1]))
        buf[0, n] = nxt
        n += 1
        if nxt == tok.eos_token_id:
            break
    return tok.decode(buf[0, len(ids):n], skip_special_tokens=True)
