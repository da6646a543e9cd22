"""jaxinf.models.decoder (our own decoder) against Hugging Face's PyTorch models, and its derivatives.

The references in tests/data/decoders/ come from tests/make_decoder_references.py (run with torch, in the
benchmark environment): tiny random HF models of each family, their config.json, safetensors parameter names
and float32 logits for a batch with a full, a right-padded and a left-padded row.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxinf.models import decoder as dec
from jaxinf.models import hf_weights

DATA = os.path.join(os.path.dirname(__file__), "data", "decoders")
FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2")


def _reference(family):
    with np.load(os.path.join(DATA, f"{family}.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(DATA, f"{family}.json")) as f:
        hf_config = json.load(f)
    state = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    return hf_config, state, arrays


def _model(family, dtype=None):
    hf_config, state, arrays = _reference(family)
    config = dec.from_hf_config(hf_config)
    params = hf_weights.params_from_hf_state(config, state, dtype)
    batch = jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["attention_mask"])
    return config, params, batch, arrays


def _max_err(logits, arrays):
    real = arrays["attention_mask"].astype(bool)
    ref = arrays["logits"]
    return float(np.abs(np.asarray(logits, np.float64) - ref)[real].max()), float(np.abs(ref[real]).max())


def _fwd(config, params, batch, **kw):
    return jax.jit(lambda p, ids, m: dec.forward(config, p, ids, m, **kw))(params, *batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_float32(family):
    config, params, batch, arrays = _model(family)
    logits, hidden = _fwd(config, params, batch, return_hidden=True)
    assert logits.dtype == jnp.float32 and logits.shape == arrays["logits"].shape
    err, scale = _max_err(logits, arrays)
    assert err <= 2e-5 * scale, f"{family}: max |logit error| {err:.2e} at logit scale {scale:.1f}"
    # the hidden state is the input of the output projection (and of token_nll_chunked)
    weight, tied = dec.output_weight(config, params)
    z = np.asarray(hidden) @ (np.asarray(weight).T if tied else np.asarray(weight))
    if config.final_softcap is not None:
        z = config.final_softcap * np.tanh(z / config.final_softcap)
    np.testing.assert_allclose(z, logits, rtol=1e-5, atol=1e-5 * scale)


def test_family_configs():
    """The features each reference exercises are switched on (a silently ignored field would pass trivially)."""
    cfg = {f: dec.from_hf_config(_reference(f)[0]) for f in FAMILIES}
    assert cfg["llama3"].rope_scaling_dict["rope_type"] == "llama3" and cfg["llama3"].tied_embeddings
    assert cfg["mistral"].is_local == (True, True) and cfg["mistral"].sliding_window == 5
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].head_dim * cfg["qwen3"].num_heads != cfg["qwen3"].hidden_size
    g2, g3 = cfg["gemma2"], cfg["gemma3_text"]
    assert g2.is_local == (True, False) and g2.attn_softcap == 3.0 and g2.final_softcap == 4.0
    assert g2.norm_offset == 1.0 and g2.post_norms and g2.query_scale == 24 and g2.embed_scale == np.sqrt(32)
    assert g3.is_local == (True,) * 5 + (False,) and g3.rope_local_theta == 100.0 and g3.qk_norm
    assert g3.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    qwen_sliding = {**_reference("qwen2")[0], "use_sliding_window": True, "sliding_window": 7,
                    "max_window_layers": 1, "layer_types": None}
    assert dec.from_hf_config(qwen_sliding).is_local == (False, True)
    assert dec.from_hf_config(qwen_sliding).sliding_window == 7
    assert dec.from_hf_config({**_reference("mistral")[0], "sliding_window": None}).is_local == (False, False)
    table = dec.rope_table(g3)
    np.testing.assert_allclose(table[0], 100.0 ** (-np.arange(0, 8, 2) / 8))
    np.testing.assert_allclose(table[5], 10000.0 ** (-np.arange(0, 8, 2) / 8) / 4)
    assert cfg["gpt2"].positions == "learned" and cfg["gpt2"].norm == "layer" and not cfg["gpt2"].gated_mlp


def test_gemma3_layer_pattern_and_wrapper():
    hf_config = _reference("gemma3_text")[0]
    config = dec.from_hf_config(hf_config)
    legacy = {k: v for k, v in hf_config.items() if k != "layer_types"}  # older config.json: the pattern only
    assert dec.from_hf_config(legacy).is_local == config.is_local
    assert dec.from_hf_config({**legacy, "num_hidden_layers": 12}).is_local == ((True,) * 5 + (False,)) * 2
    wrapped = {"model_type": "gemma3", "text_config": {k: v for k, v in hf_config.items() if k != "model_type"}}
    assert dec.from_hf_config(wrapped) == config


def test_unsupported_fields_raise_one_line():
    hf_config = _reference("llama")[0]
    cases = [
        ({**hf_config, "model_type": "falcon"}, "model_type"),
        ({**hf_config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({**hf_config, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        ({**hf_config, "hidden_act": "relu2"}, "hidden_act"),
        ({**hf_config, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ]
    for cfg, words in cases:
        with pytest.raises(ValueError) as info:
            dec.from_hf_config(cfg)
        assert words in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        dec.DecoderConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=4, rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_weight_mapping_errors():
    hf_config, state, _ = _reference("qwen2")
    config = dec.from_hf_config(hf_config)
    with pytest.raises(ValueError, match="not expect.*o_proj.bias"):
        hf_weights.params_from_hf_state(config, {**state, "model.layers.0.self_attn.o_proj.bias": np.zeros(32)})
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.q_proj.bias"}
    with pytest.raises(ValueError, match="lacks parameter 'model.layers.1.self_attn.q_proj.bias'"):
        hf_weights.params_from_hf_state(config, missing)


def _same_params(config, state_a, state_b):
    a = hf_weights.params_from_hf_state(config, state_a)
    b = hf_weights.params_from_hf_state(config, state_b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_weight_name_variants():
    """GPT-2's original checkpoint (no 'transformer.' prefix, causal-mask buffers) and a multimodal Gemma 3
    checkpoint (decoder under 'model.language_model.', a vision tower beside it) map like the plain ones."""
    hf_config, state, _ = _reference("gpt2")
    config = dec.from_hf_config(hf_config)
    original = {k.removeprefix("transformer."): v for k, v in state.items()}
    original.update({f"h.{i}.attn.bias": np.ones((1, 1, 8, 8), bool) for i in range(config.num_layers)})
    _same_params(config, state, original)
    hf_config, state, _ = _reference("gemma3_text")
    config = dec.from_hf_config(hf_config)
    multimodal = {"model.language_model." + k.removeprefix("model."): v for k, v in state.items()}
    multimodal["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3, 2, 2))
    multimodal["lm_head.weight"] = state["model.embed_tokens.weight"]  # a torch state_dict lists the tied head
    _same_params(config, state, multimodal)


def test_load_safetensors_folder(tmp_path):
    from safetensors.numpy import save_file

    hf_config, state, arrays = _reference("gpt2")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        hf_weights.load_safetensors_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_weights.load_safetensors_folder(str(tmp_path))
    # sharded: two files and an index, as save_pretrained writes them for large models
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    config, params = hf_weights.load_decoder(str(tmp_path))
    expected = hf_weights.params_from_hf_state(config, state)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        hf_weights.load_safetensors_folder(str(tmp_path))


def _float_dtypes(jaxpr, found):
    """Every floating dtype a jaxpr (and the jaxprs inside scan/checkpoint/... ) produces."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            dtype = getattr(v.aval, "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
                found.add(jnp.dtype(dtype).name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _float_dtypes(inner, found)
    return found


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_float64_end_to_end(family):
    with jax.enable_x64(True):
        config, params, batch, arrays = _model(family, jnp.float64)
        logits = _fwd(config, params, batch)
        assert logits.dtype == jnp.float64
        err, scale = _max_err(logits, arrays)
        assert err <= 2e-5 * scale  # the reference is float32
        jaxpr = jax.make_jaxpr(lambda p: dec.forward(config, p, *batch))(params)
        assert _float_dtypes(jaxpr.jaxpr, set()) == {"float64"}


def _primitive_dtypes(jaxpr, names, found):
    """{primitive name: dtypes of its outputs} for the primitives in `names`, inside nested jaxprs too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.setdefault(eqn.primitive.name, set()).update(jnp.dtype(v.aval.dtype).name for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitive_dtypes(inner, names, found)
    return found


def test_bfloat16_computes_softmax_norms_and_logits_in_float32():
    config, params, batch, arrays = _model("gemma3_text", jnp.bfloat16)
    logits = _fwd(config, params, batch)
    assert logits.dtype == jnp.float32
    err, scale = _max_err(logits, arrays)
    assert err <= 0.05 * scale, err
    jaxpr = jax.make_jaxpr(lambda p: dec.forward(config, p, *batch))(params)
    found = _primitive_dtypes(jaxpr.jaxpr, {"exp", "sqrt", "cos", "tanh", "dot_general"}, {})
    assert found["exp"] == found["sqrt"] == found["cos"] == {"float32"}  # softmax, norms, RoPE angles
    assert found["dot_general"] == {"bfloat16", "float32"}  # bf16 matmuls; scores and logits accumulate in f32


def test_batched_reverse_mode_equals_one_at_a_time():
    """vmap of the decoder's VJP over 40 float32 cotangents equals 40 separate VJPs (dense_matrix, query-batched
    solvers and per-example gradients rely on it). On the CPU with jax 0.10.2 this fails when the norms multiply by
    lax.rsqrt (largest difference ~190 at a gradient scale of ~350); they divide by sqrt instead."""
    config = dec.from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256))
    params = dec.init_params(config, jax.random.key(0), jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (2, 80), 0, config.vocab_size)
    mask = jnp.ones((2, 80), jnp.int32).at[1, 60:].set(0)
    out, vjp = jax.vjp(lambda p: dec.forward_hidden(config, p, ids, mask), params)
    cotangents = jax.random.normal(jax.random.key(2), (40,) + out.shape)
    flat = lambda w: ravel_pytree(vjp(w)[0])[0]  # noqa: E731
    batched = np.asarray(jax.jit(jax.vmap(flat))(cotangents))
    one = jax.jit(flat)
    for i in (0, 33):
        single = np.asarray(one(cotangents[i]))
        np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-5 * np.abs(single).max())


def _loss(config, remat):
    def loss(params, ids, mask):
        logits = dec.forward(config, params, ids, mask, remat=remat)
        nll = dec.token_nll(logits[:, :-1], ids[:, 1:], mask[:, 1:])
        return nll.sum() / mask[:, 1:].sum(), logits

    return loss


def test_remat_options_agree():
    config, params, batch, _ = _model("gemma2")  # local and global layers, soft-caps, post-norms
    results = {remat: jax.jit(jax.value_and_grad(_loss(config, remat), has_aux=True))(params, *batch)
               for remat in ("none", "layer", "dots")}
    (ref_loss, ref_logits), ref_grad = results["none"]
    for remat in ("layer", "dots"):
        (loss, logits), grad = results[remat]
        # float32: remat changes XLA's fusion, hence rounding (measured up to 2.7e-6 at logit scale ~1.6)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, ref_grad)
    with pytest.raises(ValueError, match="remat"):
        dec.forward(config, params, *batch, remat="all")


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_jvp_vjp_hvp_vmap():
    """Through forward (float64, remat="layer"): jvp matches central differences; the vjp gradient is its
    adjoint; a forward-over-reverse HVP equals forward-over-forward; vmap over examples equals the batch."""
    with jax.enable_x64(True):
        config, params, batch, _ = _model("gemma2", jnp.float64)
        ids, mask = batch
        f = lambda p: dec.forward(config, p, ids, mask, remat="layer")  # noqa: E731
        loss = lambda p: _loss(config, "layer")(p, ids, mask)[0]  # noqa: E731
        grad = lambda p: jax.vjp(loss, p)[1](jnp.ones((), jnp.float64))[0]  # noqa: E731
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(leaves))
        unit = lambda k, x: (lambda d: d / jnp.linalg.norm(d))(jax.random.normal(k, x.shape, x.dtype))  # noqa: E731
        v0 = jax.tree.unflatten(treedef, [unit(k, x) for k, x in zip(keys[::2], leaves)])
        v1 = jax.tree.unflatten(treedef, [unit(k, x) for k, x in zip(keys[1::2], leaves)])
        eps = 1e-5

        @jax.jit
        def derivatives(p, v0, v1):
            logits, jvp_logits = jax.jvp(f, (p,), (v0,))
            fd = jax.vmap(lambda s: f(jax.tree.map(lambda x, y: x + s * eps * y, p, v0)))(jnp.array([1.0, -1.0]))
            g, hv0 = jax.jvp(grad, (p,), (v0,))  # forward-over-reverse
            d_v0, v1_h_v0 = jax.jvp(lambda q: jax.jvp(loss, (q,), (v0,))[1], (p,), (v1,))  # forward-over-forward
            rows = jax.vmap(lambda i, m: dec.forward(config, p, i[None], m[None])[0])(ids, mask)
            return logits, jvp_logits, (fd[0] - fd[1]) / (2 * eps), g, hv0, d_v0, v1_h_v0, rows

        logits, jvp_logits, fd_logits, g, hv0, d_v0, v1_h_v0, rows = derivatives(params, v0, v1)
        scale = float(jnp.abs(jvp_logits).max())
        np.testing.assert_allclose(jvp_logits, fd_logits, rtol=1e-6, atol=1e-7 * scale)
        np.testing.assert_allclose(_dot(g, v0), d_v0, rtol=1e-10)
        np.testing.assert_allclose(_dot(v1, hv0), v1_h_v0, rtol=1e-9)
        real = np.asarray(mask, bool)
        np.testing.assert_allclose(np.asarray(rows)[real], np.asarray(logits)[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tied,softcap,chunk", [(True, 4.0, 48), (False, None, 128), (False, None, 20)])
def test_chunked_loss_matches_full(tied, softcap, chunk):
    """Tied ([V, H]) and untied ([H, V]) heads, a soft-cap, chunks that do and do not divide V = 128."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
    B, T, H, V = 3, 16, 32, 128
    hidden = jax.random.normal(k1, (B, T, H))
    weight = jax.random.normal(k2, (V, H) if tied else (H, V)) * 0.5
    targets = jax.random.randint(k3, (B, T), 0, V)
    mask = (jax.random.uniform(k4, (B, T)) > 0.2).astype(jnp.int32)

    def full(hidden, weight):
        logits = jnp.einsum("bth,vh->btv" if tied else "bth,hv->btv", hidden, weight)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return dec.token_nll(logits, targets, mask)

    def chunked(hidden, weight):
        return dec.token_nll_chunked(hidden, weight, targets, mask, chunk, tied=tied, softcap=softcap)

    def total(fn):
        return jax.jit(jax.value_and_grad(lambda h, w: (fn(h, w) ** 2).sum(), argnums=(0, 1)))(hidden, weight)

    np.testing.assert_allclose(jax.jit(chunked)(hidden, weight), full(hidden, weight), rtol=1e-5, atol=1e-5)
    (value, grads), (ref_value, ref_grads) = total(chunked), total(full)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_init_params_matches_param_shapes():
    for family in ("gemma2", "gpt2"):
        config = dec.from_hf_config(_reference(family)[0])
        shapes = jax.eval_shape(lambda k, c=config: dec.init_params(c, k, jnp.bfloat16), jax.random.PRNGKey(0))
        assert jax.tree.map(lambda x: tuple(x.shape), shapes) == dec.param_shapes(config)
        assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    gemma = dec.from_hf_config(_reference("gemma2")[0])
    params = jax.jit(lambda k: dec.init_params(gemma, k))(jax.random.PRNGKey(0))
    assert params["embed"].dtype == jnp.float32  # config.dtype
    np.testing.assert_array_equal(params["layers"]["attn_norm"]["scale"], 0.0)  # (1 + w): identity at w = 0
    np.testing.assert_array_equal(params["final_norm"]["scale"], 0.0)


