"""The study of Li et al. (2024) as library calls: presets, attribution methods, and one run over a task.

Every influence method ranks training row n for test row q by

    score(q, n) = <P g_q, g_n>,   g = gradient of the per-example loss w.r.t. the LoRA adapters,

with P the method's preconditioner (see jaxinf.attribution for the sign). One curvature C and one damping per run:

* curvature="fisher" (default): C = F = (1/N) G^T G, the empirical Fisher of the training gradients computed once
  (`jaxinf.curvature.cached`); every solver (LiSSA, CG, Lanczos, Arnoldi, DataInf, the per-layer exact inverse,
  K-FAC/EK-FAC from the same rows) approximates (F + lambda I)^{-1}, so their differences are differences of
  approximation only. "ggn" / "hessian": C is the model's Gauss-Newton / Hessian of the mean training loss over
  the N training rows (`jaxinf.curvature.operators`), used by exact, cg, lissa, lanczos, arnoldi; the
  block-diagonal methods (datainf, exact_layer, kfac, ekfac) can only use the gradient Fisher and say so in
  their info ("curvature"). Negative Hessian curvature: NEGATIVE_POLICY.
* damping: resolved ONCE from the relative fraction f and given as the same absolute value to every damped method.
  Global scope: lambda = f tr(C)/D with C the whole curvature inverted over all D adapter parameters (tr F =
  mean_n ||g_n||^2, exact; GGN/Hessian: exact from the dense spectrum when D <= DENSE_MAX_DIM, else Hutchinson).
  Block scope (the study's rule, Fisher only): lambda_l = f tr(F_l)/d_l = f x the mean squared gradient entry of
  LoRA matrix l, one diagonal Lambda shared by every method (full-space solvers run on Lambda^{-1/2}-rescaled
  gradients with damping 1, which inverts exactly F + Lambda).

`exact` is the full damped inverse in float64, cancellation-free for scores ((G G^T/N + lambda I)^{-1} G q for the
Fisher; eigh of the dense GGN/Hessian); `exact_layer` is the block-diagonal exact inverse with one block per LoRA
matrix. Each method's scores are compared with `exact`'s (`agreement_with_exact`): for the iHVP methods this is
their approximation error, the study's first explanation of why influence fails. Solvers report on themselves
(CG: iterations, final relative residual, converged; Krylov: Ritz residuals) through `run_method_with_info`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.flatten_util
import numpy as np
import scipy.linalg

from jaxinf import attribution, ihvp
from jaxinf.evaluation.metrics import row_spearman
from jaxinf.curvature.cached import gradient_fisher_operator
from jaxinf.curvature.kfac import fit_factors
from jaxinf.curvature.spectrum import gradient_trace
from jaxinf.ihvp.ekfac import ekfac, kfac, state_from_factors
from jaxinf.models import LMFunctions


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes and settings of one study run."""

    limit_train: Optional[int]
    limit_test: Optional[int]
    max_length: int
    epochs: float
    batch_size: int
    lr: float
    lora_dropout: float
    template: str
    damping: float = 0.1  # relative: fraction of the mean eigenvalue
    lissa_depth: int = 3000
    cg_iters: int = 100
    krylov_iters: int = 32
    tracin_checkpoints: int = 3
    grad_chunk: int = 8
    epochs_harmful: Optional[float] = None  # the study trained 50 epochs on the harmful sets


PRESETS = {
    # A 2-core CPU in about 15 minutes with SmolLM2-135M: a stratified subsample, short rows.
    "quick": Preset(limit_train=48, limit_test=16, max_length=96, epochs=3, batch_size=8, lr=1e-3,
                    lora_dropout=0.0, template="chat"),
    # The study's released settings (all rows, [INST] template, AdamW 5e-5, batch 24, dropout 0.1).
    "paper": Preset(limit_train=None, limit_test=None, max_length=128, epochs=10, batch_size=24, lr=5e-5,
                    lora_dropout=0.1, template="inst", epochs_harmful=50, tracin_checkpoints=5),
}

