"""K-FAC and EK-FAC factors of a causal LM's Fisher, per linear layer, fitted in resumable stages.

References: Martens & Grosse 2015 (K-FAC), George et al. 2018 (EK-FAC), Grosse et al. 2023 (influence functions
for LLMs).

The matrix approximated. For a linear layer l with per-example gradient G_n = sum_t a_nt g_nt^T
([rows, d_out], ``capture.py``; rows = d_in + 1 with a bias), the Fisher block of the training objective
(1/N) sum_n L_n over N examples is

    F_l = (1/N) sum_n vec(G_n) vec(G_n)^T,            vec = row-major ravel of the [rows, d_out] matrix,

with the labels in L_n chosen by ``fisher``:
  * "empirical": the data labels; F_l is the empirical-Fisher block (as ``fisher_operator``, ``woodbury``).
                 Note its scale: with per-example losses that average K_n target NLLs it is roughly 1/K_n times
                 the Gauss-Newton block below, so compare dampings with care.
  * "true":      labels y_k ~ p_theta(. | x_<k) drawn per target with an explicit key, and the pseudo-loss
                     L~_n = (1/sqrt(K_n)) sum_k -log p_theta(y_k | x_<k)        (K_n targets in row n),
                 so E_y[grad L~_n grad L~_n^T] = (1/K_n) sum_k J_k^T H_k J_k, the Gauss-Newton block of the
                 mean-over-targets loss L_n (cross-target terms vanish in expectation). ``num_samples`` draws
                 per example are averaged.

K-FAC (tokens independent, a independent of g):

    F_l ~ A (x) S,   A = (1/N_tok) sum_{n,t real} a_nt a_nt^T,   S = (1/N) sum_n sum_{t real} g_nt g_nt^T,

N_tok the number of counted tokens (``token_mask``: real tokens, attention_mask == 1, plus padding positions whose
next token carries loss, as under loss_on="all_with_padding"; real tokens whose g is zero count), N
the number of examples (times ``num_samples``). With this normalisation
A (x) S = (1/N) sum_n sum_t (a_nt a_nt^T) (x) (g_nt g_nt^T) exactly when a is the same at every token, so
A (x) S = F_l exactly when also each example has a single real token: one example with one token, or any N with a
constant layer input. (x) is ``np.kron``; (A (x) S) vec(V) = vec(A V S).

Eigendecomposition, in float64 (numpy on the host, or jnp on a GPU):
A = Q_A diag(lambda_A) Q_A^T, S = Q_S diag(lambda_S) Q_S^T.
  * K-FAC eigenvalues:   Lambda[i, o] = lambda_A[i] * lambda_S[o].
  * EK-FAC correction:   Lambda[i, o] = (1/N) sum_n (Q_A^T G_n Q_S)[i, o]^2, the exact diagonal of F_l in the
    Kronecker eigenbasis (same labels / keys as the covariance pass). EK-FAC equals F_l when F_l is diagonal in
    that basis: in the two exact cases above (for one example with one token, Q_A^T G Q_S has a single nonzero
    entry). One example with several tokens is NOT such a case in general: G = sum_t a_t g_t^T need not be a
    single entry in the eigenbasis of A and S, so F_l = vec(G) vec(G)^T is not diagonal there.
The damped inverse is then (Q_A (x) Q_S) diag(1 / (Lambda + lambda_l)) (Q_A (x) Q_S)^T (``jaxinf.ihvp.ekfac``).

Stages (as kronfluence): covariance -> eigendecomposition -> eigenvalue correction. With a ``directory`` each
stage is cached there; the two data passes go over the deterministic list of batches and checkpoint their running
sums and the next batch index every ``checkpoint_every`` batches (npz, written atomically), so an interrupted fit
resumes where its last checkpoint left off and ends with bit-identical factors. The true-Fisher labels of batch i
use ``fold_in(fold_in(key, i), sample)``, independent of where the fit was resumed. A directory is tied to one fit
(a fingerprint of layers, options, key, batches and parameters); reusing it for another raises.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import sharding
from jaxinf.workdir import guard, load_npz, write_json, write_npz
from jaxinf.curvature.capture import Layer, base_params, capture_with_losses, lm_layers, select_layers

if TYPE_CHECKING:
    from jaxinf.models.loss import LMFunctions

PyTree = Any
EMPIRICAL, TRUE = "empirical", "true"
_FORMAT = 1


class FitInterrupted(RuntimeError):
    """Raised by ``fit_factors(..., stop_after=k)`` after k batch passes, as a crash there would (tests/resume)."""


@dataclasses.dataclass
class KFACFactors:
    """Fitted per-layer factors (numpy float64), in ``layers`` order.

    a_eig / s_eig: (eigenvalues ascending, eigenvectors as columns) of A [rows, rows] and S [d_out, d_out]
    (normalisation above); corrected: EK-FAC eigenvalues [rows, d_out] per layer, or None when the correction pass
    was not run. num_examples counts label draws (N * num_samples); num_tokens real tokens. Only the eigenpairs
    are kept (half the memory of keeping the covariances beside them): `a_cov` / `s_cov` rebuild A and S as
    Q diag(lambda) Q^T, equal to the accumulated covariances to float64 rounding.
    """

    layers: tuple
    fisher: str
    num_examples: int
    num_tokens: int
    a_eig: list
    s_eig: list
    corrected: Optional[list]
    param_dtype: str

    @property
    def a_cov(self) -> list:
        return [(q * w) @ q.T for w, q in self.a_eig]

    @property
    def s_cov(self) -> list:
        return [(q * w) @ q.T for w, q in self.s_eig]

    def kfac_eigenvalues(self, i: int) -> np.ndarray:
        """Lambda = lambda_A lambda_S^T for layer i ([rows, d_out])."""
        return np.outer(self.a_eig[i][0], self.s_eig[i][0])


# ----------------------------------------------------------------------------------------------------------------
# Losses.


def sampled_pseudo_loss(key: jax.Array):
    """(logits, batch) -> [B]: (1/sqrt(K_n)) sum_k -log p(y_k) with y_k ~ softmax(logits) at every target k."""

    from jaxinf.models.loss import token_nll

    def loss(logits, batch):
        wide = jnp.promote_types(logits.dtype, jnp.float32)
        logp = jax.nn.log_softmax(jax.lax.stop_gradient(logits[:, :-1]).astype(wide), axis=-1)
        labels = jax.random.categorical(key, logp, axis=-1).astype(batch["input_ids"].dtype)
        labels = jnp.pad(labels, ((0, 0), (1, 0)))
        nll = token_nll(logits, labels)
        mask = batch["loss_mask"].astype(nll.dtype).at[:, 0].set(0.0)
        return (nll * mask).sum(-1) / jnp.sqrt(jnp.maximum(mask.sum(-1), 1.0))

    return loss


def _labels_loss(fisher: str, key, batch_index, sample: int):
    """The loss whose gradients define the Fisher: the data NLL, or the sampled pseudo-loss of draw `sample`."""
    if fisher == EMPIRICAL:
        from jaxinf.models.loss import masked_mean_nll

        return masked_mean_nll
    return sampled_pseudo_loss(jax.random.fold_in(jax.random.fold_in(key, batch_index), sample))


def token_mask(batch) -> jax.Array:
    """[B, T] bool: positions whose activations and output gradients enter A and S: real tokens, and any position
    t whose next token t + 1 carries loss (padding under loss_on="all_with_padding" has a nonzero gradient)."""
    real = jnp.asarray(batch["attention_mask"]) > 0
    loss = jnp.asarray(batch["loss_mask"]) > 0
    feeds_loss = jnp.concatenate([loss[:, 1:], jnp.zeros_like(loss[:, :1])], axis=1)
    return real | feeds_loss


def _pads_carry_loss(batches) -> bool:
    return any(bool(np.any(np.asarray(token_mask(b)) & (np.asarray(b["attention_mask"]) == 0))) for b in batches)


def _acc_dtype(trainable) -> Any:
    return jnp.promote_types(jax.tree.leaves(trainable)[0].dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# One batch of each data pass (jitted; functions and layers static).


def _over_samples(num_samples, first, rest, init):
    """first(init) for draw 0, then lax.scan of rest(carry, s) over draws 1..num_samples-1 (one traced copy)."""
    carry = first(init)
    if num_samples > 1:
        carry, _ = jax.lax.scan(lambda c, s: (rest(c, s), None), carry, jnp.arange(1, num_samples))
    return carry


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _covariance_step(fns, layers, fisher, num_samples, trainable, base, batch, key, index, sums):
    """sums + (sum over real tokens of a a^T, of g g^T) per layer; S summed over the label draws."""
    acc = _acc_dtype(trainable)
    mask = token_mask(batch).astype(acc)[..., None]

    def add_s(sums, s):
        cap, _ = capture_with_losses(fns, trainable, batch, layers, _labels_loss(fisher, key, index, s), base)
        return tuple((a_sum, s_sum + jnp.einsum("bto,btp->op", (g * mask).astype(g.dtype), g,
                                                preferred_element_type=acc))
                     for (a_sum, s_sum), (_, g) in zip(sums, (cap[l.name] for l in layers)))

    def first(sums):  # the layer inputs do not depend on the labels: A from draw 0 only
        cap, _ = capture_with_losses(fns, trainable, batch, layers, _labels_loss(fisher, key, index, 0), base)
        out = []
        for (a_sum, s_sum), layer in zip(sums, layers):
            a, g = cap[layer.name]
            out.append((a_sum + jnp.einsum("bti,btj->ij", (a * mask).astype(a.dtype), a, preferred_element_type=acc),
                        s_sum + jnp.einsum("bto,btp->op", (g * mask).astype(g.dtype), g, preferred_element_type=acc)))
        return tuple(out)

    return _over_samples(num_samples, first, add_s, sums)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _correction_step(fns, layers, fisher, num_samples, trainable, base, batch, key, index, bases, sums):
    """sums + sum_n (Q_A^T G_n Q_S)^2 per layer, G_n = sum_t a_nt g_nt^T (no masking: exact per-example grads)."""
    acc = _acc_dtype(trainable)

    def add(sums, s):
        cap, _ = capture_with_losses(fns, trainable, batch, layers, _labels_loss(fisher, key, index, s), base)
        out = []
        for lam, layer, (qa, qs) in zip(sums, layers, bases):
            a, g = cap[layer.name]
            ra = jnp.einsum("bti,ij->btj", a.astype(acc), qa)
            rg = jnp.einsum("bto,op->btp", g.astype(acc), qs)
            rot = jnp.einsum("bti,bto->bio", ra, rg)
            out.append(lam + jnp.sum(rot * rot, axis=0))
        return tuple(out)

    return _over_samples(num_samples, lambda c: add(c, 0), add, sums)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files.


def _fingerprint(layers, fisher, num_samples, key, batches, trainable) -> str:
    h = hashlib.sha1()
    meta = {"format": _FORMAT, "fisher": fisher, "num_samples": num_samples, "num_batches": len(batches),
            "layers": [dataclasses.astuple(l) for l in layers]}
    if _pads_carry_loss(batches):  # factors cached before padding with loss was counted must not be reused
        meta["token_mask"] = "attention_or_next_loss"
    h.update(json.dumps(meta, default=str).encode())
    if key is not None and fisher == TRUE:
        h.update(np.asarray(jax.random.key_data(key)).tobytes())
    for b in batches:
        for k in sorted(b):
            x = np.asarray(b[k])
            h.update(f"{k}{x.shape}{x.dtype}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
    for leaf in jax.tree.leaves(trainable):
        x = np.asarray(leaf)
        h.update(f"{x.shape}{x.dtype}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


class _Store:
    """Directory of one fit: manifest.json (fingerprint) + one npz per stage; a no-op without a directory."""

    def __init__(self, directory: Optional[str], fingerprint: str):
        self.directory = directory
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        # the fingerprint hashes the batches, parameters, layers and options of the fit
        guard(os.path.join(directory, "manifest.json"), {"fingerprint": fingerprint, "format": _FORMAT},
              what="factors of a different fit", fix="pass a fresh directory or delete this one")

    def path(self, stage: str) -> Optional[str]:
        return None if self.directory is None else os.path.join(self.directory, stage + ".npz")

    def load(self, stage: str) -> Optional[dict]:
        p = self.path(stage)
        return load_npz(p) if p is not None and os.path.exists(p) else None

    def save(self, stage: str, arrays: dict) -> None:
        if self.directory is not None:
            write_npz(self.path(stage), **arrays)


class _Budget:
    """Counts batch passes; raises FitInterrupted (without saving) once `stop_after` passes are done."""

    def __init__(self, stop_after: Optional[int]):
        self.left = stop_after

    def tick(self) -> None:
        if self.left is None:
            return
        self.left -= 1
        if self.left < 0:
            raise FitInterrupted("fit interrupted by stop_after; call again with the same directory to resume")


# ----------------------------------------------------------------------------------------------------------------
# The pipeline.


def _run_pass(stage, store, budget, checkpoint_every, batches, sums, step, progress=False):
    """Resumable loop: sums = step(sums, i, batch_i) for i >= the saved index; checkpoints every k batches."""
    from jaxinf.progress import Stage

    saved = store.load(stage)
    start = 0
    if saved is not None:
        start = int(saved["next_batch"])
        sums = jax.tree.unflatten(jax.tree.structure(sums),
                                  [jnp.asarray(saved[f"s{j}"], x.dtype) for j, x in enumerate(jax.tree.leaves(sums))])
    with Stage(f"K-FAC {stage}", len(batches), unit="batch", initial=start,
               enabled=progress and start < len(batches)) as bar:
        for i in range(start, len(batches)):
            budget.tick()
            sums = step(sums, i, batches[i])
            if (i + 1) % checkpoint_every == 0 or i + 1 == len(batches):
                arrays = {f"s{j}": np.asarray(x) for j, x in enumerate(jax.tree.leaves(sums))}
                store.save(stage, dict(arrays, next_batch=np.asarray(i + 1)))
            bar.update(1)
    return sums


def _eigh(m: np.ndarray, on_device: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of the symmetrised matrix in float64: numpy (LAPACK) on the host, or jnp.linalg.eigh on
    the default device (cuSOLVER on a GPU, much faster for the [3072, 3072] factors of GPT-2 small)."""
    m = np.asarray(m, np.float64)
    m = 0.5 * (m + m.T)
    if not on_device:
        return np.linalg.eigh(m)
    with jax.enable_x64(True):
        w, q = jnp.linalg.eigh(jnp.asarray(m, jnp.float64))
        return np.asarray(w), np.asarray(q)


