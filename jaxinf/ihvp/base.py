"""The solver protocol shared by every iHVP method.

An ``IHVPSolver`` is built by a factory holding the configuration (like an
optax ``GradientTransformation``), e.g. ``solver = cg(damping=1e-3, tol=1e-8)``:

    state = solver.fit(operator, key=None)   # one-off work: factorise, Krylov basis, scale
    x = solver.apply(state, v)               # x ~ (C + lambda I)^{-1} v, v a parameter pytree
    xs = solver.apply_batched(state, vs)     # vmap over a leading query axis of vs
    x, info = solver.solve(state, v)         # the pure, traceable core (for your own jit/vmap)

``state`` is a pytree (registered dataclass) whose static fields include a
``TreeSpec`` of the parameters; ``apply``/``apply_batched`` check v against it,
run the jitted ``solve`` (compiled once per solver kind and shapes) and raise
``SolverFailedError`` on the host when ``info["ok"]`` is False (non-finite
values, divergence, negative curvature), with a message that names the
damping and other settings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

PyTree = Any


class SolverFailedError(RuntimeError):
    """An iHVP solve produced non-finite values or diverged."""


def state_dataclass(data_fields, meta_fields):
    """Decorator: frozen dataclass registered as a pytree with the given data/static fields."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=list(meta_fields))

    return wrap


@functools.partial(jax.jit, static_argnums=0)
def _jit_solve(solve, state, v):
    return solve(state, v)


@functools.partial(jax.jit, static_argnums=0)
def _jit_solve_batched(solve, state, vs):
    return jax.vmap(solve, in_axes=(None, 0))(state, vs)


def _default_failure(name, state, info) -> str:
    return f"{name}: the solve produced non-finite values"


class IHVPSolver(NamedTuple):
    """fit(operator, key=None) -> state;  solve(state, v) -> (x, info);  apply / apply_batched."""

    name: str
    fit: Callable[..., Any]
    solve: Callable[[Any, PyTree], tuple]
    failure_message: Callable[[str, Any, dict], str] = _default_failure

    def _check(self, state, info) -> None:
        ok = np.asarray(info["ok"])
        if not ok.all():
            host_info = jax.tree.map(np.asarray, info)
            msg = self.failure_message(self.name, state, host_info)
            if ok.ndim:
                msg += f" [{int((~ok).sum())} of {ok.size} queries failed]"
            raise SolverFailedError(msg)

    def apply_with_info(self, state, v: PyTree):
        """(x, info) from the jitted solve; raises SolverFailedError if not info['ok']."""
        state.spec.check(v, "v")
        x, info = _jit_solve(self.solve, state, v)
        self._check(state, info)
        return x, info

    def apply(self, state, v: PyTree) -> PyTree:
        """x ~ (C + lambda I)^{-1} v for one parameter-shaped pytree v."""
        return self.apply_with_info(state, v)[0]

    def apply_batched_with_info(self, state, vs: PyTree):
        """(xs, info) for a stack of Q query vectors (leaves [Q, *leaf]; info leaves [Q]); raises as apply."""
        state.spec.check_batched(vs, "vs")
        xs, info = _jit_solve_batched(self.solve, state, vs)
        self._check(state, info)
        return xs, info

    def apply_batched(self, state, vs: PyTree) -> PyTree:
        """Solve for a stack of Q query vectors (leaves [Q, *leaf]) via vmap."""
        return self.apply_batched_with_info(state, vs)[0]
