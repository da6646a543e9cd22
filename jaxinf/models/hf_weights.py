"""Hugging Face checkpoints -> the stacked params pytree of jaxinf.models.decoder.

`params_from_hf_state(config, state)` maps the parameter names of each family's PyTorch state dict (or
safetensors file) onto the decoder's pytree: torch Linear weights [out, in] are transposed to kernels
(in, out); GPT-2's Conv1D weights are (in, out) already and its fused ``c_attn`` is split into q, k, v; Gemma's
norm weights are kept as stored (the decoder applies `norm_offset`); per-layer tensors are stacked on a leading
layer axis. Every tensor is used once: a missing one, an unexpected one (say a bias the config does not have) or
a wrong shape is an error that names it.

`load_safetensors_folder(path)` reads config.json and model.safetensors (or a sharded
model.safetensors.index.json) with the `safetensors` package into numpy; `load_decoder(path)` does both steps.

The other way, `state_from_params(config, params)` is the exact inverse of `params_from_hf_state`: the state dict
HF's ``save_pretrained`` writes for the causal LM class of the family, in float32 numpy. Llama-like families
(llama, mistral, qwen2, qwen3, gemma2, gemma3_text) are ``model.embed_tokens.weight``, ``model.norm.weight``,
``model.layers.<i>.{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, post_attention_layernorm,
pre_feedforward_layernorm, post_feedforward_layernorm, mlp.{gate,up,down}_proj}.{weight,bias}`` with Linear
weights [out, in] (the transposed kernels) and ``lm_head.weight`` [V, H] when untied. GPT-2 is
``transformer.{wte, wpe, ln_f}`` and ``transformer.h.<i>.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj}.{weight,bias}`` with Conv1D weights [in, out] (the kernels as they are) and ``c_attn`` the q, k, v
kernels side by side [H, 3H]. A tied head is not written (HF leaves it out too). `save_decoder(path, hf_config,
params)` writes it as a HF folder: config.json and model.safetensors, which `load_decoder` and HF's PyTorch
``from_pretrained`` both read.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.models import decoder as dec

# buffers some checkpoints carry that are no parameters
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class _State:
    """The checkpoint's tensors, each to be taken exactly once."""

    def __init__(self, state: Mapping[str, np.ndarray], prefix: str):
        self.state = state
        self.prefix = prefix
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state

    def take(self, name: str) -> np.ndarray:
        key = self.prefix + name
        if key not in self.state:
            raise ValueError(f"checkpoint lacks parameter {key!r}")
        self.used.add(key)
        return np.asarray(self.state[key])

    def check_all_used(self) -> None:
        """Error on tensors of the decoder (under its prefix) that the mapping left unused."""
        left = sorted(k for k in self.state if k not in self.used and not k.endswith(_IGNORED_SUFFIXES)
                      and k.startswith(self.prefix))
        if left:
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            raise ValueError(f"checkpoint has parameters the config does not expect: {left[:3]}{more}")


def _find_prefix(state: Mapping[str, np.ndarray], suffix: str) -> str:
    hits = [k[: -len(suffix)] for k in state
            if k.endswith(suffix) and (k == suffix or k[: -len(suffix)].endswith("."))]
    if not hits:
        raise ValueError(f"checkpoint has no parameter ending in {suffix!r}")
    return min(hits, key=len)


def _stack(config: dec.DecoderConfig, fn) -> np.ndarray:
    return np.stack([fn(i) for i in range(config.num_layers)])


