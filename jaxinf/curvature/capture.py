"""Layer capture: the inputs a and output cotangents g of the linear layers of a causal LM on jaxinf's decoder.

For a linear layer y = a W (+ b) with W: [d_in, d_out], run on a batch of B examples whose per-example losses are
L_1..L_B, capture returns for every position (n, t) of the batch

    a[n, t] = the layer input, with a trailing 1 appended when the layer has a bias     [d_in (+1)]
    g[n, t] = dJ/dy[n, t] for J = sum_n L_n   (the SUM over examples, not the mean)   [d_out]

Rows of a batch do not interact (eval mode), so dJ/dy[n, t] = dL_n/dy[n, t] and the gradient of example n's own
loss L_n with respect to [W; b] is exactly

    grad_n = sum_t a[n, t] g[n, t]^T            = einsum('bti,bto->bio', a, g)            (1)

and the gradient of the batch-mean loss is (1/B) sum_n grad_n. Positions with attention_mask == 0 are returned as
they are: with causal attention their g is zero, and the covariance statistics (``jaxinf.curvature.kfac``)
exclude them through the attention mask. Inputs of rank > 2 are flattened to [B, T, d] (all axes between the
first and the last are "tokens"); an input of rank 2 is one token per example (T = 1).

Mechanism: jaxinf's decoder (``jaxinf.models.decoder``) sends every per-layer projection through one helper that
adds a zero "tap" to its output and records its input; the gradient of J with respect to the taps is g
(``decoder.capture_projections``). One pass captures every layer of the stack, [L, B, T, d] per projection, and each
``Layer`` takes its slice. Layers handled:
  * the decoder's projections (q/k/v/o, gate/up/down), kernels stacked [L, d_in, d_out] (+ bias [L, d_out]);
  * an untied output head "lm_head" [H, V] (a = the final hidden state, g = dJ/dlogits before any soft-cap);
    a head tied to the embedding is not a linear layer of its own and is not captured;
  * LoRA adapters (y += s * x A B, s = alpha / r, ``jaxinf.models.lora``), two linear layers each:
        "<p>/A":  input x [.., d_in] -> output h = x A [.., r],       g = dJ/dh = s * dJ/dy B^T
        "<p>/B":  input h [.., r]    -> output z = h B [.., d_out],   g = dJ/dz = s * dJ/dy.
    Capture runs adapters without dropout: curvature is that of the deterministic model.

A ``Layer`` names where its weight (and bias) live in the trainable pytree and converts between that pytree and
the layer's gradient-shaped matrix [d_in (+1), d_out] (kernel rows first, bias last row), the form in which
K-FAC factors act (``Layer.matrix`` / ``layers_to_tree``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

if TYPE_CHECKING:
    from jaxinf.models.loss import LMFunctions


def _default_loss():
    """masked_mean_nll, imported on use (jaxinf.curvature does not import the model stack, i.e. transformers)."""
    from jaxinf.models.loss import masked_mean_nll

    return masked_mean_nll

PyTree = Any

DENSE, LORA_A, LORA_B = "dense", "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A linear layer: where its parameters live in the trainable pytree, and its gradient-matrix shape.

    name:    "model/layers/0/self_attn/q_proj" (a module path), "lm_head", or "<adapter path>/A" | "/B" for LoRA.
    module:  the decoder projection that computes it ("q_proj", ..., "lm_head"; the adapted module path for LoRA).
    kind:    "dense" | "lora_a" | "lora_b".
    kernel:  key path of the weight leaf in the trainable pytree; bias: key path of the bias leaf or None.
    d_in, d_out: the layer maps [.., d_in] -> [.., d_out]; its gradient matrix is [rows, d_out],
             rows = d_in + 1 with a bias (the bias gradient is the last row).
    index, stack: for a kernel stacked over layers ([stack, d_in, d_out], jaxinf's decoder), this layer's slice
             ``index`` of it; None for a kernel of its own.
    """

    name: str
    module: str
    kind: str
    kernel: tuple
    bias: Optional[tuple]
    d_in: int
    d_out: int
    index: Optional[int] = None
    stack: Optional[int] = None

    @property
    def rows(self) -> int:
        return self.d_in + (self.bias is not None)

    @property
    def size(self) -> int:
        return self.rows * self.d_out

    def matrix(self, tree: PyTree) -> jax.Array:
        """The layer's parameters (or a parameter-shaped vector) as one [rows, d_out] matrix."""
        flat = traverse_util.flatten_dict(tree)
        w = flat[self.kernel] if self.index is None else flat[self.kernel][self.index]
        if self.bias is None:
            return w
        b = flat[self.bias] if self.index is None else flat[self.bias][self.index]
        return jnp.concatenate([w, b[None, :].astype(w.dtype)], axis=0)

    def matrix_batched(self, tree: PyTree) -> jax.Array:
        """As ``matrix`` for a stack of vectors (leaves with a leading axis Q): [Q, rows, d_out]."""
        flat = traverse_util.flatten_dict(tree)
        w = flat[self.kernel] if self.index is None else flat[self.kernel][:, self.index]
        if self.bias is None:
            return w
        b = flat[self.bias] if self.index is None else flat[self.bias][:, self.index]
        return jnp.concatenate([w, b[:, None, :].astype(w.dtype)], axis=1)

    def leaves(self, m: jax.Array) -> dict:
        """{key path: leaf} from a [..., rows, d_out] matrix (inverse of ``matrix`` / ``matrix_batched``)."""
        out = {self.kernel: m[..., : self.d_in, :]}
        if self.bias is not None:
            out[self.bias] = m[..., self.d_in, :]
        return out


