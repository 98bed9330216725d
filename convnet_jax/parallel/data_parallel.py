"""Data parallelism: a one-axis device mesh, batches split over it, everything else mirrored.

Words used here and nowhere else: a *mirrored* array has a full copy on every device of the mesh
(JAX calls that sharding "replicated"; in this package a *replica* is one of several models trained
together, see `replicas.py`). A *split* batch has its leading axis divided over the devices.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axis that data parallelism splits batches over.
DATA_AXIS = "data"


def create_mesh(num_devices: int) -> Mesh | None:
  """A one-axis ("data") mesh over the first `num_devices` devices of all processes (0: all of
  them), or None for one device, which then runs the plain single-device program."""
  devices = jax.devices()
  count = num_devices or len(devices)
  if count == 1:
    return None
  return Mesh(np.asarray(devices[:count]), (DATA_AXIS,))


def tpu_chips_here() -> bool:
  """Whether this machine has TPU chips, by JAX's own test (private, so guarded: True when it
  cannot tell, so that callers then leave JAX's TPU set-up alone)."""
  try:
    from jax._src import hardware_utils

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:
    return True


def tracing_mesh(mesh: Mesh | None):
  """A context in which programs are traced for `mesh`: it makes the mesh JAX's context mesh,
  from which the oneDNN convolutions learn to run per device (`conv.split_mesh`; BatchNorm
  then keeps to its pure-JAX path)."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def mesh_size(mesh: Mesh | None) -> int:
  """The number of devices a run uses: the mesh's, or 1 without one."""
  return mesh.size if mesh is not None else 1


def split_sharding(mesh: Mesh | None) -> NamedSharding | None:
  """Batches split along their leading axis over the mesh (None without a mesh)."""
  return None if mesh is None else NamedSharding(mesh, P(DATA_AXIS))


def mirrored_sharding(mesh: Mesh | None) -> NamedSharding | None:
  """A full copy on every device of the mesh (None without a mesh)."""
  return None if mesh is None else NamedSharding(mesh, P())


def split_batch(batch: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  """Splits a batch (leading axis) over the data-parallel devices of `sharding`. The math is
  unchanged: the compiler partitions the step and all-reduces what spans the global batch (the
  gradients, the loss and BatchNorm's mean and variance), so results match one device. A batch
  that does not divide evenly (a short last batch) stays whole on every device."""
  if sharding is None or batch.shape[0] % sharding.mesh.size:
    return batch
  return jax.lax.with_sharding_constraint(batch, sharding)


def put_mirrored(tree, mesh: Mesh | None):
  """Host arrays -> device arrays, a full copy on every device of the mesh. Built from each
  process's own copy of the data, so it also works when the mesh spans several processes."""
  if mesh is None:
    return jax.device_put(tree)
  sharding = mirrored_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]),
      tree)
