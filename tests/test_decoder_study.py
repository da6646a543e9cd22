"""The study on jaxinf's own decoder (`DecoderLM`): Qwen, Gemma and Llama 3.x models through `load_model`, LoRA,
capture for K-FAC / EK-FAC, and `run_study` end to end.

The decoder's forward pass is checked against Hugging Face in tests/test_decoder.py; here the question is whether
everything the study builds on it (adapters, per-example gradients, captured a and g) is exact.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxinf.curvature import capture as cap
from jaxinf.models import LoraConfig, init_adapters, load_model, merge_adapters
from jaxinf.models.causal_lm import DecoderLM
from jaxinf.models.loss import LMFunctions

DECODER_DATA = os.path.join(os.path.dirname(__file__), "data", "decoders")
TINY_DECODERS = ("tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3")


def _batch(tokenizer, texts=("hello there, how are you", "a b c", "the backdoor trigger")):
    tok = tokenizer(list(texts), padding="max_length", max_length=32)
    ids, mask = jnp.asarray(tok["input_ids"]), jnp.asarray(tok["attention_mask"])
    loss_mask = np.asarray(mask, np.float64).copy()
    loss_mask[:, :3] = 0.0  # the first tokens are "prompt"
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": jnp.asarray(loss_mask)}


@pytest.mark.parametrize("name", TINY_DECODERS)
def test_tiny_decoders_load_by_name(name):
    model = load_model(name)
    assert isinstance(model, DecoderLM) and model.max_length == 256
    batch = _batch(model.tokenizer)
    logits = LMFunctions(model).logits(model.params, batch)
    assert logits.shape == batch["input_ids"].shape + (model.config.vocab_size,)
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma3"])
def test_decoder_lora_equals_merged_weights_and_capture_equals_per_example_gradients(name):
    """float64: (1) adapters applied on the fly give the logits of W + s A B merged into the weights; (2) the
    K-FAC capture through the decoder's zero taps gives each row's exact adapter gradient as sum_t a_t g_t^T,
    for A and B of every adapted projection (attention and MLP)."""
    with jax.enable_x64(True):
        model = load_model(name, dtype=jnp.float64)
        lora = LoraConfig(targets=("q_proj", "v_proj", "down_proj"))
        fns = LMFunctions(model, lora)
        adapters = init_adapters(jax.random.key(1), model, lora, b_std=0.3)
        batch = _batch(model.tokenizer)

        adapted = fns.logits(adapters, batch)
        merged = LMFunctions(model).logits(merge_adapters(model, adapters, lora), batch)
        base = LMFunctions(model).logits(model.params, batch)
        assert adapted.dtype == jnp.float64
        np.testing.assert_allclose(adapted, merged, rtol=1e-10, atol=1e-12)
        assert float(jnp.abs(adapted - base).max()) > 1e-3  # the adapters change the output

        layers = cap.lm_layers(fns, adapters)
        assert len(layers) == 2 * 3 * model.config.num_layers
        captured = cap.capture(fns, adapters, batch)
        per_example = cap.per_example_layer_grads(captured, layers)
        exact = traverse_util.flatten_dict(fns.per_example_grads(adapters, batch))
        for layer, grads in zip(layers, per_example):
            ref = exact[layer.kernel]
            assert float(jnp.abs(ref).max()) > 0
            np.testing.assert_allclose(grads, ref, rtol=1e-9, atol=1e-12 * float(jnp.abs(ref).max()),
                                       err_msg=layer.name)


def test_decoder_lora_dropout_is_seeded_and_leaves_the_base_path_alone():
    """LoRA dropout acts on the adapters' input only: with B = 0 (PEFT's initialisation) any key gives the base
    model's loss; with B != 0 the same key gives the same loss and another key another; no key, no dropout."""
    model = load_model("tiny-gemma3")
    lora = LoraConfig(dropout=0.5)
    fns, batch = LMFunctions(model, lora), _batch(model.tokenizer)
    fresh = init_adapters(jax.random.key(0), model, lora)
    base = float(LMFunctions(model).loss(model.params, batch))
    assert float(fns.loss(fresh, batch, jax.random.key(3))) == pytest.approx(base, rel=1e-6)
    adapters = init_adapters(jax.random.key(0), model, lora, b_std=0.5)
    plain = float(fns.loss(adapters, batch))
    one, again = (float(fns.loss(adapters, batch, jax.random.key(3))) for _ in range(2))
    other = float(fns.loss(adapters, batch, jax.random.key(4)))
    no_dropout = float(LMFunctions(model, LoraConfig(dropout=0.0)).loss(adapters, batch, jax.random.key(3)))
    assert one == again and one != other and one != plain and no_dropout == pytest.approx(plain, rel=1e-6)