def _llama_like(config: dec.DecoderConfig, state: Mapping[str, np.ndarray]) -> dict:
    c = config
    prefix = _find_prefix(state, "embed_tokens.weight")
    s = _State(state, prefix)
    # Gemma 2/3: post_attention_layernorm is a post-norm; the pre-MLP norm is pre_feedforward_layernorm
    gemma = c.post_norms

    def linear(name: str, bias: bool) -> dict:
        out = {"kernel": _stack(c, lambda i: s.take(f"layers.{i}.{name}.weight").T)}
        if bias:
            out["bias"] = _stack(c, lambda i: s.take(f"layers.{i}.{name}.bias"))
        return out

    def norm(name: str) -> dict:
        return {"scale": _stack(c, lambda i: s.take(f"layers.{i}.{name}.weight"))}

    layers = {
        "attn_norm": norm("input_layernorm"),
        "q": linear("self_attn.q_proj", c.qkv_bias),
        "k": linear("self_attn.k_proj", c.qkv_bias),
        "v": linear("self_attn.v_proj", c.qkv_bias),
        "o": linear("self_attn.o_proj", c.o_bias),
        "mlp_norm": norm("pre_feedforward_layernorm" if gemma else "post_attention_layernorm"),
        "gate": linear("mlp.gate_proj", c.mlp_bias),
        "up": linear("mlp.up_proj", c.mlp_bias),
        "down": linear("mlp.down_proj", c.mlp_bias),
    }
    if c.qk_norm:
        layers["q_norm"] = norm("self_attn.q_norm")
        layers["k_norm"] = norm("self_attn.k_norm")
    if gemma:
        layers["post_attn_norm"] = norm("post_attention_layernorm")
        layers["post_mlp_norm"] = norm("post_feedforward_layernorm")
    params = {"embed": s.take("embed_tokens.weight"), "layers": layers,
              "final_norm": {"scale": s.take("norm.weight")}}
    head_keys = [k for k in state if k.endswith("lm_head.weight")]
    if not c.tied_embeddings:
        if not head_keys:
            raise ValueError("checkpoint lacks parameter 'lm_head.weight' (config says the embeddings are untied)")
        params["lm_head"] = {"kernel": np.asarray(state[min(head_keys, key=len)]).T}
    # a tied checkpoint may still list lm_head.weight (a torch state_dict does): it is the embedding, unused
    s.check_all_used()
    return params


def _gpt2(config: dec.DecoderConfig, state: Mapping[str, np.ndarray]) -> dict:
    c = config
    prefix = _find_prefix(state, "wte.weight")
    s = _State(state, prefix)
    H = c.hidden_size

    def conv(name: str) -> dict:  # Conv1D: weight (in, out)
        return {"kernel": _stack(c, lambda i: s.take(f"h.{i}.{name}.weight")),
                "bias": _stack(c, lambda i: s.take(f"h.{i}.{name}.bias"))}

    def norm(name: str) -> dict:
        return {"scale": _stack(c, lambda i: s.take(f"h.{i}.{name}.weight")),
                "bias": _stack(c, lambda i: s.take(f"h.{i}.{name}.bias"))}

    fused = conv("attn.c_attn")  # [L, H, 3H]: q, k, v side by side
    if fused["kernel"].shape[-1] != 3 * H:
        raise ValueError(f"checkpoint's attn.c_attn.weight has shape {fused['kernel'].shape[1:]}, "
                         f"expected ({H}, {3 * H})")
    qkv = {name: {"kernel": fused["kernel"][..., j * H:(j + 1) * H], "bias": fused["bias"][..., j * H:(j + 1) * H]}
           for j, name in enumerate(("q", "k", "v"))}
    layers = {"attn_norm": norm("ln_1"), **qkv, "o": conv("attn.c_proj"), "mlp_norm": norm("ln_2"),
              "up": conv("mlp.c_fc"), "down": conv("mlp.c_proj")}
    params = {"embed": s.take("wte.weight"), "pos_embed": s.take("wpe.weight"), "layers": layers,
              "final_norm": {"scale": s.take("ln_f.weight"), "bias": s.take("ln_f.bias")}}
    if not c.tied_embeddings:
        if "lm_head.weight" not in state:
            raise ValueError("checkpoint lacks parameter 'lm_head.weight' (config says the embeddings are untied)")
        params["lm_head"] = {"kernel": np.asarray(state["lm_head.weight"]).T}
    s.check_all_used()
    return params


def params_from_hf_state(config: dec.DecoderConfig, state: Mapping[str, np.ndarray], dtype=None) -> dec.Params:
    """The decoder's params from a HF state dict {name: array}; `dtype` casts (default: keep the stored dtype)."""
    params = _gpt2(config, state) if config.positions == "learned" else _llama_like(config, state)
    _check_shapes(config, params, "mapped params")
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if dtype is not None else jnp.asarray(x), params)


def _check_shapes(config: dec.DecoderConfig, params, what: str) -> None:
    """Error unless `params` has exactly the leaves and shapes of `dec.param_shapes(config)`."""
    expected = dec.param_shapes(config)
    got = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=dec._is_shape)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=dec._is_shape)[0])
    if flat_expected.keys() != flat_got.keys():
        raise ValueError(f"{what} {sorted(map(jax.tree_util.keystr, flat_got))} differ from the config's "
                         f"{sorted(map(jax.tree_util.keystr, flat_expected))}")
    for path, shape in flat_expected.items():
        if flat_got[path] != shape:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape {flat_got[path]}, the config "
                             f"expects {shape}")