# --------------------------------------------------------------------------------------------------------------
# LoRA adapters, taps and recorded inputs (float64: the identities hold to rounding)

LORA_SCALE = 8.0 / 4  # alpha / rank


def _per_example_nll(config, params):
    """loss_fn(hidden) -> per-example mean NLL [B] of the batch's own next tokens."""

    def loss_fn(hidden, ids, mask):
        logits = dec.project(config, params, hidden)
        nll = dec.token_nll(logits[:, :-1], ids[:, 1:], mask[:, 1:])
        return nll.sum(-1) / mask[:, 1:].sum(-1)

    return loss_fn


@pytest.mark.parametrize("family", ["gemma3_text", "gpt2"])
def test_lora_forward_equals_merged_weights(family):
    with jax.enable_x64(True):
        config, params, batch, _ = _model(family, jnp.float64)
        targets = tuple(dec.projection_dims(config))  # every projection: q/k/v/o and the MLP
        adapters = dec.init_adapters(config, jax.random.PRNGKey(3), targets, 4, jnp.float64, b_std=0.1)
        assert adapters["q_proj"]["A"].dtype == jnp.float64

        @jax.jit
        def run(params, adapters, ids, mask):
            merged = dec.merge_adapters(config, params, adapters, LORA_SCALE)
            return (dec.forward(config, params, ids, mask, adapters=adapters, lora_scale=LORA_SCALE, remat="layer"),
                    dec.forward(config, merged, ids, mask), dec.forward(config, params, ids, mask))

        lora, merged, base = run(params, adapters, *batch)
        scale = float(jnp.abs(merged).max())
        assert float(jnp.abs(lora - base).max()) > 1e-2 * scale  # the adapters do change the logits
        np.testing.assert_allclose(lora, merged, rtol=0, atol=1e-10 * scale)
        zero_b = dec.init_adapters(config, jax.random.PRNGKey(3), dtype=jnp.float64)  # PEFT init: B = 0
        assert all(float(jnp.abs(ab["B"]).max()) == 0.0 for ab in zero_b.values())
        bound = 1 / np.sqrt(config.hidden_size)
        assert 0.5 * bound < float(jnp.abs(zero_b["q_proj"]["A"]).max()) <= bound