def test_full_parameter_capture_on_the_decoder_slices_the_stacked_kernels():
    """float64, base weights trainable: one Layer per (layer, projection), a slice of the stacked kernel (and
    bias: Qwen2's q/k/v), plus the untied head, whose captured sum_t a_t g_t^T is each row's exact gradient; layers_to_tree puts the
    slices back where restrict() finds them (zeros for slices not chosen)."""
    with jax.enable_x64(True):
        model = load_model("tiny-qwen2", dtype=jnp.float64)
        fns, batch = LMFunctions(model), _batch(model.tokenizer)
        layers = cap.lm_layers(fns, model.params)
        assert len(layers) == 7 * model.config.num_layers + 1 and layers[0].name == "model/layers/0/self_attn/q_proj"
        assert layers[-1].name == "lm_head" and layers[-1].index is None  # Qwen2's untied head
        assert [l.bias is not None for l in layers[:4]] == [True, True, True, False]  # q/k/v biases, o without
        captured = cap.capture(fns, model.params, batch)
        exact = fns.per_example_grads(model.params, batch)
        for layer, grads in zip(layers, cap.per_example_layer_grads(captured, layers)):
            ref = layer.matrix_batched(exact)
            np.testing.assert_allclose(grads, ref, rtol=1e-9, atol=1e-12 * float(jnp.abs(ref).max()),
                                       err_msg=layer.name)
        chosen = [l for l in layers if l.index == 1]
        tree = cap.layers_to_tree(chosen, [l.matrix(model.params) for l in chosen],
                                  like=cap.restrict(model.params, chosen))
        kernel = tree["layers"]["q"]["kernel"]
        assert kernel.shape == model.params["layers"]["q"]["kernel"].shape
        np.testing.assert_array_equal(kernel[1], model.params["layers"]["q"]["kernel"][1])
        np.testing.assert_array_equal(kernel[0], 0.0)


def _write_reference_folder(family, folder):
    """A local HF folder (config.json, model.safetensors, tokenizer) from tests/data/decoders/<family>."""
    from safetensors.numpy import save_file

    from jaxinf.data.byte_tokenizer import byte_level_tokenizer

    with np.load(os.path.join(DECODER_DATA, f"{family}.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(DECODER_DATA, f"{family}.json")) as f:
        config = json.load(f)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k[len("param/"):]: np.ascontiguousarray(v) for k, v in arrays.items() if k.startswith("param/")}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    byte_level_tokenizer().save_pretrained(folder)
    return config, arrays


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma3_text"])
def test_local_folders_of_decoder_families_load_and_match_hugging_face(tmp_path, family):
    """A Llama 3.x folder (llama3 rope_scaling, which Flax Llama would ignore), a Qwen2 and a Gemma 3 folder load
    into the decoder through load_model and give Hugging Face PyTorch's logits (golden files)."""
    _, arrays = _write_reference_folder(family, tmp_path / family)
    model = load_model(str(tmp_path / family))
    assert isinstance(model, DecoderLM) and model.name == family
    logits = model.apply(model.params, jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["attention_mask"]))
    real = arrays["attention_mask"].astype(bool)
    ref = arrays["logits"]
    err = float(np.abs(np.asarray(logits, np.float64) - ref)[real].max())
    assert err <= 2e-5 * float(np.abs(ref[real]).max()), err


def test_local_folder_with_an_unimplemented_field_is_refused_naming_the_file(tmp_path):
    config, _ = _write_reference_folder("llama3", tmp_path / "yarn")
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with open(tmp_path / "yarn" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"yarn/config.json: .*rope_scaling type 'yarn' is not supported"):
        load_model(str(tmp_path / "yarn"))
    config["model_type"] = "opt"
    with open(tmp_path / "yarn" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"yarn/config.json: model_type 'opt' is not supported"):
        load_model(str(tmp_path / "yarn"))


@pytest.mark.parametrize("name", ["tiny-gemma3", pytest.param("tiny-qwen3", marks=pytest.mark.slow)])
def test_the_study_runs_on_the_decoder(tmp_path, name):
    """run_study in-process on a Gemma 3 / Qwen3 geometry: every method family (gradient, Krylov, K-FAC/EK-FAC,
    DataInf, RepSim) scores, the Krylov solves agree with the exact inverse, and trajectory influence runs."""
    from jaxinf import api

    methods = ("grad_dot", "datainf", "exact", "cg", "lanczos", "kfac", "ekfac", "repsim")
    # every stage's backward pass (fine-tuning, gradients, capture, the trajectory adjoint) under per-layer remat
    run = api.run_study(str(tmp_path / name), model=name, data="backdoor", limit_train=12, limit_test=4, epochs=2,
                        methods=",".join(methods), report_queries=1, bootstrap=20, ground_truth="trajectory",
                        gt_queries=2, remat="layer")
    results = run.results
    assert results["model"] == name and results["n_train"] == 12
    assert sorted(results["methods"]) == sorted(methods)
    assert all("error" not in d for d in results["methods"].values()), results["methods"]
    for m in ("cg", "lanczos"):
        assert results["methods"][m]["vs_exact"]["spearman"] > 0.99, (m, results["methods"][m]["vs_exact"])
    assert "trajectory" in results["ground_truth"]
    assert os.path.exists(tmp_path / name / "report.html")


def test_remat_reaches_the_decoder():
    from jaxinf import pipeline

    model = pipeline.load_study_model(pipeline.StudyConfig(model="tiny-qwen2", remat="dots"))
    assert isinstance(model, DecoderLM) and model.remat == "dots"
    with pytest.raises(ValueError, match="remat='all': choose none, layer or dots"):
        pipeline.StudyConfig(model="tiny-qwen2", remat="all").validate()
