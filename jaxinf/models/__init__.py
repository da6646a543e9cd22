"""Causal LMs on jaxinf's own decoder, LoRA adapters, and pure loss functions."""

from jaxinf.models.causal_lm import DecoderLM, position_ids_from_mask
from jaxinf.models.lora import LoraConfig, init_adapters, merge_adapters, target_shapes
from jaxinf.models.loss import LMFunctions, masked_mean_nll, token_nll
from jaxinf.models.registry import DEFAULT_MODEL, MODEL_NAMES, load_model, param_count