def test_capture_gives_exact_per_example_gradients():
    """Taps and recorded inputs (under scan with remat) against plain autodiff of each example's own loss:
    kernels grad_W = sum_t a^T g, biases sum_t g, and LoRA grad_B = s (x A)^T g, grad_A = s x^T (g B^T), to 1e-10;
    the tap gradient against central differences of the loss along the tap."""
    with jax.enable_x64(True):
        config, params, batch, _ = _model("qwen2", jnp.float64)  # q/k/v biases, GQA
        ids, mask = batch
        tracked = tuple(dec.projection_dims(config))
        adapters = dec.init_adapters(config, jax.random.PRNGKey(5), ("q_proj", "v_proj", "down_proj"), 4,
                                      jnp.float64, b_std=0.1)
        loss_fn = _per_example_nll(config, params)

        def example_loss(params, adapters, ids_b, mask_b):  # one example alone: rows never interact
            hidden = dec.forward_hidden(config, params, ids_b[None], mask_b[None], adapters=adapters,
                                        lora_scale=LORA_SCALE)
            return loss_fn(hidden, ids_b[None], mask_b[None])[0]

        @jax.jit
        def run(params, adapters, ids, mask):
            captured, losses = dec.capture_projections(
                config, params, ids, mask, lambda h: loss_fn(h, ids, mask), tracked, adapters=adapters,
                lora_scale=LORA_SCALE, remat="layer")
            grads = jax.vmap(jax.grad(example_loss, argnums=(0, 1)), in_axes=(None, None, 0, 0))(
                params, adapters, ids, mask)
            return captured, losses, grads, dec.lora_grads_from_capture(captured, adapters, LORA_SCALE)

        captured, losses, (grad_params, grad_adapters), from_capture = run(params, adapters, ids, mask)
        a, g = captured["q_proj"]
        assert a.shape == (2, 3, 16, 32) and g.shape == (2, 3, 16, 32)
        assert float(jnp.abs(g).max()) > 0
        for name, key in dec.PROJECTIONS.items():
            if name not in captured:
                continue
            a, g = captured[name]
            expected = grad_params["layers"][key]["kernel"]  # [B, L, d_in, d_out]
            scale = float(jnp.abs(expected).max())
            np.testing.assert_allclose(jnp.einsum("lbti,lbto->blio", a, g), expected, rtol=0, atol=1e-10 * scale)
            if "bias" in grad_params["layers"][key]:
                np.testing.assert_allclose(g.sum(2).swapaxes(0, 1), grad_params["layers"][key]["bias"],
                                           rtol=0, atol=1e-10 * scale)
        for name in adapters:
            for m in ("A", "B"):
                expected = grad_adapters[name][m]
                scale = float(jnp.abs(expected).max())
                assert scale > 0
                np.testing.assert_allclose(from_capture[name][m], expected, rtol=0, atol=1e-10 * scale)
        # the per-example losses and the gradient of their sum along a tap direction, by central differences
        np.testing.assert_allclose(losses, jax.vmap(lambda i, m: example_loss(params, adapters, i, m))(ids, mask),
                                   rtol=1e-12)
        direction = {n: jax.random.normal(jax.random.PRNGKey(i), s, jnp.float64)
                     for i, (n, s) in enumerate(dec.tap_shapes(config, 3, 16, ("o_proj", "up_proj")).items())}

        @jax.jit
        def total(t):
            taps = {n: t * d for n, d in direction.items()}
            hidden = dec.forward_hidden(config, params, ids, mask, adapters=adapters, lora_scale=LORA_SCALE,
                                        taps=taps)
            return loss_fn(hidden, ids, mask).sum()

        eps = 1e-5
        fd = (total(eps) - total(-eps)) / (2 * eps)
        terms = [jnp.vdot(captured[n][1], d) for n, d in direction.items()]
        np.testing.assert_allclose(sum(terms), fd, rtol=0, atol=1e-8 * max(abs(float(t)) for t in terms))