def restrict(tree: PyTree, layers: Sequence[Layer]) -> PyTree:
    """The sub-pytree of ``tree`` holding only the given layers' leaves (same nesting, same key paths)."""
    flat = traverse_util.flatten_dict(tree)
    keys = [k for layer in layers for k in (layer.kernel, layer.bias) if k is not None]
    return traverse_util.unflatten_dict({k: flat[k] for k in keys})


def layers_to_tree(layers: Sequence[Layer], matrices: Sequence[jax.Array], like: Optional[PyTree] = None) -> PyTree:
    """Pytree (restricted to ``layers``) from per-layer [..., rows, d_out] matrices; leaves cast to ``like``'s
    dtypes. Slices of a stacked kernel are stacked back on axis -3 ([..., stack, d_in, d_out]), with zeros for
    the slices of layers not given (so the tree has ``restrict``'s shapes)."""
    flat, stacked = {}, {}
    for layer, m in zip(layers, matrices):
        for key, leaf in layer.leaves(m).items():
            if layer.index is None:
                flat[key] = leaf
            else:
                stacked.setdefault(key, (layer.stack, {}))[1][layer.index] = leaf
    for key, (n, slices) in stacked.items():
        some = next(iter(slices.values()))
        axis = -3 if key[-1] == "kernel" else -2  # kernel slices [..., d_in, d_out], bias slices [..., d_out]
        flat[key] = jnp.stack([slices.get(i, jnp.zeros_like(some)) for i in range(n)], axis=axis)
    if like is not None:
        ref = traverse_util.flatten_dict(like)
        flat = {k: v.astype(ref[k].dtype) for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------------
# Capture for jaxinf causal LMs (LMFunctions over a DecoderLM).

LossFn = Callable[[jax.Array, dict], jax.Array]  # (logits [B, T, V], batch) -> per-example losses [B]


def _as_tokens(x: jax.Array) -> jax.Array:
    """[B, ..., d] -> [B, T, d] (T = product of the middle axes, 1 for rank-2 inputs)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _with_bias_column(x: jax.Array, has_bias: bool) -> jax.Array:
    if not has_bias:
        return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def lora_layers(adapters: dict) -> tuple[Layer, ...]:
    """Two layers per adapter: "<p>/A" [d_in -> r] and "<p>/B" [r -> d_out]."""
    layers = []
    for path, ab in adapters.items():
        (d_in, r), (_, d_out) = ab["A"].shape, ab["B"].shape
        layers.append(Layer(f"{path}/A", path, LORA_A, (path, "A"), None, int(d_in), int(r)))
        layers.append(Layer(f"{path}/B", path, LORA_B, (path, "B"), None, int(r), int(d_out)))
    return tuple(layers)


def _check_decoder(fns: LMFunctions) -> None:
    from jaxinf.models.causal_lm import DecoderLM

    if not isinstance(fns.model, DecoderLM):
        raise ValueError(f"model {getattr(fns.model, 'name', type(fns.model).__name__)!r} is not on jaxinf's decoder: "
                         "layer capture (K-FAC, EK-FAC) goes through the decoder's taps (jaxinf.models.decoder); "
                         "with a model of your own use the gradient-only methods (docs/models.md)")


def lm_layers(fns: LMFunctions, trainable: PyTree) -> tuple[Layer, ...]:
    """All linear layers of the trainable pytree: the LoRA A/B pairs, or every projection kernel of the decoder
    (and its untied output head), in call order."""
    _check_decoder(fns)
    if fns.lora is not None:
        return lora_layers(trainable)
    return _decoder_layers(fns.model.config, trainable)


def select_layers(all_layers: Sequence[Layer], layers=None) -> tuple[Layer, ...]:
    """``layers``: None (all), or a sequence of Layer objects / layer names (in any order; kept in model order)."""
    if layers is None:
        return tuple(all_layers)
    names = {l.name if isinstance(l, Layer) else str(l) for l in layers}
    unknown = names - {l.name for l in all_layers}
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; available: {[l.name for l in all_layers]}")
    return tuple(l for l in all_layers if l.name in names)


def base_params(fns: LMFunctions) -> Optional[PyTree]:
    """The frozen base weights a LoRA capture needs (None for full-parameter training).

    Pass them as an argument of jitted functions (``capture_with_losses(..., base=...)``): closed over, they
    would be baked into the compiled program as constants (slow to compile, memory doubled for real models).
    """
    return None if fns.lora is None else fns.model.params


def capture_with_losses(fns: LMFunctions, trainable: PyTree, batch: dict, layers: Sequence[Layer],
                        loss: Optional[LossFn] = None, base: Optional[PyTree] = None) -> tuple[dict, jax.Array]:
    """As ``capture``, also returning the per-example losses [B] (``layers`` must be Layer objects).

    ``base``: the frozen base weights for LoRA (default ``fns.model.params``; see ``base_params``).
    """
    _check_decoder(fns)
    loss = _default_loss() if loss is None else loss
    if fns.lora is None:
        return _decoder_capture(fns, trainable, batch, layers, loss)
    return _decoder_lora_capture(fns, trainable, batch, layers, loss, fns.model.params if base is None else base)


def _decoder_layers(config, params: PyTree) -> tuple[Layer, ...]:
    """Every per-layer projection of jaxinf's decoder whose kernel is in ``params``: one Layer per (layer,
    projection), a slice of the stacked kernel [L, d_in, d_out] (and bias [L, d_out]), in call order; then the
    untied output head "lm_head" [H, V] when it is in ``params``. The embedding (and a head tied to it) and the
    norms are not linear layers and are not captured."""
    from jaxinf.models import decoder

    stack = params.get("layers", {}) if isinstance(params, dict) else {}
    layers = []
    for i in range(config.num_layers):
        for name, key in decoder.PROJECTIONS.items():
            if key not in stack or "kernel" not in stack[key]:
                continue
            _, d_in, d_out = stack[key]["kernel"].shape
            bias = ("layers", key, "bias") if "bias" in stack[key] else None
            layers.append(Layer(decoder.module_path(name, i), name, DENSE, ("layers", key, "kernel"), bias,
                                int(d_in), int(d_out), index=i, stack=config.num_layers))
    head = params.get(decoder.HEAD, {}) if isinstance(params, dict) else {}
    if "kernel" in head and not config.tied_embeddings:
        d_in, d_out = head["kernel"].shape
        layers.append(Layer(decoder.HEAD, decoder.HEAD, DENSE, (decoder.HEAD, "kernel"), None, int(d_in), int(d_out)))
    if not layers:
        raise ValueError("the trainable params hold no projection kernel of the decoder (params['layers'][...]"
                         "['kernel']) and no untied lm_head: nothing to capture")
    return tuple(layers)


def _decoder_capture(fns: LMFunctions, params: PyTree, batch: dict, layers: Sequence[Layer], loss: LossFn):
    """Full-parameter capture on jaxinf's decoder: the zero taps of the chosen projections give (x, g) for every
    layer at once ([L, B, T, d]), and each Layer takes its slice (with the bias column when it has a bias); the
    head's tap gives (final hidden state, dJ/dlogits)."""
    from jaxinf.models import decoder

    config = fns.model.config
    tracked = tuple(dict.fromkeys(layer.module for layer in layers))

    def losses_of(hidden, head_tap=None):
        return loss(decoder.project(config, params, hidden, tap=head_tap), batch)

    captured, losses = decoder.capture_projections(config, params, batch["input_ids"], batch["attention_mask"],
                                                   losses_of, tracked, remat=fns.model.remat)
    out = {}
    for layer in layers:
        x, g = captured[layer.module]
        if layer.index is not None:
            x, g = x[layer.index], g[layer.index]
        out[layer.name] = (_with_bias_column(_as_tokens(x.astype(g.dtype)), layer.bias is not None), _as_tokens(g))
    return out, losses


def _decoder_lora_capture(fns: LMFunctions, adapters: dict, batch: dict, layers: Sequence[Layer], loss: LossFn,
                          base: PyTree) -> tuple[dict, jax.Array]:
    """LoRA capture on jaxinf's decoder, from its zero taps: one (x, g_y) per adapted projection and layer, with x
    the projection's input and g_y = dJ/dy the cotangent of its output y = x W + s (x A) B, give

        "<p>/A": input x,      g = dJ/d(xA) = s g_y B^T
        "<p>/B": input h = xA, g = dJ/d(hB) = s g_y

    (adapters without dropout)."""
    from jaxinf.models import decoder

    model, scale = fns.model, fns.lora.scale
    config = model.config
    stacked = decoder.stack_adapters(config, adapters)
    tracked = tuple(stacked)
    wanted = {layer.name for layer in layers}

    def losses_of(hidden):
        return loss(decoder.project(config, base, hidden), batch)

    captured, losses = decoder.capture_projections(
        config, base, batch["input_ids"], batch["attention_mask"], losses_of, tracked, adapters=stacked,
        lora_scale=scale, remat=model.remat)
    out = {}
    for name, (x, g_y) in captured.items():
        ab = stacked[name]
        for i in range(config.num_layers):
            path = decoder.module_path(name, i)
            a_i, b_i = ab["A"][i], ab["B"][i]
            x_i = x[i].astype(a_i.dtype)
            g_i = g_y[i].astype(a_i.dtype)
            if f"{path}/A" in wanted:
                out[f"{path}/A"] = (_as_tokens(x_i), _as_tokens(scale * g_i @ b_i.T))
            if f"{path}/B" in wanted:
                out[f"{path}/B"] = (_as_tokens(x_i @ a_i), _as_tokens(scale * g_i))
    missing = wanted - set(out)
    if missing:
        raise ValueError(f"layers {sorted(missing)} are not LoRA layers of the adapters {sorted(adapters)[:3]}...")
    return out, losses


def capture(fns: LMFunctions, trainable: PyTree, batch: dict, layers=None, *,
            loss: Optional[LossFn] = None, base: Optional[PyTree] = None) -> dict:
    """{layer name: (a [B, T, d_in (+1)], g [B, T, d_out])} for a causal LM's linear layers (pure, jit-able).

    ``g`` is the cotangent of J = sum_b L_b, the SUM over the batch of the per-example losses
    ``loss(logits, batch)`` (default: ``masked_mean_nll``, the mean NLL over each row's targets), so
    einsum('bti,bto->bio', a, g) is exactly the per-example gradient of L_b for the layer's [W; b] (W in
    [d_in, d_out] layout). ``layers``: None for all layers of ``trainable`` (see
    ``lm_layers``), or Layer objects / names. ``base``: LoRA base weights to use instead of the closed-over
    ``fns.model.params`` (pass them when jitting, see ``base_params``).
    """
    chosen = select_layers(lm_layers(fns, trainable), layers)
    return capture_with_losses(fns, trainable, batch, chosen, loss, base)[0]


def per_example_layer_grads(captured: dict, layers: Sequence[Layer]) -> list:
    """[B, rows, d_out] per-example gradient matrices from a capture, formula (1)."""
    return [jnp.einsum("bti,bto->bio", *captured[layer.name]) for layer in layers]
