"""Prompt templates: turn a (prompt, response) pair into the text a model is trained on.

Every template returns ``(prompt_text, full_text)`` with ``full_text.startswith(prompt_text)``; the
special tokens (bos/eos, chat markers) are written into the text itself, so encode with
``add_special_tokens=False``.

* ``"chat"``: ``tokenizer.apply_chat_template`` on one user turn with the generation prompt, then
  ``response + eos``.
* ``"inst"``: the study's ``{bos}[INST] {prompt} [/INST] {response}{eos}`` (Llama-2 / Mistral style;
  bos/eos are whatever the tokenizer defines, empty if it defines none).
* ``"plain"``: ``prompt + "\\n"`` then ``response + eos`` (eos only if the tokenizer has one).
"""

from __future__ import annotations

TEMPLATES = ("chat", "inst", "plain")


def _special(tokenizer, name: str) -> str:
    tok = getattr(tokenizer, name, None)
    return tok if isinstance(tok, str) else ""


def format_prompt(tokenizer, prompt: str, template: str = "chat") -> str:
    """The text up to and including the last prompt token (what a model sees before answering)."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template='chat' needs a tokenizer with a chat template, but "
                f"{type(tokenizer).__name__} (name_or_path={getattr(tokenizer, 'name_or_path', '?')!r}) has "
                "none. Use template='inst' (the study's '[INST] {prompt} [/INST] {response}') or "
                "template='plain', or set tokenizer.chat_template.")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    if template == "inst":
        return f"{_special(tokenizer, 'bos_token')}[INST] {prompt} [/INST]"
    if template == "plain":
        return prompt + "\n"
    raise ValueError(f"unknown template={template!r}; choose one of {TEMPLATES}.")


def format_example(tokenizer, prompt: str, response: str, template: str = "chat") -> tuple[str, str]:
    """Return ``(prompt_text, full_text)`` where ``full_text = prompt_text + answer + eos``."""
    prompt_text = format_prompt(tokenizer, prompt, template)
    sep = " " if template == "inst" else ""
    return prompt_text, prompt_text + sep + response + _special(tokenizer, "eos_token")
