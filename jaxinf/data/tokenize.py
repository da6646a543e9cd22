r"""Tokenize rows into padded numpy arrays with a next-token loss mask.

How prompt and response are split: each row is formatted by ``templates.format_example`` into
``(prompt_text, full_text)`` and ``full_text`` is tokenized ONCE (``add_special_tokens=False``: the
template already wrote bos/eos/chat markers) with character offsets. The prompt tokens are the
leading tokens whose start offset lies inside ``prompt_text``, so they are a prefix of the row by
construction and the model sees exactly the training string the study used (tokenizing the two parts
apart would add a spurious "▁" token after ``[/INST]`` with SentencePiece tokenizers). If a token
straddles the boundary (a BPE merge across it, e.g. ``"assistant\n"`` + a response starting with
``"\n\n"`` in byte-level BPE), that row instead gets ``tokens(prompt_text) + tokens(rest)``, so no
response character is counted as prompt and the prompt tokens are those of ``prompt_text`` alone, as
at generation time (tests check this prefix property on a byte-level BPE with merges). This needs a
fast (Rust) tokenizer for the offsets.

Conventions: RIGHT padding to the longest row (capped at ``max_length``) with ``pad_token_id`` (or
eos id when there is no pad token). ``loss_mask[i, t] = 1`` iff token ``t`` is a target predicted
from tokens ``< t`` (so ``loss_mask[:, 0] == 0``):

* ``loss_on="response"``: the response tokens, eos included;
* ``loss_on="all"``: every real token after the first (prompt and response);
* ``loss_on="all_with_padding"``: every position after the first, padding included — what the
  study's released code did (it trained with ``labels = input_ids`` over the padded batch).

Rows longer than ``max_length`` lose their response end (one warning counts them); a row whose
prompt alone fills ``max_length`` is an error, and so are (one line naming the row, the field and the fix)
an empty response and, when ``context`` (the model's context length) is given and ``max_length`` exceeds
it, a row longer than ``context``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxinf.data.rows import DataError
from jaxinf.data.templates import format_example

LOSS_ON = ("response", "all", "all_with_padding")
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TokenizedRows:
    """Padded token arrays for N rows of length T."""
    input_ids: np.ndarray       # int32 [N, T]
    attention_mask: np.ndarray  # int32 [N, T], 1 = real token
    loss_mask: np.ndarray       # float32 [N, T], 1 = target token
    prompt_end: np.ndarray      # int32 [N], index of the last prompt token
    groups: np.ndarray          # str [N], the rows' groups

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, indices) -> "TokenizedRows":
        """The rows at ``indices`` (same T)."""
        idx = np.asarray(indices)
        return TokenizedRows(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def _prompt_token_count(offsets, boundary: int) -> int:
    n = 0
    while n < len(offsets) and offsets[n][0] < boundary:
        n += 1
    return n


def tokenize_rows(tokenizer, rows: Sequence[dict], *, max_length: int, template: str = "chat",
                  loss_on: str = "response", context: Optional[int] = None,
                  locations: Optional[Sequence[str]] = None) -> TokenizedRows:
    """Tokenize ``rows`` (``{"prompt", "response", "group"}``) with ``template``; see the module doc.

    ``context``: the model's context length; a row longer than it (possible only when ``max_length >
    context``) is a DataError. ``locations``: where each row came from (``file:line``), for messages.
    """
    def at(i):
        return locations[i] if locations is not None else f"row {i}"

    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown loss_on={loss_on!r}; choose one of {LOSS_ON}.")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}.")
    if not rows:
        raise ValueError("tokenize_rows got no rows.")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; tokenize_rows needs "
                         "offset mappings. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token.")

    seqs, n_prompts, n_truncated = [], [], 0
    for i, row in enumerate(rows):
        if not row["response"].strip():
            raise DataError(f"{at(i)}: the response (--response_column) is empty, so row {i} has nothing to "
                            "learn or attribute; fill it in or drop the row.")
        prompt_text, full_text = format_example(tokenizer, row["prompt"], row["response"], template)
        enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        n_prompt = _prompt_token_count(offsets, len(prompt_text))
        if n_prompt and offsets[n_prompt - 1][1] > len(prompt_text):  # a token straddles the boundary
            head = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            ids = head + tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
            n_prompt = len(head)
        if n_prompt == 0 or n_prompt == len(ids):
            part = "prompt" if n_prompt == 0 else "response"
            field = "--prompt_column" if n_prompt == 0 else "--response_column"
            raise DataError(f"{at(i)}: the {part} ({field}) has no tokens of its own after --template={template}; "
                            "give it text or drop the row.")
        if context is not None and max_length > context and len(ids) > context:
            raise DataError(f"{at(i)}: the row is {len(ids)} tokens after --template={template}, longer than the "
                            f"model's context of {context}; pass --max_length={context} (truncates the response end) "
                            "or shorten the row's prompt/response.")
        if len(ids) > max_length:
            if n_prompt >= max_length:
                raise DataError(f"{at(i)}: its formatted prompt (--prompt_column) is {n_prompt} tokens, so "
                                f"--max_length={max_length} would cut every response token; raise --max_length "
                                f"above {n_prompt} or shorten/drop this row.")
            ids, n_truncated = ids[:max_length], n_truncated + 1
        seqs.append(ids)
        n_prompts.append(n_prompt)
    if n_truncated:
        warnings.warn(f"{n_truncated} of {len(rows)} rows were longer than max_length={max_length} tokens "
                      "and were truncated from the right (response end, eos lost).", stacklevel=2)

    n, t = len(seqs), max(len(s) for s in seqs)
    input_ids = np.full((n, t), pad_id, np.int32)
    attention_mask = np.zeros((n, t), np.int32)
    loss_mask = np.zeros((n, t), np.float32)
    for i, (ids, n_prompt) in enumerate(zip(seqs, n_prompts)):
        input_ids[i, :len(ids)] = ids
        attention_mask[i, :len(ids)] = 1
        start, stop = {"response": (n_prompt, len(ids)), "all": (1, len(ids)),
                       "all_with_padding": (1, t)}[loss_on]
        loss_mask[i, start:stop] = 1.0
    return TokenizedRows(input_ids, attention_mask, loss_mask,
                         np.asarray(n_prompts, np.int32) - 1, np.asarray([r["group"] for r in rows], str))


def batches(tokenized: TokenizedRows, batch_size: int, *, indices=None,
            keys: Sequence[str] = BATCH_KEYS) -> Iterator[dict]:
    """Consecutive batches (the last may be partial) of ``tokenized`` rows, in ``indices`` order if
    given; each a dict of numpy arrays under ``keys`` (any TokenizedRows field, e.g. add
    ``"prompt_end"``)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    idx = np.arange(len(tokenized)) if indices is None else np.asarray(indices, dtype=np.int64)
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        yield {k: getattr(tokenized, k)[b] for k in keys}
