"""LoRA fine-tuning with optax AdamW, orbax checkpoints, a per-step convergence log, and exact resumption.

Determinism: the examples of optimiser step s are positions [s*B, (s+1)*B) of an endless stream made of one
seeded permutation of the training rows per epoch, and LoRA dropout at step s uses fold_in(key, s). So a step's
work depends only on (seed, s, state after step s-1): restoring the last checkpoint and replaying the log from
there gives bit-identical parameters and log lines to a run that was never interrupted.

Schedule: linear warm-up from 0 to `lr` over `warmup_steps`, then linear decay to 0 at the last step.
Each step averages the gradient over `grad_accum` micro-batches of `batch_size // grad_accum` rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxinf.progress import Stage, warn
from jaxinf.progress import log as progress_log

from jaxinf import sharding
from jaxinf.workdir import guard, write_text
from jaxinf import health
from jaxinf.models.loss import LMFunctions

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and run settings. Exactly one of `steps` / `epochs` sets the run length."""

    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None
    checkpoint_every: int = 10
    keep_checkpoints: Optional[int] = None  # None keeps every checkpoint (convergence studies need them all)
    seed: int = 0

    def total_steps(self, n_rows: int) -> int:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of TrainConfig.steps and TrainConfig.epochs")
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * n_rows / self.batch_size))

    def validate(self, n_rows: int) -> None:
        if n_rows == 0:
            raise ValueError("the training split is empty: check --data and its 'train' split")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up 0 -> lr over `warmup_steps`, then linear decay lr -> 0 at `total_steps`."""
    warmup = min(config.warmup_steps, total_steps)
    decay = optax.linear_schedule(config.lr, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], boundaries=[warmup])


ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # AdamW's moment decays and denominator eps (optax's defaults)


def make_optimizer(config: TrainConfig, total_steps: int, *, eps_root: float = 0.0) -> optax.GradientTransformation:
    """AdamW on `make_schedule` (and optional global-norm clipping).

    `eps_root` is optax's term inside the square root, sqrt(nu_hat + eps_root). Training uses 0; differentiating
    through training (`jaxinf.groundtruth`) uses a tiny one (1e-30), which changes no update above rounding but
    keeps d sqrt(nu)/d nu finite where nu = 0 (e.g. LoRA A at step 1, whose gradient is 0 while B = 0)."""
    parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
    parts.append(optax.adamw(make_schedule(config, total_steps), b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                             weight_decay=config.weight_decay, eps_root=eps_root))
    return optax.chain(*parts)


def example_order(seed: int, n_rows: int, step: int, batch_size: int) -> np.ndarray:
    """Row indices of step `step`: a window of the stream of per-epoch permutations (host-side, deterministic)."""
    start = step * batch_size
    positions = np.arange(start, start + batch_size)
    epochs = positions // n_rows
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_rows)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n_rows]
    return out


def _tree_norm(tree) -> jax.Array:
    """sqrt(sum of squares of every entry), over one concatenated vector: a LoRA tree has 4 leaves per layer, and
    one reduction per leaf (optax.global_norm) made XLA compile 120 loops per norm for SmolLM2 (1.06 s, against
    0.04 s for this form)."""
    leaves = jax.tree.leaves(tree)
    flat = jnp.concatenate([jnp.ravel(x) for x in leaves]) if len(leaves) > 1 else jnp.ravel(leaves[0])
    flat = flat.astype(jnp.promote_types(flat.dtype, jnp.float32))  # bfloat16 squares summed in float32
    return jnp.sqrt(jnp.vdot(flat, flat))


def data_order(config: TrainConfig, n_rows: int) -> np.ndarray:
    """Row indices of every step, [total_steps, batch_size]: `example_order` for steps 0..S-1 (host-side)."""
    total = config.total_steps(n_rows)
    return np.stack([example_order(config.seed, n_rows, s, config.batch_size) for s in range(total)])


def step_rng(seed: int, step) -> jax.Array:
    """Dropout key of optimiser step `step` (an int or a traced scalar): fold_in(key(seed), step)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def weighted_gradient(fns: LMFunctions, grad_accum: int, mesh=None):
    """The pure weighted batch gradient, shared by `weighted_step` and the adjoint of `jaxinf.groundtruth`:

        (base, trainable, batch, weights [B], rng) -> (loss, grads, slot_losses [B]),

    loss = (1/B) sum_b weights[b] L_b (the mean over the batch slots, so weights = 1 is the ordinary mean loss and
    a weight 0 masks a slot without changing the other slots' data) and grads its gradient, computed over
    `grad_accum` micro-batches of B / grad_accum slots (micro-batch i uses LoRA-dropout key fold_in(rng, i)) and
    averaged; slot_losses are the unweighted L_b with those keys (so d grads / d weights[b] = grad L_b / B).
    With a `mesh` (`jaxinf.sharding`) each micro-batch is split over its data axis (the gradient mean becomes an
    all-reduce); pass base weights and batch placed with `sharding.shard_params` / `sharding.shard_rows`.
    """

    def gradient(base, trainable, batch, weights, rng):
        lm = fns.with_base(base)

        def loss_fn(p, mb, mw, key):
            per_example = lm.per_example_loss(p, mb, key)
            return jnp.mean(mw * per_example), per_example

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), (batch, weights))
        if mesh is not None:  # split each micro-batch over the data axis, not the accumulation axis
            micro = jax.lax.with_sharding_constraint(micro, jax.NamedSharding(mesh, jax.P(None, sharding.DATA)))

        def accumulate(carry, inputs):
            i, (mb, mw) = inputs
            (loss, per_example), grads = grad_fn(trainable, mb, mw, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), per_example

        dtype = jax.eval_shape(loss_fn, trainable, *jax.tree.map(lambda x: x[0], micro), rng)[0].dtype
        zero = (jnp.zeros((), dtype), jax.tree.map(jnp.zeros_like, trainable))
        (loss, grads), per_example = jax.lax.scan(accumulate, zero, (jnp.arange(grad_accum), micro))
        return loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads), per_example.reshape(-1)

    return gradient


