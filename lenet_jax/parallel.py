"""Data parallelism over every device with ``jax.sharding``: one mesh axis, batches split, params copied.

One process with several devices (a multi-GPU machine, or CPU devices simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) needs nothing but ``data_mesh()``. Several
hosts call ``jax.distributed.initialize()`` first (``scripts/train.py --distributed``); every host then
loads the whole dataset (MNIST is small) and ``make_global`` places on each device the shard it owns,
so the same jitted code runs on a mesh over every host's devices.

The jitted functions are not rewritten for this: XLA partitions them from the shardings of their
inputs (batch rows split over the ``"data"`` axis, parameters replicated) and inserts the gradient
all-reduce itself.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def default_mesh() -> Mesh | None:
    """``data_mesh()`` when more than one device is present, else ``None`` (plain single device)."""
    return data_mesh() if jax.device_count() > 1 else None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch_size: int, mesh: Mesh | None) -> None:
    """Raises ``ValueError`` unless ``batch_size`` splits evenly over the mesh's devices."""
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch size {batch_size} does not split over {mesh.size} devices; "
            f"use a multiple of {mesh.size}"
        )


def make_global(x, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from the same full host array on every process."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` copied to every device of ``mesh`` (of every host: the leaves must
    hold the same values on every process)."""
    sharding = replicated(mesh)

    def put(a):
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sharding, a.ndim):
            return a  # already there: no round trip through the host
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = make_global(jax.random.key_data(a), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return make_global(a, sharding)

    return jax.tree_util.tree_map(put, tree)


def shard_batch(x, mesh: Mesh):
    """``x`` padded with zero rows to a multiple of the device count and split along its batch axis.

    Returns:
      ``(x_sharded, n)``: the sharded array and the number of real rows (slice results with
      ``[:n]``).
    """
    n = x.shape[0]
    pad = -n % mesh.size
    if pad:
        x = np.concatenate([np.asarray(x), np.zeros((pad, *x.shape[1:]), np.asarray(x).dtype)])
    return make_global(x, batch_sharding(mesh)), n


def constrain_batch(tree, mesh: Mesh | None):
    """Inside ``jit``: asks XLA to split every leaf of ``tree`` along its batch axis."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))


def sharded_call(fn, mesh: Mesh | None, params, x, *rest):
    """``fn(params, x, *rest)`` with ``x`` (and array ``rest`` arguments with the same batch) split
    over ``mesh`` and ``params`` replicated; the result has ``x``'s batch length.

    ``fn`` is typically an explainer, ``attribution.explainer("lrp", model, x_spec)``.
    With ``mesh=None`` it is a plain call.
    """
    if mesh is None:
        return fn(params, x, *rest)
    xs, n = shard_batch(np.asarray(x), mesh)
    rest = [shard_batch(np.asarray(r), mesh)[0] if np.ndim(r) else r for r in rest]
    out = fn(replicate(params, mesh), xs, *rest)

    def local(a):  # on several hosts, every process gets the whole result
        if not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            a = multihost_utils.process_allgather(a, tiled=True)
        return a[:n]

    return jax.tree_util.tree_map(local, out)
