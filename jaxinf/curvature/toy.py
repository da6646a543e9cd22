"""Tiny classification problems with every loss form the operators need (for tests/examples).

* ``linear_problem``: softmax regression, params {"linear": {"w", "b"}}; linear in
  the parameters with a convex output loss, so GGN == Hessian.
* ``mlp_problem``: one tanh hidden layer, params {"hidden": {...}, "out": {...}};
  its Hessian is indefinite away from a minimum.

Batches are dicts {"x": [m, d_in], "y": [m] int}.  Loss functions are
module-level so jitted code is shared between problems of equal shapes.
Arrays use JAX's default float dtype (float64 inside ``jax.enable_x64``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
    params: Any
    batches: list
    loss_fn: Callable  # (params, batch) -> scalar
    model_fn: Callable  # (params, batch) -> logits [m, c]
    output_loss_fn: Callable  # (logits, batch) -> scalar
    per_example_loss_fn: Callable  # (params, batch) -> [m]


def cross_entropy_per_example(logits, batch):
    """-log softmax(logits)[y] per example."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]


def cross_entropy(logits, batch):
    return jnp.mean(cross_entropy_per_example(logits, batch))


def linear_model(params, batch):
    return batch["x"] @ params["linear"]["w"] + params["linear"]["b"]


def linear_loss(params, batch):
    return cross_entropy(linear_model(params, batch), batch)


def linear_per_example_loss(params, batch):
    return cross_entropy_per_example(linear_model(params, batch), batch)


def mlp_model(params, batch):
    h = jnp.tanh(batch["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def mlp_loss(params, batch):
    return cross_entropy(mlp_model(params, batch), batch)


def mlp_per_example_loss(params, batch):
    return cross_entropy_per_example(mlp_model(params, batch), batch)


def _batches(rng, num_batches, batch_size, d_in, num_classes, dtype):
    return [
        {
            "x": jnp.asarray(rng.standard_normal((batch_size, d_in)), dtype),
            "y": jnp.asarray(rng.integers(0, num_classes, (batch_size,)), jnp.int32),
        }
        for _ in range(num_batches)
    ]


def linear_problem(seed: int = 0, d_in=8, num_classes=4, batch_size=12, num_batches=3) -> Problem:
    """Softmax regression; data and params drawn from numpy's PCG64 seeded by `seed`."""
    dtype = jnp.zeros(()).dtype
    rng = np.random.default_rng(seed)
    params = {
        "linear": {
            "w": jnp.asarray(0.5 * rng.standard_normal((d_in, num_classes)), dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal((num_classes,)), dtype),
        }
    }
    batches = _batches(rng, num_batches, batch_size, d_in, num_classes, dtype)
    return Problem(params, batches, linear_loss, linear_model, cross_entropy, linear_per_example_loss)


def mlp_problem(seed: int = 0, d_in=8, hidden=12, num_classes=5, batch_size=16, num_batches=3) -> Problem:
    """tanh MLP; data and params drawn from numpy's PCG64 seeded by `seed`."""
    dtype = jnp.zeros(()).dtype
    rng = np.random.default_rng(seed)
    params = {
        "hidden": {
            "w": jnp.asarray(rng.standard_normal((d_in, hidden)) / np.sqrt(d_in), dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal((hidden,)), dtype),
        },
        "out": {
            "w": jnp.asarray(rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden), dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal((num_classes,)), dtype),
        },
    }
    batches = _batches(rng, num_batches, batch_size, d_in, num_classes, dtype)
    return Problem(params, batches, mlp_loss, mlp_model, cross_entropy, mlp_per_example_loss)