def weighted_step(fns: LMFunctions, optimizer: optax.GradientTransformation, grad_accum: int, mesh=None):
    """The pure (unjitted) optimiser step with per-slot weights, shared by `make_train_step` and the scanned
    trainer of `jaxinf.groundtruth`:

        (base, trainable, opt_state, batch, weights [B], rng) -> (trainable, opt_state, loss, grads, updates),

    the `optimizer` applied to `weighted_gradient`'s gradient of (1/B) sum_b weights[b] L_b.
    """
    gradient = weighted_gradient(fns, grad_accum, mesh)

    def step(base, trainable, opt_state, batch, weights, rng):
        loss, grads, _ = gradient(base, trainable, batch, weights, rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, grads, updates

    return step


def make_train_step(fns: LMFunctions, optimizer: optax.GradientTransformation, grad_accum: int, mesh=None):
    """jit-compiled step: (trainable, opt_state, init, batch, rng) -> (trainable, opt_state, metrics).

    The frozen base weights enter the compiled step as an argument (see `LMFunctions.with_base`).
    It is `weighted_step` with every weight 1. With a `mesh` the base weights are FSDP-sharded over its model axis.
    """
    step = weighted_step(fns, optimizer, grad_accum, mesh)

    @jax.jit
    def step_with_base(base, trainable, opt_state, init, batch, rng):
        ones = jnp.ones(batch["input_ids"].shape[:1], jax.tree.leaves(trainable)[0].dtype)
        new, opt_state, loss, grads, updates = step(base, trainable, opt_state, batch, ones, rng)
        metrics = {
            "loss": loss,
            "grad_norm": _tree_norm(grads),
            "update_norm": _tree_norm(updates),
            "param_norm": _tree_norm(new),
            "dist_from_init": _tree_norm(jax.tree.map(jnp.subtract, new, init)),
        }
        return new, opt_state, metrics

    return functools.partial(step_with_base, sharding.shard_params(fns.model.params, mesh))


def checkpoint_manager(workdir: str, keep: Optional[int] = None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )


def restore_checkpoint(workdir: str, abstract: Any, step: Optional[int] = None) -> tuple[int, Any]:
    """(step, state) of checkpoint `step` (default: the latest) with the structure of `abstract`."""
    with checkpoint_manager(workdir) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: run experiments.finetune first")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        return step, mngr.restore(step, args=ocp.args.StandardRestore(target))


def checkpoint_steps(workdir: str) -> list[int]:
    with checkpoint_manager(workdir) as mngr:
        return sorted(mngr.all_steps())


def _read_log(path: str, upto: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _write_log(path: str, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _check_run_config(workdir: str, run_config: dict) -> None:
    guard(os.path.join(workdir, "run_config.json"), run_config, what="a run",
          fix="use a new --workdir or the same flags to resume")


def train(
    fns: LMFunctions,
    init_trainable: Any,
    data: dict,
    config: TrainConfig,
    workdir: str,
    *,
    run_config: Optional[dict] = None,
    stop_after: Optional[int] = None,
    mesh=None,
) -> tuple[Any, list[dict]]:
    """Fine-tune `init_trainable` on `data` (arrays with BATCH_KEYS, [N, T]); resume from `workdir` if possible.

    Writes `workdir/checkpoints/<step>` (orbax; step 0 = the initial adapters, then every `checkpoint_every`
    steps and the last step) and `workdir/convergence.jsonl` (one line per step). `stop_after` ends this call
    after that many steps in total (with a checkpoint), as an interruption would. Ctrl-C also saves and stops.
    Returns the trainable parameters and the convergence log. `mesh` (`jaxinf.sharding`, optional): data-parallel
    steps (rows per micro-batch must divide over its data axis), FSDP-sharded base weights; the same numbers.
    """
    for key in BATCH_KEYS:
        if key not in data:
            raise KeyError(f"training data lacks {key!r}: tokenise rows with jaxinf.data.tokenize_rows")
    n_rows = int(data["input_ids"].shape[0])
    config.validate(n_rows)
    total = config.total_steps(n_rows)
    os.makedirs(workdir, exist_ok=True)
    _check_run_config(workdir, dict(run_config or {}, **dataclasses.asdict(config), n_rows=n_rows,
                                    seq_len=int(data["input_ids"].shape[1])))
    optimizer = make_optimizer(config, total)
    schedule = make_schedule(config, total)
    if mesh is not None:
        sharding.check_divisible(config.batch_size // config.grad_accum, mesh,
                                 "rows per micro-batch (batch_size / grad_accum)")
        init_trainable = sharding.replicate(init_trainable, mesh)
    step_fn = make_train_step(fns, optimizer, config.grad_accum, mesh)
    rng = jax.random.key(config.seed)
    log_path = os.path.join(workdir, "convergence.jsonl")

    state = {"trainable": init_trainable, "opt_state": optimizer.init(init_trainable)}
    with checkpoint_manager(workdir, config.keep_checkpoints) as mngr:
        start = mngr.latest_step()
        if start is None:
            start = 0
            mngr.save(0, args=ocp.args.StandardSave(state))
        else:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            state = mngr.restore(start, args=ocp.args.StandardRestore(target))
            progress_log(f"resumed from step {start} of {workdir}")
        log = _read_log(log_path, start)
        _write_log(log_path, log)
        end = total if stop_after is None else min(total, stop_after)
        trainable, opt_state = sharding.replicate((state["trainable"], state["opt_state"]), mesh)  # one compilation
        init_trainable = sharding.replicate(init_trainable, mesh)
        step = start
        bar = Stage("fine-tune", total, unit="step", initial=start, enabled=start < end)  # plain lines off a tty
        try:
            with open(log_path, "a") as log_file:
                while step < end:
                    idx = example_order(config.seed, n_rows, step, config.batch_size)
                    batch = {k: jnp.asarray(np.asarray(data[k])[idx]) for k in BATCH_KEYS}
                    batch = sharding.shard_rows(batch, mesh)
                    trainable, opt_state, metrics = step_fn(trainable, opt_state, init_trainable, batch,
                                                            jax.random.fold_in(rng, step))
                    step += 1
                    row = {"step": step, "epoch": step * config.batch_size / n_rows,
                           "lr": float(schedule(step - 1)),
                           **{k: float(v) for k, v in metrics.items()}}
                    if not all(math.isfinite(row[k]) for k in ("loss", "grad_norm")):
                        # row `step` is the loss of the parameters after step-1 updates: checkpoints <= step-2 are good
                        good = max([k for k in mngr.all_steps() if k <= step - 2], default=None)
                        raise FloatingPointError(health.nonfinite_message(row, good, workdir))
                    log.append(row)
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    bar.update(1, loss=row["loss"])
                    if step % config.checkpoint_every == 0 or step == end:
                        mngr.save(step, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
        except KeyboardInterrupt:
            warn(f"interrupted at step {step}: saving a checkpoint to resume from")
            if step not in mngr.all_steps():
                mngr.save(step, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
            raise
        finally:
            bar.close()
            mngr.wait_until_finished()
    health.report(workdir, log, float(_tree_norm(init_trainable)))  # warnings in the log, workdir/health.json
    return trainable, log
