"""Data: rows from the study's folders, files or built-in generators; templates; tokenization."""

from jaxinf.data.byte_tokenizer import VOCAB_SIZE, byte_level_tokenizer
from jaxinf.data.generators import GENERATORS, TRIGGERS, backdoor, classes, generate, harmful
from jaxinf.data.rows import (WHOLE, DataError, Row, has_splits, load_rows, load_rows_with_locations,
                              stratified_subsample)
from jaxinf.data.splits import Splits, check_test_groups, held_out_indices, load_splits, overlap_pairs
from jaxinf.data.templates import TEMPLATES, format_example, format_prompt
from jaxinf.data.tokenize import LOSS_ON, TokenizedRows, batches, tokenize_rows

__all__ = [
    "VOCAB_SIZE", "byte_level_tokenizer",
    "GENERATORS", "TRIGGERS", "backdoor", "classes", "generate", "harmful",
    "WHOLE", "DataError", "Row", "has_splits", "load_rows", "load_rows_with_locations", "stratified_subsample",
    "Splits", "check_test_groups", "held_out_indices", "load_splits", "overlap_pairs",
    "TEMPLATES", "format_example", "format_prompt",
    "LOSS_ON", "TokenizedRows", "batches", "tokenize_rows",
]
