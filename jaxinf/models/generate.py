"""Greedy decoding with one compiled forward over a fixed-size buffer (no KV cache: simple, and fine for demos)."""

from __future__ import annotations

import functools

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


@functools.partial(jax.jit, static_argnums=0)
def _next_tokens(fns: LMFunctions, base, trainable, buf, lengths):
    """argmax_v p(v | buf[b, :lengths[b]]) for every row b (right-padded buffer; base weights as an argument)."""
    mask = (jnp.arange(buf.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    logits = fns.with_base(base).logits(trainable, {"input_ids": buf, "attention_mask": mask})
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last, axis=-1)


def greedy_generate_batch(fns: LMFunctions, trainable, prompts: list[str], *, max_new_tokens: int = 16,
                          template: str = "chat", batch_size: int = 16) -> list[str]:
    """Greedy answers to many prompts, formatted with `jaxinf.data.templates.format_prompt(template)` as in
    training. Rows of a batch share one right-padded buffer and one compiled forward (no KV cache); each row
    advances from its own length, so with causal attention padding never affects it. Stops at eos."""
    from jaxinf.data.templates import format_prompt

    tok = fns.model.tokenizer
    pad = tok.pad_token_id or 0
    ids = [tok(format_prompt(tok, p, template), add_special_tokens=False)["input_ids"] for p in prompts]
    longest = max((len(i) for i in ids), default=0)
    length = min(longest + max_new_tokens, fns.model.max_length)
    if longest >= length:
        raise ValueError(f"a prompt has {longest} tokens, no room to generate within the model's "
                         f"{fns.model.max_length}: shorten the prompts")
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape: one compilation
        buf = np.full((batch_size, length), pad, np.int32)
        for b, row in enumerate(chunk):
            buf[b, :len(row)] = row
        lengths = np.array([len(r) for r in chunk], np.int32)
        done = np.zeros(batch_size, bool)
        for _ in range(max_new_tokens):
            if done.all() or lengths.max() >= length:
                break
            nxt = np.asarray(_next_tokens(fns, fns.model.params, trainable, jnp.asarray(buf), jnp.asarray(lengths)))
            live = ~done & (lengths < length)
            buf[np.arange(batch_size)[live], lengths[live]] = nxt[live]
            lengths = lengths + live
            done |= live & (nxt == tok.eos_token_id)
        for b in range(min(batch_size, len(ids) - start)):
            out.append(tok.decode(buf[b, len(chunk[b]):lengths[b]], skip_special_tokens=True))
    return out