def resolve_preset(preset) -> Preset:
    """A `Preset` from a name in PRESETS, a Preset, or a dict of Preset fields."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, dict):
        unknown = set(preset) - {f.name for f in dataclasses.fields(Preset)}
        if unknown:
            raise ValueError(f"preset: unknown fields {sorted(unknown)}; a Preset has "
                             f"{[f.name for f in dataclasses.fields(Preset)]}")
        return Preset(**preset)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: choose from {list(PRESETS)} or pass a jaxinf.study.Preset")
    return PRESETS[preset]


def preset_name(preset):
    """How a workdir records a preset: its name when it is one of PRESETS, else its fields (a dict)."""
    value = resolve_preset(preset)
    for name, named in PRESETS.items():
        if named == value:
            return name
    return dataclasses.asdict(value)


def finetune_schedule(preset: Preset, epochs: float, n_train: int) -> tuple[int, int]:
    """(steps, batch size) of the fine-tuning: batches of min(preset.batch_size, n_train) rows, as many as
    `epochs` passes over the n_train rows need (steps counted with the batch size actually drawn)."""
    batch_size = min(preset.batch_size, n_train)
    return max(1, int(np.ceil(epochs * n_train / batch_size))), batch_size


def finetune_config(preset: Preset, n_train: int, *, epochs: float, checkpoints: Optional[int] = None,
                    seed: int = 0):
    """The fine-tuning of every study stage and experiment: AdamW at preset.lr, `finetune_schedule`'s steps and
    batch size, a checkpoint every max(1, steps // checkpoints) steps (checkpoints: preset.tracin_checkpoints
    when None; the final step is always saved)."""
    from jaxinf import training

    steps, batch_size = finetune_schedule(preset, epochs, n_train)
    k = preset.tracin_checkpoints if checkpoints is None else checkpoints
    return training.TrainConfig(steps=steps, batch_size=batch_size, lr=preset.lr,
                                checkpoint_every=max(1, steps // max(1, k)), seed=seed)


DAMPING_SCOPES = ("global", "block")
CURVATURES = ("fisher", "ggn", "hessian")
DENSE_MAX_DIM = 6000  # model curvatures up to this many adapter parameters are inverted exactly by eigh
NEGATIVE_POLICY = ("keep: every method inverts C + lambda I as it is (no clipping or absolute values), so all "
                   "share one matrix; when the Hessian has eigenvalues below -lambda that matrix is indefinite, "
                   "CG and LiSSA then fail (reported as errors) and the spectrum's negative part is reported")


@dataclasses.dataclass
class StudyInputs:
    """What the methods share: model functions, adapters, tokenised splits, gradients, and settings.

    damping: the relative fraction f (None: the preset's). damping_scope "global": one absolute lambda =
    f tr(C)/D for every method, C the curvature inverted (``curvature``) over all D adapter parameters;
    "block": lambda_l = f tr(F_l)/d_l = f x the mean squared gradient entry of LoRA matrix l (the study's rule),
    one diagonal damping matrix Lambda shared by every method (gradient Fisher only).
    """

    fns: LMFunctions
    adapters: Any
    train: Any  # TokenizedRows
    test: Any
    workdir: str
    preset: Preset
    train_grads: Any  # stacked pytree [N, ...]
    test_grads: Any  # stacked pytree [M, ...]
    seed: int = 0
    lissa_depth: Optional[int] = None
    repsim_pooling: str = "prompt_end"
    damping: Optional[float] = None
    damping_scope: str = "global"
    curvature: str = "fisher"
    mesh: Any = None  # jaxinf.sharding device mesh for the K-FAC passes (None: one device)
    # values derived from the training data (curvatures, traces, K-FAC factors, fitted solver states), shared by
    # dataclasses.replace copies (a damping sweep, the report's queries); see `_derived`
    _cache: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.damping_scope not in DAMPING_SCOPES:
            raise ValueError(f"damping_scope must be one of {DAMPING_SCOPES}, got {self.damping_scope!r}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.damping_scope == "block" and self.curvature != "fisher":
            raise ValueError("damping_scope='block' is the study's per-matrix rule for the gradient Fisher: use "
                             "damping_scope='global' with curvature='ggn' or 'hessian'")
        if self.damping is None:
            self.damping = float(self.preset.damping)

    def _derived(self) -> dict:
        """The store of values derived from this copy's training rows and gradients: the same dict for every
        replace() copy that holds the same (identical) objects, a fresh one for a copy with other training data,
        so nothing fitted on one training set is ever used for another."""
        for train, grads, store in self._cache.setdefault("by_training_data", []):
            if train is self.train and grads is self.train_grads:
                return store
        store = {}
        self._cache["by_training_data"].append((self.train, self.train_grads, store))
        return store

    @property
    def kfac_factors(self):
        """K-FAC factors and EK-FAC eigenvalues of the training rows (empirical Fisher), fitted once, resumable."""
        store = self._derived()
        if "kfac" not in store:
            from jaxinf.data import batches

            store["kfac"] = fit_factors(
                self.fns, self.adapters, list(batches(self.train, self.preset.grad_chunk)), correct=True,
                directory=os.path.join(os.path.dirname(self.workdir), "kfac_factors"), progress=True, mesh=self.mesh)
        return store["kfac"]

    @property
    def fisher(self):
        store = self._derived()
        if "fisher" not in store:
            store["fisher"] = gradient_fisher_operator(self.train_grads)
        return store["fisher"]

    # ---- curvature and damping ---------------------------------------------------------------------------------

    @property
    def leaf_names(self) -> tuple:
        """One name per LoRA matrix (adapter leaf), in jax.tree order: the blocks of datainf / exact_layer."""
        return ihvp.LayerPartition.of(self.adapters, by="leaf").names

    @property
    def model_operator(self):
        """The GGN or Hessian of the mean training loss over all N training rows (B equal batches)."""
        key = ("model_operator", self.curvature)
        if key not in self._derived():
            from jaxinf.analysis import model_operator
            from jaxinf.data import batches

            n = len(self.train.input_ids)
            size = max(d for d in range(1, min(self.preset.grad_chunk, n) + 1) if n % d == 0)
            bs = [{k: jax.numpy.asarray(b[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
                  for b in batches(self.train, size)]
            self._derived()[key] = model_operator(self.curvature, self.fns, self.adapters, bs)
        return self._derived()[key]

    @property
    def model_spectrum(self):
        """(eigenvalues, eigenvectors) in float64 of the dense model curvature, or None above DENSE_MAX_DIM."""
        key = ("model_spectrum", self.curvature)
        if key not in self._derived():
            op = self.model_operator
            if op.dim > DENSE_MAX_DIM:
                self._derived()[key] = None
            else:
                from jaxinf.curvature.dense import dense_matrix

                mat = np.asarray(dense_matrix(op), np.float64)
                self._derived()[key] = np.linalg.eigh(0.5 * (mat + mat.T))
        return self._derived()[key]

    @property
    def solver_operator(self):
        """The operator the full-space solvers (cg, lissa, lanczos, arnoldi) invert: the cached gradient Fisher, or
        the model GGN / Hessian. When the dense model matrix M was built (at most DENSE_MAX_DIM adapter
        parameters, for `exact`), it is applied as M v in the adapters' dtype: the same matrix, but each of
        LiSSA's thousands of products costs a matrix-vector product instead of a pass over the training rows."""
        if self.curvature == "fisher":
            return self.fisher
        if self.model_spectrum is None:
            return self.model_operator
        key = ("dense_operator", self.curvature)
        if key not in self._derived():
            from jaxinf.curvature.operators import hessian_operator

            w, v = self.model_spectrum
            matrix = jax.numpy.asarray((v * w) @ v.T, jax.tree.leaves(self.adapters)[0].dtype)
            self._derived()[key] = hessian_operator(_quadratic_form, self.adapters, [{"matrix": matrix}])
        return self._derived()[key]

    def curvature_trace(self) -> tuple[float, str]:
        """(tr C, how it was computed) of the curvature being inverted."""
        key = ("trace", self.curvature)
        if key not in self._derived():
            if self.curvature == "fisher":
                g = _flat(self.train_grads).astype(np.float64)
                self._derived()[key] = (float(gradient_trace(g)), "exact: mean_n ||g_n||^2")
            elif self.model_spectrum is not None:
                self._derived()[key] = (float(np.sum(self.model_spectrum[0])), "exact: sum of the dense eigenvalues")
            else:
                from jaxinf.curvature.spectrum import hutchinson_trace

                tr = float(hutchinson_trace(self.model_operator, jax.random.key(self.seed), num_probes=64))
                self._derived()[key] = (tr, "Hutchinson, 64 Rademacher probes")
        return self._derived()[key]

    @property
    def global_lambda(self) -> float:
        """lambda = f tr(C) / D of the whole curvature being inverted."""
        tr, how = self.curvature_trace()
        if not tr > 0:
            raise ValueError(f"relative damping needs tr(C) > 0, but the {self.curvature} trace is {tr:.4g} ({how}); "
                             "use --curvature=ggn or fisher, whose trace is positive")
        return ihvp.relative_lambda(self.damping, tr, _num_params(self.adapters))

    @property
    def block_lambdas(self) -> dict:
        """{LoRA matrix name: lambda_l = f x mean_n ||g_n,l||^2 / d_l} (the study's per-matrix rule)."""
        part = ihvp.LayerPartition.of(self.adapters, by="leaf")
        out = {}
        for name, g in zip(part.names, part.split_batched(self.train_grads)):
            out[name] = float(ihvp.block_lambda(self.damping, np.asarray(g, np.float64)))
        if not all(v > 0 for v in out.values()):
            raise ValueError(f"block damping: LoRA matrices {[k for k, v in out.items() if not v > 0]} have zero "
                             "gradients, so their relative damping is 0; use --damping_scope=global")
        return out

    def _leaf_scales(self):
        """Per-leaf lambda_l^{-1/2} as a pytree of scalars (block scope)."""
        lams = self.block_lambdas
        leaves, treedef = jax.tree.flatten(self.adapters)
        return jax.tree.unflatten(treedef, [1.0 / np.sqrt(lams[n]) for n in self.leaf_names])

    def scaled(self, grads):
        """Lambda^{-1/2} g for stacked gradients (block scope: F + Lambda = Lambda^{1/2}(F' + I)Lambda^{1/2})."""
        return jax.tree.map(lambda g, s: g * np.asarray(s, g.dtype), grads, self._leaf_scales())

    def scaled_fisher(self):
        key = ("scaled_fisher", self.damping)
        if key not in self._derived():
            self._derived()[key] = gradient_fisher_operator(self.scaled(self.train_grads))
        return self._derived()[key]


def _flat(tree) -> np.ndarray:
    return np.asarray(attribution.flatten_rows(tree))


def _num_params(tree) -> int:
    """D, the number of adapter parameters."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _fitted(inputs: StudyInputs, key: tuple, fit: Callable[[], Any]) -> Any:
    """A solver state fitted once per training set (`StudyInputs._derived`): the report's queries reuse the state
    the study's scores were computed with."""
    store = inputs._derived()
    if key not in store:
        store[key] = fit()
    return store[key]


def _solver_report(name: str, state, info) -> dict:
    """What a solver says about its own accuracy: CG iterations / residual / convergence, Krylov Ritz residuals."""
    info = jax.tree.map(np.asarray, info)
    out = {}
    if "iterations" in info:
        out.update(iterations=int(info["iterations"].max()), relative_residual=float(info["relative_residual"].max()),
                   tol=float(np.asarray(state.tol)), converged=bool(info["converged"].all()),
                   queries_not_converged=int((~info["converged"]).sum()))
    if hasattr(state, "ritz_values"):
        out.update(ritz_value_max=float(np.max(state.ritz_values)), ritz_value_min=float(np.min(state.ritz_values)),
                   ritz_residual_max=float(np.max(state.ritz_residuals)))
    if "max_growth_ratio" in info:
        out.update(max_growth_ratio=float(info["max_growth_ratio"].max()))
    return out


def _quadratic_form(params, batch) -> jax.Array:
    """(1/2) p^T M p for M = batch["matrix"] (symmetric): its Hessian is M, so `hessian_operator` applies M."""
    flat = jax.flatten_util.ravel_pytree(params)[0]
    return 0.5 * flat @ (batch["matrix"] @ flat)


def _solver_directions(make: Callable[[StudyInputs, Any], ihvp.IHVPSolver], name: str):
    """A solver on the run's curvature with the run's damping: global scope, (C + lambda I)^{-1} q with the
    absolute lambda; block scope, Lambda^{-1/2} (F' + I)^{-1} Lambda^{-1/2} q with F' the Fisher of the rescaled
    gradients Lambda^{-1/2} g, which is exactly (F + Lambda)^{-1} q. Returns (d [M, D], the solver's report)."""

    def directions(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
        key = jax.random.key(inputs.seed)
        cache_key = ("state", name, inputs.curvature, inputs.damping_scope, inputs.damping)
        if inputs.damping_scope == "block":
            solver = make(inputs, ihvp.absolute(1.0))
            state = _fitted(inputs, cache_key, lambda: solver.fit(inputs.scaled_fisher(), key))
            xs, info = solver.apply_batched_with_info(state, inputs.scaled(inputs.test_grads))
            out = _flat(inputs.scaled(xs))
        else:
            op = inputs.solver_operator if inputs.curvature != "fisher" else inputs.fisher
            solver = make(inputs, ihvp.absolute(inputs.global_lambda))
            state = _fitted(inputs, cache_key, lambda: solver.fit(op, key))
            xs, info = solver.apply_batched_with_info(state, inputs.test_grads)
            out = _flat(xs)
        return out, dict(curvature=inputs.curvature, **_solver_report(name, state, info))

    return directions


def _block_directions(make: Callable[[Any], ihvp.IHVPSolver], name: str):
    """datainf / exact_layer: one block per LoRA matrix of the gradient Fisher, every block damped by the run's
    lambda (global scope) or its own lambda_l (block scope)."""

    def directions(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
        lam = inputs.block_lambdas if inputs.damping_scope == "block" else inputs.global_lambda
        solver = make(lam if isinstance(lam, dict) else ihvp.absolute(lam))
        state = _fitted(inputs, ("state", name, "fisher", inputs.damping_scope, inputs.damping),
                        lambda: solver.fit(inputs.fisher, jax.random.key(inputs.seed)))
        return _flat(solver.apply_batched(state, inputs.test_grads)), {"curvature": "fisher"}

    return directions


def _kfac_directions(kind: str):
    def directions(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
        factors = inputs.kfac_factors
        if inputs.damping_scope == "block":
            by_leaf = inputs.block_lambdas
            names = dict(zip([tuple(_key_str(k) for k in path) for path, _ in
                              jax.tree_util.tree_flatten_with_path(inputs.adapters)[0]], inputs.leaf_names))
            damping = {l.name: by_leaf[names[tuple(l.kernel)]] for l in factors.layers}
        else:
            damping = ihvp.absolute(inputs.global_lambda)
        state = _fitted(inputs, ("state", kind, "fisher", inputs.damping_scope, inputs.damping),
                        lambda: state_from_factors(factors, kind, damping, inputs.adapters))
        d = _flat({"kfac": kfac, "ekfac": ekfac}[kind](ihvp.absolute(1.0)).apply_batched(state, inputs.test_grads))
        return d, {"curvature": "fisher", "curvature_note": f"{kind} factors of the empirical Fisher"}

    return directions


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _exact_system(inputs: StudyInputs):
    """(G, Q, lambda) in float64 with F + lambda I the matrix inverted: the gradients as they are (global scope) or
    rescaled by Lambda^{-1/2} with lambda = 1 (block scope)."""
    if inputs.damping_scope == "block":
        return (_flat(inputs.scaled(inputs.train_grads)).astype(np.float64),
                _flat(inputs.scaled(inputs.test_grads)).astype(np.float64), 1.0, inputs.block_lambdas)
    lam = inputs.global_lambda
    return _flat(inputs.train_grads).astype(np.float64), _flat(inputs.test_grads).astype(np.float64), lam, lam


def exact_fisher_scores(train: np.ndarray, test: np.ndarray, lam: float) -> np.ndarray:
    """score(q, n) = g_n^T (G^T G / N + lambda I)^{-1} g_q = [(G G^T / N + lambda I)^{-1} G Q^T]^T in float64.

    The push-through identity (G^T G/N + lambda I)^{-1} G^T = G^T (G G^T/N + lambda I)^{-1} leaves an N x N SPD
    solve with no subtraction, so small lambda loses no accuracy (unlike Woodbury's (v - G^T(...)^{-1} G v)/lambda).
    """
    g, q = np.asarray(train, np.float64), np.asarray(test, np.float64)
    n = g.shape[0]
    k = g @ g.T / n + lam * np.eye(n)
    return scipy.linalg.solve(k, g @ q.T, assume_a="pos").T


def exact_fisher_directions(train: np.ndarray, test: np.ndarray, lam: float) -> np.ndarray:
    """x_q = (G^T G / N + lambda I)^{-1} g_q [Q, D] in float64, by Woodbury:
    x = (q - G^T (G G^T + N lambda I)^{-1} G q) / lambda (an N x N SPD solve). For scores <x_q, g_n> at small
    lambda use `exact_fisher_scores`, which avoids this subtraction."""
    g, q = np.asarray(train, np.float64), np.asarray(test, np.float64)
    n = g.shape[0]
    inner = scipy.linalg.solve(g @ g.T + n * lam * np.eye(n), g @ q.T, assume_a="pos")
    return (q - (g.T @ inner).T) / lam


def _exact_directions(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    """(C + lambda I)^{-1} g_q in float64 (Woodbury for the Fisher; eigh for a dense model curvature)."""
    if inputs.curvature == "fisher":
        g, q, lam, _ = _exact_system(inputs)
        d = exact_fisher_directions(g, q, lam)
        if inputs.damping_scope == "block":
            d = d * _flat(inputs.scaled(jax.tree.map(lambda x: np.ones_like(x)[None], inputs.adapters)))[0]
        return d, {"curvature": "fisher"}
    theta, u = _model_spectrum_or_fail(inputs)
    q = _flat(inputs.test_grads).astype(np.float64)
    return ((q @ u) / (theta + inputs.global_lambda)) @ u.T, {"curvature": inputs.curvature}


def _model_spectrum_or_fail(inputs):
    spectrum = inputs.model_spectrum
    if spectrum is None:
        raise ValueError(f"exact {inputs.curvature}: {inputs.model_operator.dim} adapter parameters exceed "
                         f"DENSE_MAX_DIM={DENSE_MAX_DIM} for the dense eigendecomposition; use a smaller LoRA rank")
    return spectrum


def rounding_floor(theta: np.ndarray) -> float:
    """n eps max|theta|: the size below which an eigenvalue of an n x n symmetric matrix is rounding, not sign."""
    theta = np.asarray(theta)
    return float(theta.shape[0] * np.finfo(theta.dtype).eps * max(float(np.max(np.abs(theta))), 1e-300))


def _exact(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    """Exact influence of the run's curvature and damping, float64 (scores by the push-through identity, which
    keeps small lambda accurate; its directions, for per-token scores, by Woodbury)."""
    if inputs.curvature == "fisher":
        g, q, lam, _ = _exact_system(inputs)
        return exact_fisher_scores(g, q, lam), {"curvature": "fisher",
                                                 "how": "float64, (G G^T/N + lambda I)^{-1} G q"}
    theta, u = _model_spectrum_or_fail(inputs)
    lam = inputs.global_lambda
    shifted = theta + lam
    negative = theta < -rounding_floor(theta)  # an exact zero eigenvalue comes out as +-1e-17: not negative
    info = dict(curvature=inputs.curvature, how="float64 eigh of the dense model curvature",
                eigenvalue_min=float(theta.min()), eigenvalue_max=float(theta.max()),
                negative_eigenvalues=int(negative.sum()), negative_mass=float(-theta[negative].sum()),
                damped_matrix_positive_definite=bool(shifted.min() > 0), negative_policy=NEGATIVE_POLICY)
    g = _flat(inputs.train_grads).astype(np.float64)
    q = _flat(inputs.test_grads).astype(np.float64)
    return ((q @ u) / shifted) @ (g @ u).T, info


def _tracin_steps(inputs: StudyInputs) -> tuple[list, list]:
    """(TracIn's checkpoint steps: `preset.tracin_checkpoints` evenly spaced, the last excluded; every step saved)."""
    from jaxinf.training import checkpoint_steps

    steps = checkpoint_steps(inputs.workdir)
    k = inputs.preset.tracin_checkpoints
    return sorted({steps[round(i * (len(steps) - 1) / k)] for i in range(k)}), steps


def tracin_checkpoints(inputs: StudyInputs) -> list:
    """[(trainable_c, w_c)] of the study's TracIn at `_tracin_steps`, w_c the learning-rate mass after c."""
    return attribution.tracin_checkpoints(inputs.workdir, inputs.adapters, _tracin_steps(inputs)[0])


def tracin_adam_checkpoints(inputs: StudyInputs) -> list:
    """[(trainable_c, w_c, P_c)] of Adam-TracIn: TracIn's checkpoints and weights, and P_c the AdamW
    preconditioner at the end of checkpoint c's interval (the next chosen checkpoint, or the final step)."""
    chosen, steps = _tracin_steps(inputs)
    ends = chosen[1:] + [steps[-1]]
    pre = attribution.adam_preconditioners(inputs.workdir, inputs.adapters, ends)
    return [(t, w, p) for (t, w), p in zip(attribution.tracin_checkpoints(inputs.workdir, inputs.adapters, chosen),
                                           pre)]


def _tracin_adam(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    return attribution.adam_tracin_scores(inputs.fns, tracin_adam_checkpoints(inputs), inputs.test, inputs.train,
                                          chunk_size=inputs.preset.grad_chunk, progress=True), {}


def _tracin(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    ckpts = tracin_checkpoints(inputs)
    return attribution.tracin_scores(inputs.fns, ckpts, inputs.test, inputs.train,
                                     chunk_size=inputs.preset.grad_chunk, progress=True), {}


def _repsim(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    return attribution.repsim_scores(inputs.fns, inputs.adapters, inputs.test, inputs.train,
                                     pooling=inputs.repsim_pooling, chunk_size=inputs.preset.grad_chunk), {}


def _cosine(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    return attribution.cosine_matrix(_flat(inputs.test_grads), _flat(inputs.train_grads)), {}


def _unit_queries(inputs: StudyInputs) -> tuple[np.ndarray, dict]:
    q = _flat(inputs.test_grads).astype(np.float64)
    return q / np.linalg.norm(q, axis=1, keepdims=True), {}


@dataclasses.dataclass(frozen=True)
class Method:
    """One attribution method of the study.

    damped: its preconditioner uses the run's damping. curvatures: what it can invert (() none; ("fisher",) the
    gradient Fisher or its K-FAC only; CURVATURES the run's --curvature). directions_fn(inputs) -> (d [M, D],
    info) with d_q the preconditioned query gradient (per-token scores split <d_q, g_n> over tokens); scores_fn
    (inputs) -> (scores [M, N], info) for a method that scores its own way (None: scores = d G^T).
    unit_train: the score also divides by ||g_n|| (grad_cos), and so does each token's share. checkpoints_fn(inputs)
    -> [(trainable_c, w_c, P_c or None)] for a method summed over training checkpoints (TracIn): a token's share is
    sum_c w_c <P_c g_q(theta_c), grad l_nt(theta_c)> (P_c None: no preconditioner). per_token_note: why a method
    with neither directions nor checkpoints has no per-token split (shown in the report).
    """

    name: str
    damped: bool = False
    curvatures: tuple = ()
    directions_fn: Optional[Callable[[StudyInputs], tuple]] = None
    scores_fn: Optional[Callable[[StudyInputs], tuple]] = None
    unit_train: bool = False
    checkpoints_fn: Optional[Callable[[StudyInputs], list]] = None
    per_token_note: str = ""

    def directions(self, inputs: StudyInputs) -> Optional[np.ndarray]:
        """d_q [M, D] for inputs.test_grads, or None for a method that is not a gradient inner product."""
        return None if self.directions_fn is None else np.asarray(self.directions_fn(inputs)[0])

    def run(self, inputs: StudyInputs) -> tuple[np.ndarray, dict, Optional[np.ndarray]]:
        """(scores [M, N] float64, info, directions or None when this run did not form them)."""
        if self.scores_fn is not None:
            scores, info = self.scores_fn(inputs)
            return np.asarray(scores, np.float64), dict(info), None
        d, info = self.directions_fn(inputs)
        d = np.asarray(d)
        return np.asarray(d @ _flat(inputs.train_grads).T, np.float64), dict(info), d


_SOLVERS = {
    "lissa": lambda i, d: ihvp.lissa(damping=d, depth=i.lissa_depth or i.preset.lissa_depth),
    "cg": lambda i, d: ihvp.cg(damping=d, maxiter=i.preset.cg_iters, tol=1e-6),
    "arnoldi": lambda i, d: ihvp.arnoldi(damping=d, num_iters=i.preset.krylov_iters),
    "lanczos": lambda i, d: ihvp.lanczos(damping=d, num_iters=i.preset.krylov_iters),
}


_REGISTRY = (
    Method("grad_dot", directions_fn=lambda inputs: (_flat(inputs.test_grads), {})),
    Method("grad_cos", directions_fn=_unit_queries, scores_fn=_cosine, unit_train=True),
    Method("tracin", scores_fn=_tracin,
           checkpoints_fn=lambda inputs: [(c, w, None) for c, w in tracin_checkpoints(inputs)]),
    Method("tracin_adam", scores_fn=_tracin_adam, checkpoints_fn=tracin_adam_checkpoints),
    Method("datainf", damped=True, curvatures=("fisher",),
           directions_fn=_block_directions(lambda d: ihvp.datainf(damping=d, by="leaf"), "datainf")),
    Method("exact_layer", damped=True, curvatures=("fisher",),
           directions_fn=_block_directions(lambda d: ihvp.woodbury(damping=d, by="leaf"), "exact_layer")),
    Method("exact", damped=True, curvatures=CURVATURES, directions_fn=_exact_directions, scores_fn=_exact),
    *(Method(name, damped=True, curvatures=CURVATURES, directions_fn=_solver_directions(make, name))
      for name, make in _SOLVERS.items()),
    Method("kfac", damped=True, curvatures=("fisher",), directions_fn=_kfac_directions("kfac")),
    Method("ekfac", damped=True, curvatures=("fisher",), directions_fn=_kfac_directions("ekfac")),
    Method("repsim", scores_fn=_repsim,
           per_token_note="RepSim is a cosine of hidden states, not a gradient inner product: no per-token split"),
)
METHODS: dict[str, Method] = {m.name: m for m in _REGISTRY}
ALL_METHODS = tuple(METHODS)
# views of the registry: methods whose preconditioner uses the damping, and those that can invert a model
# curvature (GGN / Hessian); the block-diagonal ones (datainf, exact_layer, kfac, ekfac) use the gradient Fisher
DAMPED_METHODS = tuple(m.name for m in _REGISTRY if m.damped)
CURVATURE_METHODS = tuple(m.name for m in _REGISTRY if m.curvatures == CURVATURES)


def agreement_with_exact(scores: np.ndarray, exact_scores: np.ndarray) -> dict:
    """How far a method's score rows are from exact influence's (the `exact` method), per test row, averaged.

    spearman: rank correlation of the two rows (rankings are what attribution reports).
    direction: |sin angle| between the rows (min over scales c of ||c s - s_exact|| / ||s_exact||).
    For preconditioned methods, s = G P q with G the training gradients, so this is the iHVP error seen
    through the training gradients; the part of P q orthogonal to every g_n (which dominates ||P q|| when the
    damping is small) cannot change a score and is rightly ignored.
    """
    x, y = np.asarray(scores, np.float64), np.asarray(exact_scores, np.float64)
    cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    rho = row_spearman(x, y)
    return {"spearman": float(np.mean(rho)), "direction": float(np.mean(np.sqrt(np.clip(1.0 - cos ** 2, 0, 1))))}


def run_method(name: str, inputs: StudyInputs) -> tuple[np.ndarray, float]:
    """(scores [M, N], wall seconds) of one method."""
    scores, seconds, _ = run_method_with_info(name, inputs)
    return scores, seconds


def run_method_with_info(name: str, inputs: StudyInputs) -> tuple[np.ndarray, float, dict]:
    """(scores [M, N], wall seconds, info) of one method. info: the curvature it used; for damped methods the
    absolute lambda (a float, or {LoRA matrix: lambda_l} under block scope) and the damping rule; for solvers their
    own report (CG iterations, final relative residual, converged)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    method = METHODS[name]
    start = time.perf_counter()
    scores, info, _ = method.run(inputs)
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError(f"method {name!r} produced non-finite scores")
    if method.damped:
        info["lambda"] = inputs.block_lambdas if inputs.damping_scope == "block" else inputs.global_lambda
        info["damping_fraction"], info["damping_scope"] = inputs.damping, inputs.damping_scope
    info.setdefault("curvature", "none (no curvature)")
    return scores, seconds, info


def score_cache_key(name: str, inputs: StudyInputs) -> str:
    """File stem of a method's cached scores: damped methods name the run's curvature (which also sets lambda for
    the Fisher-only ones), damping scope and fraction."""
    if not METHODS[name].damped:
        return name
    return f"{name}__{inputs.curvature}_{inputs.damping_scope}_f{inputs.damping:g}"


def lambda_summary(lam) -> str:
    """A lambda for a table cell: the value, or min..max over blocks."""
    if lam is None:
        return ""
    if isinstance(lam, dict):
        vals = list(lam.values())
        return f"{min(vals):.2g}..{max(vals):.2g}"
    return f"{float(lam):.3g}"


def damping_report(inputs: StudyInputs) -> dict:
    """How the run's damping was resolved (results.json "damping")."""
    out = {"fraction": inputs.damping, "scope": inputs.damping_scope, "curvature": inputs.curvature}
    try:
        if inputs.damping_scope == "block":
            out["lambda"] = inputs.block_lambdas
            out["description"] = (f"lambda_l = {inputs.damping:g} x mean squared gradient entry of each LoRA matrix "
                                  f"({lambda_summary(out['lambda'])}), the same diagonal damping for every method")
        else:
            tr, how = inputs.curvature_trace()
            out.update(trace=tr, trace_method=how, dim=int(_num_params(inputs.adapters)), **{"lambda": inputs.global_lambda})
            out["description"] = (f"lambda = {inputs.damping:g} x tr({inputs.curvature})/D = {out['lambda']:.4g} "
                                  f"for every damped method (tr {how})")
    except ValueError as err:
        out["description"] = f"unresolved: {err}"
    if inputs.curvature == "hessian":
        out["negative_policy"] = NEGATIVE_POLICY
    return out


def __getattr__(name):  # the study as a library call lives in jaxinf.pipeline (which imports this module)
    if name in ("run_study", "StudyConfig", "StudyResult", "load_results", "prepare"):
        from jaxinf import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