def load_safetensors_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {name: numpy array}) from a HF model folder, sharded or not (no torch)."""
    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json at {config_path}")
    with open(config_path) as f:
        hf_config = json.load(f)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"neither {single} nor {index} exists")
    state: dict[str, np.ndarray] = {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"safetensors shard {file} (listed in {index}) does not exist")
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return hf_config, state


def load_decoder(path: str, dtype=None) -> tuple[dec.DecoderConfig, dec.Params]:
    """DecoderConfig and params of a HF model folder (config.json + safetensors)."""
    hf_config, state = load_safetensors_folder(path)
    config = dec.from_hf_config(hf_config)
    return config, params_from_hf_state(config, state, dtype)


# --------------------------------------------------------------------------------------------------------------
# Writing: the inverse of params_from_hf_state

# (HF name under model.layers.<i>., params key under "layers"); gemma's mlp_norm / post-norms are set below
_LLAMA_NORMS = (("input_layernorm", "attn_norm"), ("self_attn.q_norm", "q_norm"), ("self_attn.k_norm", "k_norm"))
_LLAMA_LINEARS = (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                  ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                  ("mlp.down_proj", "down"))


def state_from_params(config: dec.DecoderConfig, params: dec.Params) -> dict[str, np.ndarray]:
    """The HF state dict {name: float32 array} of the decoder's params (layout: the module docstring)."""
    _check_shapes(config, params, "params")
    c = config
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    layers = p["layers"]
    state: dict[str, np.ndarray] = {}

    def per_layer(name: str, stacked: np.ndarray, transpose: bool = False) -> None:
        for i in range(c.num_layers):
            state[name.format(i)] = stacked[i].T if transpose else stacked[i]

    if c.positions == "learned":  # GPT-2: Conv1D weights [in, out], c_attn = [q | k | v]
        c_attn = {k: np.concatenate([layers[n][k] for n in ("q", "k", "v")], axis=-1) for k in ("kernel", "bias")}
        modules = {"ln_1": layers["attn_norm"], "attn.c_attn": c_attn, "attn.c_proj": layers["o"],
                   "ln_2": layers["mlp_norm"], "mlp.c_fc": layers["up"], "mlp.c_proj": layers["down"]}
        for name, m in modules.items():
            per_layer(f"transformer.h.{{}}.{name}.weight", m["kernel"] if "kernel" in m else m["scale"])
            per_layer(f"transformer.h.{{}}.{name}.bias", m["bias"])
        state.update({"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
                      "transformer.ln_f.weight": p["final_norm"]["scale"],
                      "transformer.ln_f.bias": p["final_norm"]["bias"]})
    else:  # llama-like: torch Linear weights [out, in]
        norms = list(_LLAMA_NORMS)
        if c.post_norms:  # Gemma 2/3: post_attention_layernorm is a post-norm
            norms += [("pre_feedforward_layernorm", "mlp_norm"), ("post_attention_layernorm", "post_attn_norm"),
                      ("post_feedforward_layernorm", "post_mlp_norm")]
        else:
            norms.append(("post_attention_layernorm", "mlp_norm"))
        for name, key in norms:
            if key in layers:
                per_layer(f"model.layers.{{}}.{name}.weight", layers[key]["scale"])
        for name, key in _LLAMA_LINEARS:
            if key in layers:
                per_layer(f"model.layers.{{}}.{name}.weight", layers[key]["kernel"], transpose=True)
                if "bias" in layers[key]:
                    per_layer(f"model.layers.{{}}.{name}.bias", layers[key]["bias"])
        state.update({"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]})
    if not c.tied_embeddings:
        state["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def save_decoder(path: str, hf_config: Mapping, params: dec.Params) -> None:
    """Write a HF model folder: `hf_config` as config.json, the params as model.safetensors (float32).

    The config is the one the params belong to (`dec.from_hf_config(hf_config)`), so `load_decoder(path)` gives
    them back exactly and HF's PyTorch class of the family loads the same weights. No tokenizer is written."""
    from safetensors.numpy import save_file

    if hf_config.get("model_type") == "gemma3":
        raise ValueError("save_decoder writes causal LMs: give Gemma 3's text config (model_type 'gemma3_text'), "
                         "not the multimodal 'gemma3' wrapper")
    state = state_from_params(dec.from_hf_config(hf_config), params)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