def test_tap_is_added_to_the_projection_output():
    """A constant tap on q_proj's output equals adding it to q_proj's bias; recorded inputs do not depend on
    remat; record=('name',) records without taps; forward's return forms."""
    config, params, batch, _ = _model("qwen2")
    B, T = batch[0].shape
    c = jax.random.normal(jax.random.PRNGKey(0), (config.num_layers, 1, 1, 32))
    taps = {"q_proj": jnp.broadcast_to(c, (config.num_layers, B, T, 32))}
    shifted = {**params, "layers": {**params["layers"], "q": {**params["layers"]["q"],
                                                                 "bias": params["layers"]["q"]["bias"] + c[:, 0, 0]}}}
    f = jax.jit(lambda p, taps, remat: dec.forward(config, p, *batch, taps=taps, record=True, remat=remat,
                                                   return_hidden=True), static_argnums=2)
    logits, hidden, recorded = f(params, taps, "none")
    np.testing.assert_allclose(logits, dec.forward(config, shifted, *batch), rtol=1e-5, atol=1e-5)
    assert set(recorded) == {"q_proj"} and recorded["q_proj"].shape == (config.num_layers, B, T, 32)
    np.testing.assert_allclose(f(params, taps, "layer")[2]["q_proj"], recorded["q_proj"], rtol=1e-6, atol=1e-6)
    only = dec.forward(config, params, *batch, record=("down_proj",))
    assert isinstance(only, tuple) and only[1]["down_proj"].shape == (config.num_layers, B, T, 64)
    with pytest.raises(ValueError, match="record=True records the tapped"):
        dec.forward(config, params, *batch, record=True)
    with pytest.raises(ValueError, match="taps have shapes"):
        dec.forward(config, params, *batch, taps={"q_proj": jnp.zeros((config.num_layers, B, T + 1, 32))})
    with pytest.raises(ValueError, match="without lora_scale"):
        dec.forward(config, params, *batch, adapters=dec.init_adapters(config, jax.random.PRNGKey(0)))


