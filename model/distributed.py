"""Data-parallel placement for the MNIST trainer: one mesh axis, ``"data"``, over every device.

Each batch is split over ``"data"`` (rows), the parameters are replicated, and the step
is the plain jitted :func:`fusedvjp.model.mlp.sgd_step`: XLA's partitioner (Shardy)
propagates the input shardings through the ops (the mesh axis is ``AxisType.Auto``), so
every device computes the forward and backward of its own rows, and the gradients of
the replicated parameters -- sums over the batch -- come out all-reduced over ``"data"``.
That all-reduce (parameter-sized, plus the loss's scalar) is the only collective of a
step; no activation is gathered (``tests/test_data_parallel.py`` reads the compiled HLO).

The same code runs multi-process (``jax.distributed``; :func:`initialize`): the mesh
spans every process's devices, every process holds the same host data (same seed, same
permutation) and hands JAX only the rows its own devices hold (:func:`process_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedvjp.model import mlp

AXIS = "data"


def initialize(coordinator: str, num_processes: int, process_id: int, **kwargs) -> None:
    """Joins a multi-process run: ``jax.distributed.initialize`` with CPU collectives.

    Must run before anything touches a JAX backend. On CPU, the cross-process
    collectives are gloo's (``jax_cpu_collectives_implementation``; jax 0.11.2 accepts
    ``"gloo"``, its default, ``"mpi"`` and ``"megascale"``); GPUs and TPUs use their own.

    Args:
      coordinator: ``host:port`` of process 0's coordination service.
      num_processes: how many processes take part.
      process_id: this process's index in ``[0, num_processes)``.
      **kwargs: passed on to ``jax.distributed.initialize`` (e.g. ``initialization_timeout``).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: every device of every process).

    The axis is ``Auto``: shardings are propagated by the partitioner from the inputs',
    so the model code needs no sharding annotations.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def check_batch_size(batch_size: int, num_devices: int) -> None:
    """Raises ``ValueError`` naming both numbers unless ``batch_size`` splits evenly."""
    if batch_size % num_devices:
        raise ValueError(
            f"--batch-size {batch_size} is not divisible by the {num_devices} devices of the data-parallel "
            f"mesh: each device takes an equal share of every batch; use a multiple of {num_devices}")


def process_rows(mesh: Mesh, num_rows: int) -> slice:
    """The rows ``[lo, hi)`` of a ``[num_rows, ...]`` batch split over ``"data"`` that this
    process's devices hold (all of them in a single-process run).

    Raises:
      ValueError: this process's rows are not one contiguous range (a mesh whose device
        order interleaves the processes).
    """
    index_map = NamedSharding(mesh, P(AXIS)).addressable_devices_indices_map((num_rows,))
    starts_stops = sorted({(idx[0].indices(num_rows)[:2]) for idx in index_map.values()})
    lo, hi = starts_stops[0][0], starts_stops[-1][1]
    if sum(stop - start for start, stop in starts_stops) != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds rows {starts_stops} of {num_rows}: not contiguous")
    return slice(lo, hi)


def _place(sharding: NamedSharding, value: np.ndarray) -> jax.Array:
    """A global array of the host ``value`` (the same on every process) under ``sharding``."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    if sharding.is_fully_replicated:
        return jax.make_array_from_process_local_data(sharding, value, value.shape)
    rows = process_rows(sharding.mesh, len(value))
    return jax.make_array_from_process_local_data(sharding, value[rows], value.shape)


def replicate(mesh: Mesh, tree):
    """Every leaf copied onto every device of ``mesh``.

    Goes through the host (``jax.device_get``): a ``device_put`` of a device-0 array may
    alias its buffer as device 0's copy, and the donating step would then delete the
    caller's array.
    """
    return jax.tree.map(lambda v: _place(NamedSharding(mesh, P()), v), jax.device_get(tree))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Host arrays ``[B, ...]`` (the global batch) split by rows over ``"data"``.

    A batch whose ``B`` the device count does not divide (an epoch's last partial batch,
    an evaluation tail) is replicated instead: every device computes it whole, which
    gives the same result as the split (the mean over the batch is the same) at a cost
    that matters only for that one small batch.
    """
    out = []
    for a in arrays:
        spec = P(AXIS) if len(a) % mesh.size == 0 else P()
        out.append(_place(NamedSharding(mesh, spec), a))
    return tuple(out)


def lower_train_step(mesh: Mesh, batch_size: int, sizes: Sequence[int] = (784, 512, 10), impl: str = "auto",
                     lr: float = 0.01) -> jax.stages.Lowered:
    """The data-parallel training step (:func:`mlp.sgd_step`, the trainer's) lowered for
    ``mesh``: parameters replicated, a ``[batch_size, sizes[0]]`` batch split over ``"data"``.

    ``.compile().as_text()`` is the per-device HLO module the trainer runs, collectives
    included.
    """
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    params = jax.eval_shape(lambda: mlp.init_params(jax.random.key(0), tuple(sizes)))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), params)
    x = jax.ShapeDtypeStruct((batch_size, sizes[0]), jnp.float32, sharding=rows)
    y = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)
    with jax.set_mesh(mesh):  # as the trainer does: the Pallas kernels are partitioned over it
        return mlp.sgd_step.lower(params, x, y, lr, impl=impl)
