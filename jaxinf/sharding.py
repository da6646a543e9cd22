"""Multi-device placement: a `data` x `model` device mesh, data-parallel batches, FSDP-sharded frozen weights.

The heavy stages (fine-tuning steps, per-example gradients, K-FAC/EK-FAC passes, pairwise scores) are ordinary
`jax.jit` functions; with a mesh they receive their inputs already placed and XLA's SPMD partitioner splits the
work ("computation follows data"):

  * batches / gradient chunks: leading (example) axis split over the `data` axis, `P("data")`;
  * trainable parameters (LoRA adapters), optimiser state, preconditioned queries: replicated, `P()`;
  * frozen base weights: FSDP style, each leaf split over the `model` axis along its largest dimension divisible
    by the axis size (leaves with no such dimension are replicated). XLA gathers them where a layer needs them.

Every reduction over examples (a loss mean, a factor sum sum_n a a^T, a score row) is then a per-device partial
sum followed by an all-reduce that XLA inserts: the same mathematics as on one device, up to float summation
order. A mesh of None means "no placement": every function here returns its input unchanged, so the
single-device code path and its numbers are exactly those without this module.

Batch sizes must split evenly over the data axis. Where extra rows cannot change a result, callers pad
(`pad_rows`): per-example gradient chunks (padding rows are dropped), K-FAC passes and contracted scores
(padding rows have attention_mask = loss_mask = 0, so they add exactly zero to every sum and their score columns
are dropped). A training batch is refused instead (a padded row would change the mean loss): `check_divisible`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)
PyTree = Any


def parse_mesh(spec: Optional[str], devices=None, *, flag: str = "--mesh") -> Optional[Mesh]:
    """Mesh from "data=8" / "data=2,model=4" over `devices` (default: all of `jax.devices()`); None for ""/None.

    The product of the axis sizes must equal the number of devices; an axis left out has size 1.
    """
    if spec is None or not str(spec).strip():
        return None
    devices = list(jax.devices() if devices is None else devices)
    sizes = {}
    for part in str(spec).split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in AXES or name in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{flag}={spec!r}: each entry must be data=<n> or model=<n> (n >= 1, each axis at most "
                             "once), e.g. --mesh=data=8 or --mesh=data=2,model=4")
        sizes[name] = int(value)
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"{flag}={spec!r} asks for {int(np.prod(shape))} devices but {len(devices)} are available: "
                         f"make the product of the axis sizes {len(devices)} (e.g. {flag}=data={len(devices)}), or "
                         "expose that many devices (XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU)")
    return make_mesh(shape, devices)


def make_mesh(shape: tuple[int, int], devices=None) -> Mesh:
    """Mesh of shape (data, model) over `devices` (default: all), both axes in automatic (SPMD) sharding mode."""
    devices = list(jax.devices() if devices is None else devices)
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def data_size(mesh: Optional[Mesh]) -> int:
    """Size of the mesh's data axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape.get(DATA, 1))


def model_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else int(mesh.shape.get(MODEL, 1))


def describe(mesh: Optional[Mesh]) -> str:
    """"data=8,model=1 (8 cpu devices)" or "single device"."""
    if mesh is None:
        return "single device"
    where = f"{mesh.devices.size} {mesh.devices.flat[0].platform} devices"
    return f"{DATA}={data_size(mesh)},{MODEL}={model_size(mesh)} ({where})"


def round_up(n: int, mesh: Optional[Mesh]) -> int:
    """Smallest multiple of the data-axis size that is >= n."""
    d = data_size(mesh)
    return -(-int(n) // d) * d


# ------------------------------------------------------------------------------------------------ placement
def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis over `data`, the rest whole."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def check_divisible(n: int, mesh: Optional[Mesh], what: str) -> None:
    """Raise a one-line error when `n` rows cannot be split evenly over the data axis."""
    d = data_size(mesh)
    if n % d:
        raise ValueError(f"{what} is {n}, not a multiple of the mesh's data axis ({d}): choose a multiple of {d} "
                         f"or a smaller --mesh data axis")


def shard_rows(tree: PyTree, mesh: Optional[Mesh], what: str = "the batch size") -> PyTree:
    """Place every leaf [N, ...] with its leading axis split over `data` (refuses N not divisible; see pad_rows)."""
    if mesh is None:
        return tree
    leaves = jax.tree.leaves(tree)
    if leaves:
        check_divisible(int(np.shape(leaves[0])[0]), mesh, what)
    return jax.tree.map(lambda x: jax.device_put(x, rows_sharding(mesh, np.ndim(x))), tree)


def replicate(tree: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Place every leaf whole on every device of the mesh (adapters, optimiser state, queries); without a mesh,
    commit it to the default device. Committed and uncommitted arguments are different cache entries of a
    `jax.jit` function, so a loop whose state starts uncommitted (numpy, `jnp.zeros`, an orbax restore) and
    continues with the compiled function's committed outputs would compile its step twice (20-90 s on SmolLM2)."""
    if mesh is None:
        return jax.device_put(tree, jax.local_devices()[0])
    return jax.device_put(tree, replicated(mesh))


def fsdp_spec(shape: tuple, axis_size: int) -> P:
    """P with MODEL on the largest dimension divisible by `axis_size` (the first such on ties); P() if none."""
    if axis_size <= 1:
        return P()
    best = None
    for i, n in enumerate(shape):
        if n % axis_size == 0 and n >= axis_size and (best is None or n > shape[best]):
            best = i
    if best is None:
        return P()
    return P(*[MODEL if i == best else None for i in range(len(shape))])


def shard_params(params: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Frozen base weights FSDP-sharded over the `model` axis (`fsdp_spec` per leaf), replicated over `data`."""
    if mesh is None or params is None:
        return params
    m = model_size(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(np.shape(x), m))), params)


def pad_rows(arrays: dict, multiple: int, *, zero_mask: bool = True) -> tuple[dict, int]:
    """(arrays padded to a multiple of `multiple` rows, original row count).

    zero_mask=True: the extra rows repeat row 0's tokens with attention_mask = loss_mask = 0, so they contribute
    exactly zero to masked sums (K-FAC statistics, captured gradients); otherwise they repeat the last row.
    """
    n = int(np.shape(next(iter(arrays.values())))[0])
    extra = (-n) % multiple
    if extra == 0:
        return arrays, n
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        fill = np.repeat(v[:1] if zero_mask else v[-1:], extra, axis=0)
        if zero_mask and k in ("attention_mask", "loss_mask"):
            fill = np.zeros_like(fill)
        out[k] = np.concatenate([v, fill], axis=0)
    return out, n


def shard_padded_rows(x, mesh: Optional[Mesh]) -> tuple[Any, int]:
    """(matrix [N', ...] with N' = N rounded up to the data axis, its last row repeated, split over `data`; N).

    For row-wise results (score columns, per-row values) whose extra entries the caller drops with [:N].
    """
    n = int(np.shape(x)[0])
    if mesh is None:
        return x, n
    extra = round_up(n, mesh) - n
    if extra:
        x = jax.numpy.concatenate([jax.numpy.asarray(x), jax.numpy.repeat(jax.numpy.asarray(x)[-1:], extra, 0)])
    return shard_rows(x, mesh), n