def test_capture_coverage_check():
    config = dec.from_hf_config(_reference("qwen2")[0])
    adapters = dec.init_adapters(config, jax.random.PRNGKey(0), ("q_proj", "v_proj", "o_proj"))
    dec.check_capture_coverage(config, adapters, ("q_proj", "v_proj", "o_proj", "up_proj"))
    with pytest.raises(ValueError) as info:
        dec.check_capture_coverage(config, adapters, ("q_proj", "v_proj"))
    message = str(info.value)
    assert "'o_proj/A'" in message and "'o_proj/B'" in message and "q_proj/A" not in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="o_proj/A"):  # capture_projections checks before it traces anything
        dec.capture_projections(config, None, jnp.zeros((1, 4), jnp.int32), None, None, ("q_proj", "v_proj"),
                                adapters=adapters, lora_scale=LORA_SCALE)
    with pytest.raises(ValueError, match=r"\['q'\] that are no projection"):
        dec.check_capture_coverage(config, adapters, ("q",))
    gpt2 = dec.from_hf_config(_reference("gpt2")[0])
    with pytest.raises(ValueError, match="gate_proj"):
        dec.init_adapters(gpt2, jax.random.PRNGKey(0), ("gate_proj",))


def test_adapter_layout_conversions():
    """Stacked adapters <-> jaxinf.models.lora's flat {'model/layers/i/self_attn/q_proj': {A, B}}."""
    config = dec.from_hf_config(_reference("gemma2")[0])
    adapters = dec.init_adapters(config, jax.random.PRNGKey(0), ("q_proj", "down_proj"), rank=2, b_std=1.0)
    flat = dec.unstack_adapters(adapters)
    assert sorted(flat) == ["model/layers/0/mlp/down_proj", "model/layers/0/self_attn/q_proj",
                            "model/layers/1/mlp/down_proj", "model/layers/1/self_attn/q_proj"]
    assert flat["model/layers/1/mlp/down_proj"]["A"].shape == (config.intermediate_size, 2)
    jax.tree.map(np.testing.assert_array_equal, dec.stack_adapters(config, flat), adapters)
    with pytest.raises(ValueError, match="lack layers \\[1\\]"):
        dec.stack_adapters(config, {k: v for k, v in flat.items() if "/1/" not in k})
    with pytest.raises(ValueError, match="expected A"):
        dec.merge_adapters(config, None, {"q_proj": {"A": adapters["q_proj"]["A"][:, :3],
                                                     "B": adapters["q_proj"]["B"]}}, 1.0)
