"""Device mesh, shardings and global-batch assembly for data parallelism.

tljax trains data-parallel with `jax.jit` over a one-axis ('data',) mesh: the
batch is sharded along its leading axis, params and optimizer state are
replicated, and XLA inserts the gradient all-reduce. The same code runs on one
CPU, eight GPUs or a TPU pod (one process per host).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-dimensional mesh over all (global) devices, axis name 'data'.

    Args:
      devices: devices to use; defaults to every device of every process.

    Returns:
      A `jax.sharding.Mesh` with the single axis `DATA_AXIS`.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding that places a full copy on every device (params, opt state)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis across the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(name: str, global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """Fails early, with a clear message, if a batch cannot be split evenly.

    Args:
      name: what the batch is (used in the message), e.g. 'train.batch_size'.
      global_batch_size: batch size summed over all devices.
      mesh: the data mesh.

    Raises:
      ValueError: if `global_batch_size` is not a multiple of the device count
        and of the process count.
    """
    num_devices = mesh.devices.size
    suggestion = max(num_devices, global_batch_size // num_devices * num_devices)
    if global_batch_size % num_devices or global_batch_size % jax.process_count():
        raise ValueError(
            f"{name}={global_batch_size} is not divisible by the number of devices "
            f"({num_devices} devices over {jax.process_count()} processes); choose a multiple "
            f"of {num_devices}, e.g. {suggestion}."
        )


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds.

    Every process computes the same global batch (sampling is seeded by step),
    then keeps only its own contiguous slice, so results do not depend on the
    number of hosts.

    Args:
      global_batch_size: rows in the global batch.

    Returns:
      A slice selecting this process's rows.
    """
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def global_batch(host_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
    """Assembles per-process rows into globally sharded arrays.

    Args:
      host_batch: this process's rows of every batch entry (leading axis = rows).
      mesh: the data mesh.

    Returns:
      Dict of `jax.Array`s sharded along the batch axis over `mesh`.
    """
    sharding = batch_sharded(mesh)
    num_processes = jax.process_count()

    def assemble(local):
        global_shape = (local.shape[0] * num_processes, *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return {key: assemble(value) for key, value in host_batch.items()}