def _as_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}


def _warn_uncovered(trainable: PyTree, layers) -> None:
    """Say which trainable leaves no fitted layer covers (a full-parameter fit leaves out the embedding and the
    norms, which are not linear layers): their gradients take no part in K-FAC / EK-FAC scores."""
    from flax import traverse_util

    covered = {k for layer in layers for k in (layer.kernel, layer.bias) if k is not None}
    flat = traverse_util.flatten_dict(trainable) if isinstance(trainable, dict) else {}
    left = ["/".join(map(str, k)) for k in flat if k not in covered]
    if left:
        size = sum(int(np.size(flat[k])) for k in flat if k not in covered)
        total = sum(int(np.size(v)) for v in flat.values())
        warnings.warn(f"K-FAC covers {len(flat) - len(left)} of {len(flat)} trainable leaves; {left[:4]}"
                      f"{' ...' if len(left) > 4 else ''} ({size:,} of {total:,} parameters) are not linear layers "
                      "and take no part in K-FAC / EK-FAC preconditioning or scores", stacklevel=3)


def fit_factors(
    fns: LMFunctions,
    trainable: PyTree,
    batches: Sequence[dict],
    *,
    layers=None,
    fisher: str = EMPIRICAL,
    key: Optional[jax.Array] = None,
    num_samples: int = 1,
    correct: bool = True,
    directory: Optional[str] = None,
    checkpoint_every: int = 8,
    stop_after: Optional[int] = None,
    timings: Optional[dict] = None,
    eigh_on_device: Optional[bool] = None,
    progress: bool = False,
    mesh=None,
) -> KFACFactors:
    """Fit A, S (and, if ``correct``, the EK-FAC eigenvalues) over the ordered list ``batches``.

    Args:
      fns, trainable: the model's pure functions and the linearisation point (LoRA adapters or full params).
      batches: list of batch dicts (input_ids, attention_mask, loss_mask); shapes may differ between batches.
      layers: None (all linear layers of ``trainable``) or Layer objects / names.
      fisher: "empirical" (data labels) or "true" (sampled labels; needs ``key``), see the module docstring.
      num_samples: label draws per example for the true Fisher.
      directory: cache / checkpoint directory (optional); checkpoint_every: batches between checkpoints.
      stop_after: process at most this many batch passes, then raise FitInterrupted (simulates a crash).
      timings: optional dict, filled with the wall-clock seconds of each stage run by this call.
      progress: show each pass over the batches as a `jaxinf.progress` stage.
      eigh_on_device: float64 eigendecomposition with jnp on the default device instead of numpy on the host;
        default: on the device when it is not a CPU.
      mesh: optional device mesh (``jaxinf.sharding``): every batch, padded with rows whose attention and loss
        masks are 0 (they add exactly zero to every sum) to a multiple of the data axis, is split over that axis;
        the per-device partial sums are all-reduced by XLA; the base weights are FSDP-sharded over the model axis.
    """
    if fisher not in (EMPIRICAL, TRUE):
        raise ValueError(f"fisher must be {EMPIRICAL!r} or {TRUE!r}, got {fisher!r}")
    if fisher == TRUE and key is None:
        raise ValueError("the true Fisher samples labels from the model: pass key=jax.random.key(...)")
    if fisher == EMPIRICAL:
        num_samples = 1
    if not batches:
        raise ValueError("fit_factors needs at least one batch")
    every = lm_layers(fns, trainable)
    if layers is None:
        _warn_uncovered(trainable, every)
    layers = select_layers(every, layers)
    key = jax.random.key(0) if key is None else key
    store = _Store(directory, _fingerprint(layers, fisher, num_samples, key, batches, trainable) if directory
                   else "")
    budget = _Budget(stop_after)
    timings = {} if timings is None else timings
    if eigh_on_device is None:
        eigh_on_device = jax.default_backend() != "cpu"
    param_dtype = str(jnp.dtype(jax.tree.leaves(trainable)[0].dtype))

    final = store.load("factors")
    if final is not None and (bool(final["corrected"]) or not correct):
        return _factors_from_arrays(final, layers, fisher, param_dtype)

    batches = [_as_batch(b) for b in batches]
    base = base_params(fns)
    acc = _acc_dtype(trainable)
    num_tokens = int(sum(int(np.asarray(token_mask(b)).sum()) for b in batches))
    num_examples = int(sum(b["input_ids"].shape[0] for b in batches)) * num_samples
    if mesh is not None:  # counts above are of the real rows; padding rows contribute nothing to the sums
        base, trainable = sharding.shard_params(base, mesh), sharding.replicate(trainable, mesh)
        batches = [sharding.shard_rows(sharding.pad_rows(b, sharding.data_size(mesh))[0], mesh) for b in batches]

    # Stage 1: covariances.
    eig = store.load("eigen")
    if eig is None:
        zeros = tuple((jnp.zeros((l.rows, l.rows), acc), jnp.zeros((l.d_out, l.d_out), acc)) for l in layers)
        zeros = sharding.replicate(zeros, mesh)  # the all-reduced sums come back replicated: one compilation
        clock = time.perf_counter()
        sums = _run_pass(
            "covariance", store, budget, checkpoint_every, batches, zeros,
            lambda s, i, b: _covariance_step(fns, layers, fisher, num_samples, trainable, base, b, key, i, s),
            progress)
        sums = jax.block_until_ready(sums)
        timings["covariance_s"] = time.perf_counter() - clock
        # Stage 2: eigendecomposition (float64, host).
        clock = time.perf_counter()
        eig = {}
        for j, (a_sum, s_sum) in enumerate(sums):
            a_cov = np.asarray(a_sum, np.float64) / max(num_tokens, 1)
            s_cov = np.asarray(s_sum, np.float64) / num_examples
            la, qa = _eigh(a_cov, eigh_on_device)
            ls, qs = _eigh(s_cov, eigh_on_device)
            eig.update({f"la{j}": la, f"qa{j}": qa, f"ls{j}": ls, f"qs{j}": qs})
        del sums, a_cov, s_cov
        eig["num_tokens"], eig["num_examples"] = np.asarray(num_tokens), np.asarray(num_examples)
        store.save("eigen", eig)
        timings["eigendecomposition_s"] = time.perf_counter() - clock

    # Stage 3: eigenvalue correction.
    if correct:
        bases = tuple((jnp.asarray(eig[f"qa{j}"], acc), jnp.asarray(eig[f"qs{j}"], acc)) for j in range(len(layers)))
        zeros = tuple(jnp.zeros((l.rows, l.d_out), acc) for l in layers)
        bases, zeros = sharding.replicate(bases, mesh), sharding.replicate(zeros, mesh)
        clock = time.perf_counter()
        sums = _run_pass(
            "correction", store, budget, checkpoint_every, batches, zeros,
            lambda s, i, b: _correction_step(fns, layers, fisher, num_samples, trainable, base, b, key, i, bases,
                                              s), progress)
        for j, lam in enumerate(sums):
            eig[f"L{j}"] = np.asarray(lam, np.float64) / num_examples
        timings["correction_s"] = time.perf_counter() - clock
    eig = dict(eig, corrected=np.asarray(bool(correct)))
    store.save("factors", eig)
    return _factors_from_arrays(eig, layers, fisher, param_dtype)


