"""A tiny offline byte-level tokenizer for tests and toy models.

Token ids 0..255 are the raw bytes (GPT-2 byte-to-unicode symbols, id == byte value, no merges),
followed by the special tokens in ``SPECIAL_TOKENS`` order (ids 256..260), so ``len(tok) == 261``
on every machine. bos = ``<s>``, eos = ``</s>``, pad = ``<pad>``; the chat template is ChatML.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (index == byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Return a fresh byte-level ``PreTrainedTokenizerFast`` (vocab size ``VOCAB_SIZE`` = 261)."""
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHATML_TEMPLATE)
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok
