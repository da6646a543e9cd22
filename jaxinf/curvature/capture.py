"""Layer capture: the inputs a and output cotangents g of the linear layers of a linen model.

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

Mechanism: ``flax.linen.intercept_methods``. An interceptor on every ``__call__`` recognises the chosen linear
layers by module path, records the input a, and adds a zero perturbation e to the output (y + e); the gradient
of J with respect to e is the output cotangent g. The recorded inputs leave the traced function as auxiliary
outputs of ``jax.grad`` with respect to the perturbations, so ``capture`` is a pure, jit-able function. (This is
what ``Module.sow`` + ``Module.perturb`` do with mutable collections; ``CausalLM.apply`` passes only the
"params" collection, so the interceptor carries the perturbations itself.)

Layers handled:
  * ``nn.Dense``: kernel stored [d_in, d_out] (Llama, Mistral, any linen model).
  * HF GPT-2's ``FlaxConv1D``: kernel stored TRANSPOSED, [d_out, d_in]; its gradient is grad_n^T.
  * LoRA adapters (y += s * x A B, s = alpha / r, ``jaxinf.models.lora``), two linear layers each:
        "<p>/A":  input x [.., d_in] -> output h = x A [.., r],       g = dJ/dh
        "<p>/B":  input h [.., r]    -> output z = h B [.., d_out],   g = dJ/dz = s * dJ/dy.
    Capture runs adapters without dropout: curvature is that of the deterministic model.

A ``Layer`` names where its weight (and bias) live in the trainable pytree and converts between that pytree and
the layer's gradient-shaped matrix [d_in (+1), d_out] (kernel rows first, bias last row), the form in which
K-FAC factors act (``Layer.matrix`` / ``layers_to_tree``).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxinf.curvature._tree import TreeSpec

if TYPE_CHECKING:
    from jaxinf.models.loss import LMFunctions


def _default_loss():
    """masked_mean_nll, imported on use (jaxinf.curvature does not import the model stack, i.e. transformers)."""
    from jaxinf.models.loss import masked_mean_nll

    return masked_mean_nll

PyTree = Any
Interceptor = Callable[..., Any]

DENSE, CONV1D, LORA_A, LORA_B = "dense", "conv1d", "lora_a", "lora_b"
# linen module class name -> layer kind (kernel layout)
_MODULE_KINDS = {"Dense": DENSE, "FlaxConv1D": CONV1D}


@dataclasses.dataclass(frozen=True)
class Layer:
    """A linear layer: where its parameters live in the trainable pytree, and its gradient-matrix shape.

    name:    "model/layers/0/self_attn/q_proj" (a module path), or "<adapter path>/A" | "/B" for LoRA.
    module:  the linen module path whose ``__call__`` computes it (the adapted module for LoRA; the projection
             name, e.g. "q_proj", on jaxinf's decoder).
    kind:    "dense" | "conv1d" (kernel stored [d_out, d_in]) | "lora_a" | "lora_b".
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

    @property
    def transposed(self) -> bool:
        return self.kind == CONV1D

    def matrix(self, tree: PyTree) -> jax.Array:
        """The layer's parameters (or a parameter-shaped vector) as one [rows, d_out] matrix."""
        flat = traverse_util.flatten_dict(tree)
        w = flat[self.kernel] if self.index is None else flat[self.kernel][self.index]
        w = w.T if self.transposed else w
        if self.bias is None:
            return w
        b = flat[self.bias] if self.index is None else flat[self.bias][self.index]
        return jnp.concatenate([w, b[None, :].astype(w.dtype)], axis=0)

    def matrix_batched(self, tree: PyTree) -> jax.Array:
        """As ``matrix`` for a stack of vectors (leaves with a leading axis Q): [Q, rows, d_out]."""
        flat = traverse_util.flatten_dict(tree)
        w = flat[self.kernel] if self.index is None else flat[self.kernel][:, self.index]
        w = jnp.swapaxes(w, 1, 2) if self.transposed else w
        if self.bias is None:
            return w
        b = flat[self.bias] if self.index is None else flat[self.bias][:, self.index]
        return jnp.concatenate([w, b[:, None, :].astype(w.dtype)], axis=1)

    def leaves(self, m: jax.Array) -> dict:
        """{key path: leaf} from a [..., rows, d_out] matrix (inverse of ``matrix`` / ``matrix_batched``)."""
        w = m[..., : self.d_in, :]
        out = {self.kernel: jnp.swapaxes(w, -1, -2) if self.transposed else w}
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
# Interceptors.


def _module_path(context) -> str:
    return "/".join(str(p) for p in context.module.path)


def _as_tokens(x: jax.Array) -> jax.Array:
    """[B, ..., d] -> [B, T, d] (T = product of the middle axes, 1 for rank-2 inputs)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _with_bias_column(x: jax.Array, has_bias: bool) -> jax.Array:
    if not has_bias:
        return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


class _Recorder:
    """Per-call store of captured inputs and (for the shape pass) outputs; raises on a layer called twice."""

    def __init__(self, perturbs: Optional[dict]):
        self.perturbs = perturbs
        self.inputs: dict = {}
        self.outputs: dict = {}

    def __call__(self, layer: Layer, x: jax.Array, y: jax.Array) -> jax.Array:
        if layer.name in self.inputs:
            raise ValueError(f"layer {layer.name!r} was called twice in one forward pass; capture needs each "
                             "captured linear layer to be applied once (weight sharing is not supported)")
        self.inputs[layer.name] = _with_bias_column(_as_tokens(x.astype(y.dtype)), layer.bias is not None)
        if self.perturbs is None:  # shape pass
            self.outputs[layer.name] = y
            return y
        return y + self.perturbs[layer.name].astype(y.dtype)


def _linear_interceptor(layers: Sequence[Layer], record: _Recorder) -> Interceptor:
    by_module = {layer.module: layer for layer in layers}

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        layer = by_module.get(_module_path(context))
        if layer is None:
            return next_fun(*args, **kwargs)
        kind = _MODULE_KINDS.get(type(context.module).__name__)
        if kind != layer.kind:
            raise ValueError(f"layer {layer.name!r} is declared {layer.kind!r} but its module is "
                             f"{type(context.module).__name__}")
        y = next_fun(*args, **kwargs)
        return record(layer, args[0], y)

    return intercept


def _lora_capture_interceptor(layers: Sequence[Layer], adapters: dict, scale: float, record: _Recorder):
    """The LoRA interceptor of ``jaxinf.models.lora`` (dropout off) with the adapters exposed as two layers."""
    by_module: dict = {}
    for layer in layers:
        by_module.setdefault(layer.module, {})[layer.kind] = layer

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = _module_path(context)
        if path not in adapters:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        ab, chosen = adapters[path], by_module.get(path, {})
        x = args[0].astype(ab["A"].dtype)
        h = x @ ab["A"]
        if LORA_A in chosen:
            h = record(chosen[LORA_A], x, h)
        z = h @ ab["B"]
        if LORA_B in chosen:
            z = record(chosen[LORA_B], h, z)
        return y + (scale * z).astype(y.dtype)

    return intercept


# ----------------------------------------------------------------------------------------------------------------
# Capture for any linen model.

# run(interceptors) -> per-example losses [B]: runs the model with the given interceptors active.
RunFn = Callable[[Sequence[Interceptor]], jax.Array]


def _capture(run: RunFn, make_interceptor: Callable[[_Recorder], Interceptor]):
    def shape_pass():
        rec = _Recorder(None)
        run((make_interceptor(rec),))
        return rec.outputs

    out_shapes = jax.eval_shape(shape_pass)
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in out_shapes.items()}

    def forward(perturbs):
        rec = _Recorder(perturbs)
        losses = run((make_interceptor(rec),))
        if losses.ndim != 1:
            raise ValueError(f"the run function must return per-example losses [B], got shape {losses.shape}")
        return losses.sum(), (losses, rec.inputs)

    cot, (losses, inputs) = jax.grad(forward, has_aux=True)(zeros)
    captured = {name: (inputs[name], _as_tokens(cot[name])) for name in inputs}
    return captured, losses


def capture_linen(run: RunFn, layers: Sequence[Layer]) -> tuple[dict, jax.Array]:
    """Capture (a, g) of ``layers`` (Dense / FlaxConv1D modules) of any linen model.

    ``run(interceptors)`` must apply the model with the interceptors active (e.g. inside
    ``nn.intercept_methods``, or ``CausalLM.apply(..., interceptors=...)``) and return the per-example losses [B].
    Returns ({layer name: (a [B, T, rows], g [B, T, d_out])}, losses [B]) with g the cotangent of losses.sum().
    """
    return _capture(run, lambda rec: _linear_interceptor(layers, rec))


def run_under(apply_fn: Callable[[], jax.Array]) -> RunFn:
    """A ``RunFn`` for a plain linen call: ``run_under(lambda: loss(module.apply(vars, x)))``."""

    def run(interceptors):
        def nest(icpts):
            if not icpts:
                return apply_fn()
            with nn.intercept_methods(icpts[0]):
                return nest(icpts[1:])

        return nest(list(interceptors))

    return run


def discover_layers(run: RunFn, trainable: PyTree) -> tuple[Layer, ...]:
    """Every linear layer (Dense / FlaxConv1D) that the forward pass calls and whose kernel is in ``trainable``.

    Layers come in call order. Kernels in ``trainable`` of unsupported module types raise; kernels never used by
    the forward pass (e.g. an untied head that is not called) are skipped.
    """
    flat = traverse_util.flatten_dict(trainable)
    kernels = {"/".join(k[:-1]): k for k in flat if k[-1] == "kernel" and flat[k].ndim == 2}
    found: dict = {}

    def intercept(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = _module_path(context)
            if path in kernels and path not in found:
                found[path] = type(context.module).__name__
        return next_fun(*args, **kwargs)

    jax.eval_shape(lambda: run((intercept,)))
    layers = []
    for path, cls in found.items():
        if cls not in _MODULE_KINDS:
            raise ValueError(f"module {path!r} of type {cls} has a kernel but is not a supported linear layer "
                             f"({sorted(_MODULE_KINDS)}); pass `layers=` without it")
        kind, kernel = _MODULE_KINDS[cls], kernels[path]
        bias = kernel[:-1] + ("bias",)
        d0, d1 = flat[kernel].shape
        d_in, d_out = (d1, d0) if kind == CONV1D else (d0, d1)
        layers.append(Layer(path, path, kind, kernel, bias if bias in flat else None, int(d_in), int(d_out)))
    return tuple(layers)


# ----------------------------------------------------------------------------------------------------------------
# Capture for jaxinf causal LMs (LMFunctions).

LossFn = Callable[[jax.Array, dict], jax.Array]  # (logits [B, T, V], batch) -> per-example losses [B]


def lora_layers(adapters: dict) -> tuple[Layer, ...]:
    """Two layers per adapter: "<p>/A" [d_in -> r] and "<p>/B" [r -> d_out]."""
    layers = []
    for path, ab in adapters.items():
        (d_in, r), (_, d_out) = ab["A"].shape, ab["B"].shape
        layers.append(Layer(f"{path}/A", path, LORA_A, (path, "A"), None, int(d_in), int(r)))
        layers.append(Layer(f"{path}/B", path, LORA_B, (path, "B"), None, int(r), int(d_out)))
    return tuple(layers)


def _lm_run(fns: LMFunctions, params, batch, loss: LossFn, extra: Sequence[Interceptor] = ()) -> RunFn:
    def run(interceptors):
        logits = fns.model.apply(params, batch["input_ids"], batch["attention_mask"],
                                 interceptors=tuple(interceptors) + tuple(extra))
        return loss(logits, batch)

    return run


_DISCOVERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # fns -> {TreeSpec: layers}


def _is_decoder(fns: LMFunctions) -> bool:
    from jaxinf.models.causal_lm import DecoderLM

    return isinstance(fns.model, DecoderLM)


def lm_layers(fns: LMFunctions, trainable: PyTree) -> tuple[Layer, ...]:
    """All linear layers of the trainable pytree: the LoRA A/B pairs, or every Dense/FlaxConv1D kernel.

    Full-parameter layers are discovered by one abstract forward pass, cached per (fns, parameter shapes).
    """
    if fns.lora is not None:
        return lora_layers(trainable)
    if _is_decoder(fns):
        return _decoder_layers(fns.model.config, trainable)
    spec = TreeSpec.of(trainable)
    cached = _DISCOVERED.setdefault(fns, {})
    if spec not in cached:
        dummy = {"input_ids": jnp.zeros((1, 2), jnp.int32), "attention_mask": jnp.ones((1, 2), jnp.int32),
                 "loss_mask": jnp.ones((1, 2), jnp.float32)}
        cached[spec] = discover_layers(_lm_run(fns, trainable, dummy, _default_loss()), trainable)
    return cached[spec]


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
    loss = _default_loss() if loss is None else loss
    if _is_decoder(fns):
        if fns.lora is None:
            return _decoder_capture(fns, trainable, batch, layers, loss)
        return _decoder_lora_capture(fns, trainable, batch, layers, loss, fns.model.params if base is None else base)
    if fns.lora is None:
        return capture_linen(_lm_run(fns, trainable, batch, loss), layers)
    run = _lm_run(fns, fns.model.params if base is None else base, batch, loss)
    return _capture(run, lambda rec: _lora_capture_interceptor(layers, trainable, fns.lora.scale, rec))


def _decoder_layers(config, params: PyTree) -> tuple[Layer, ...]:
    """Every per-layer projection of jaxinf's decoder whose kernel is in ``params``: one Layer per (layer,
    projection), a slice of the stacked kernel [L, d_in, d_out] (and bias [L, d_out]), in call order. The
    embedding, norms and output head are not linear layers of the decoder's helper and are not captured."""
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
    if not layers:
        raise ValueError("the trainable params hold no projection kernel of the decoder (params['layers'][...]"
                         "['kernel']): nothing to capture")
    return tuple(layers)


def _decoder_capture(fns: LMFunctions, params: PyTree, batch: dict, layers: Sequence[Layer], loss: LossFn):
    """Full-parameter capture on jaxinf's decoder: the zero taps of the chosen projections give (x, g) for every
    layer at once ([L, B, T, d]), and each Layer takes its slice (with the bias column when it has a bias)."""
    from jaxinf.models import decoder

    config = fns.model.config
    tracked = tuple(dict.fromkeys(layer.module for layer in layers))

    def losses_of(hidden):
        return loss(decoder.project(config, params, hidden), batch)

    captured, losses = decoder.capture_projections(config, params, batch["input_ids"], batch["attention_mask"],
                                                   losses_of, tracked, remat=fns.model.remat)
    out = {}
    for layer in layers:
        x, g = captured[layer.module]
        a = x[layer.index].astype(g.dtype)
        out[layer.name] = (_with_bias_column(_as_tokens(a), layer.bias is not None), _as_tokens(g[layer.index]))
    return out, losses


def _decoder_lora_capture(fns: LMFunctions, adapters: dict, batch: dict, layers: Sequence[Layer], loss: LossFn,
                          base: PyTree) -> tuple[dict, jax.Array]:
    """LoRA capture on jaxinf's decoder, from its zero taps: one (x, g_y) per adapted projection and layer, with x
    the projection's input and g_y = dJ/dy the cotangent of its output y = x W + s (x A) B, give

        "<p>/A": input x,      g = dJ/d(xA) = s g_y B^T
        "<p>/B": input h = xA, g = dJ/d(hB) = s g_y

    the same (a, g) as the interceptor path for Flax models (adapters without dropout)."""
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
    [d_in, d_out] layout; transpose for FlaxConv1D). ``layers``: None for all layers of ``trainable`` (see
    ``lm_layers``), or Layer objects / names. ``base``: LoRA base weights to use instead of the closed-over
    ``fns.model.params`` (pass them when jitting, see ``base_params``).
    """
    chosen = select_layers(lm_layers(fns, trainable), layers)
    return capture_with_losses(fns, trainable, batch, chosen, loss, base)[0]


def per_example_layer_grads(captured: dict, layers: Sequence[Layer]) -> list:
    """[B, rows, d_out] per-example gradient matrices from a capture, formula (1)."""
    return [jnp.einsum("bti,bto->bio", *captured[layer.name]) for layer in layers]