def _factors_from_arrays(arrays: dict, layers, fisher, param_dtype) -> KFACFactors:
    n = len(layers)
    corrected = bool(arrays["corrected"]) if "corrected" in arrays else False
    return KFACFactors(
        layers=tuple(layers),
        fisher=fisher,
        num_examples=int(arrays["num_examples"]),
        num_tokens=int(arrays["num_tokens"]),
        a_eig=[(arrays[f"la{j}"], arrays[f"qa{j}"]) for j in range(n)],
        s_eig=[(arrays[f"ls{j}"], arrays[f"qs{j}"]) for j in range(n)],
        corrected=[arrays[f"L{j}"] for j in range(n)] if corrected else None,
        param_dtype=param_dtype,
    )


def save_factors(directory: str, factors: KFACFactors) -> None:
    """Write factors (with their layer list) to ``directory/kfac_factors.npz`` + ``.json``; see ``load_factors``."""
    os.makedirs(directory, exist_ok=True)
    arrays = {"num_examples": np.asarray(factors.num_examples), "num_tokens": np.asarray(factors.num_tokens),
              "corrected": np.asarray(factors.corrected is not None)}
    for j in range(len(factors.layers)):
        arrays.update({f"la{j}": factors.a_eig[j][0],
                       f"qa{j}": factors.a_eig[j][1], f"ls{j}": factors.s_eig[j][0], f"qs{j}": factors.s_eig[j][1]})
        if factors.corrected is not None:
            arrays[f"L{j}"] = factors.corrected[j]
    write_npz(os.path.join(directory, "kfac_factors.npz"), **arrays)
    meta = {"fisher": factors.fisher, "param_dtype": factors.param_dtype,
            "layers": [dataclasses.asdict(l) for l in factors.layers]}
    write_json(os.path.join(directory, "kfac_factors.json"), meta)


def load_factors(directory: str) -> KFACFactors:
    """Factors written by ``save_factors``."""
    with open(os.path.join(directory, "kfac_factors.json")) as f:
        meta = json.load(f)
    layers = tuple(Layer(**{**d, "kernel": tuple(d["kernel"]), "bias": tuple(d["bias"]) if d["bias"] else None})
                   for d in meta["layers"])
    arrays = load_npz(os.path.join(directory, "kfac_factors.npz"))
    return _factors_from_arrays(arrays, layers, meta["fisher"], meta["param_dtype"])
