"""The study of Li et al. (2024) as library calls: presets, attribution methods, and one run over a task.

Every influence method ranks training row n for test row q by

    score(q, n) = <P g_q, g_n>,   g = gradient of the per-example loss w.r.t. the LoRA adapters,

with P the method's preconditioner (see jaxinf.attribution for the sign). Curvature for the iHVP methods is
the damped empirical Fisher of the training gradients, (1/N) G^T G + lambda I, built from gradients computed
once (`jaxinf.curvature.cached`): on a 2-core CPU one pass of model gradients is what is affordable, and every
solver (LiSSA, CG, Lanczos, Arnoldi, DataInf, the per-layer exact inverse) then runs on the same matrix, so
their differences are differences of approximation only. `exact` is the full damped inverse by the Woodbury
identity (an N x N solve); `exact_layer` is the study's per-layer exact inverse (block-diagonal). Each method's
scores are compared with `exact`'s (`agreement_with_exact`): for the iHVP methods this is their approximation
error, the study's first explanation of why influence fails. K-FAC / EK-FAC fit their Kronecker factors from
layer inputs and output cotangents of the same training rows. Damping is relative: a fraction of the mean
eigenvalue (trace / dim) of the matrix each method inverts (per layer for the layer-wise methods).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import scipy.stats

from jaxinf import attribution, ihvp
from jaxinf.curvature.cached import gradient_fisher_operator
from jaxinf.curvature.kfac import fit_factors
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

ALL_METHODS = ("grad_dot", "grad_cos", "tracin", "datainf", "exact_layer", "exact", "lissa", "cg", "arnoldi",
               "lanczos", "kfac", "ekfac", "repsim")


@dataclasses.dataclass
class StudyInputs:
    """What the methods share: model functions, adapters, tokenised splits, gradients, and settings."""

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
    _fisher: Any = None
    _kfac: Any = None

    @property
    def kfac_factors(self):
        """K-FAC factors and EK-FAC eigenvalues of the training rows (empirical Fisher), fitted once, resumable."""
        if self._kfac is None:
            from jaxinf.data import batches

            self._kfac = fit_factors(self.fns, self.adapters, list(batches(self.train, self.preset.grad_chunk)),
                                     correct=True, directory=os.path.join(os.path.dirname(self.workdir), "kfac_factors"))
        return self._kfac

    @property
    def fisher(self):
        if self._fisher is None:
            self._fisher = gradient_fisher_operator(self.train_grads)
        return self._fisher


def _flat(tree) -> np.ndarray:
    return np.asarray(attribution.flatten_rows(tree))


def _with_directions(directions: Callable[[StudyInputs], np.ndarray]) -> Callable[[StudyInputs], np.ndarray]:
    """A method whose scores are <d_q, g_n>; `run.directions(inputs)` gives d_q [M, D] (per-token scores use it)."""
    def run(inputs: StudyInputs) -> np.ndarray:
        return directions(inputs) @ _flat(inputs.train_grads).T

    run.directions = directions
    return run


def _solver_method(make: Callable[[StudyInputs], ihvp.IHVPSolver]) -> Callable[[StudyInputs], np.ndarray]:
    def directions(inputs: StudyInputs) -> np.ndarray:
        solver = make(inputs)
        state = solver.fit(inputs.fisher, jax.random.key(inputs.seed))
        return _flat(solver.apply_batched(state, inputs.test_grads))

    return _with_directions(directions)


def _kfac_method(kind: str) -> Callable[[StudyInputs], np.ndarray]:
    def directions(inputs: StudyInputs) -> np.ndarray:
        damping = ihvp.relative(inputs.preset.damping)
        state = state_from_factors(inputs.kfac_factors, kind, damping, inputs.adapters)
        return _flat({"kfac": kfac, "ekfac": ekfac}[kind](damping).apply_batched(state, inputs.test_grads))

    return _with_directions(directions)


def tracin_checkpoints(inputs: StudyInputs) -> list:
    """[(trainable_c, w_c)] of the study's TracIn: `preset.tracin_checkpoints` evenly spaced, the last excluded."""
    from jaxinf.training import checkpoint_steps

    steps = checkpoint_steps(inputs.workdir)
    k = inputs.preset.tracin_checkpoints
    chosen = sorted({steps[round(i * (len(steps) - 1) / k)] for i in range(k)})  # evenly spaced, last excluded
    return attribution.tracin_checkpoints(inputs.workdir, inputs.adapters, chosen)


def _tracin(inputs: StudyInputs) -> np.ndarray:
    ckpts = tracin_checkpoints(inputs)
    return attribution.tracin_scores(inputs.fns, ckpts, inputs.test, inputs.train,
                                     chunk_size=inputs.preset.grad_chunk)


_identity = _with_directions(lambda inputs: _flat(inputs.test_grads))


def _repsim(inputs: StudyInputs) -> np.ndarray:
    return attribution.repsim_scores(inputs.fns, inputs.adapters, inputs.test, inputs.train,
                                     pooling=inputs.repsim_pooling, chunk_size=inputs.preset.grad_chunk)


def _damping(inputs: StudyInputs):
    return ihvp.relative(inputs.preset.damping)


METHODS: dict[str, Callable[[StudyInputs], np.ndarray]] = {
    "grad_dot": _identity,
    "grad_cos": lambda i: attribution.cosine_matrix(_flat(i.test_grads), _flat(i.train_grads)),
    "tracin": _tracin,
    "datainf": _solver_method(lambda i: ihvp.datainf(damping=_damping(i))),
    "exact_layer": _solver_method(lambda i: ihvp.woodbury(damping=_damping(i))),
    "exact": _solver_method(lambda i: ihvp.woodbury(damping=_damping(i), by="all")),
    "lissa": _solver_method(lambda i: ihvp.lissa(damping=_damping(i), depth=i.lissa_depth or i.preset.lissa_depth)),
    "cg": _solver_method(lambda i: ihvp.cg(damping=_damping(i), maxiter=i.preset.cg_iters, tol=1e-6)),
    "arnoldi": _solver_method(lambda i: ihvp.arnoldi(damping=_damping(i), num_iters=i.preset.krylov_iters)),
    "lanczos": _solver_method(lambda i: ihvp.lanczos(damping=_damping(i), num_iters=i.preset.krylov_iters)),
    "kfac": _kfac_method("kfac"),
    "ekfac": _kfac_method("ekfac"),
    "repsim": _repsim,
}


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
    rho = [scipy.stats.spearmanr(a, b).statistic for a, b in zip(x, y)]
    return {"spearman": float(np.mean(rho)), "direction": float(np.mean(np.sqrt(np.clip(1.0 - cos ** 2, 0, 1))))}


def run_method(name: str, inputs: StudyInputs) -> tuple[np.ndarray, float]:
    """(scores [M, N], wall seconds) of one method."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    start = time.perf_counter()
    scores = np.asarray(METHODS[name](inputs), np.float64)
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError(f"method {name!r} produced non-finite scores")
    return scores, time.perf_counter() - start
