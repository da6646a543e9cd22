"""Causal LMs behind one interface, LoRA adapters, and pure loss functions."""

from jaxinf.models.causal_lm import CausalLM, DecoderLM, position_ids_from_mask
from jaxinf.models.lora import LoraConfig, init_adapters, lora_interceptor, merge_adapters, target_shapes
from jaxinf.models.loss import LMFunctions, masked_mean_nll, token_nll
from jaxinf.models.registry import DEFAULT_MODEL, MODEL_NAMES, load_model, param_count
