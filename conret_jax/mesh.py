"""The device mesh and the shardings of the state and the batch.

Two axes: 'data' (the batch is split across it) and 'fsdp' (the batch is split across it too, and parameters and
optimizer state are sharded over it, FSDP-style, so a large backbone's state need not fit on every device).
With `fsdp_axis_size=1` every device holds a replica of the state and the step is plain data parallelism.
Collectives are left to XLA's SPMD partitioner: inside `jax.jit` a sum over the batch axis is a global sum.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from conret_jax.errors import ConfigError

DATA_AXES = ('data', 'fsdp')
# Leaves smaller than this stay replicated under FSDP: sharding them saves nothing and costs a gather.
MIN_FSDP_SIZE = 2**14


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices (of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = int(config.train.fsdp_axis_size)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f'config.train.fsdp_axis_size={fsdp} must be >= 1 and divide the {n} devices')
  if config.train.global_batch_size % n:
    raise ConfigError(
      f'config.train.global_batch_size={config.train.global_batch_size} does not divide over '
      f'the {n} devices; use a multiple of {n}'
    )
  if config.eval.global_batch_size % n:
    raise ConfigError(
      f'config.eval.global_batch_size={config.eval.global_batch_size} does not divide over '
      f'the {n} devices; use a multiple of {n}'
    )
  # Auto axes: XLA's partitioner propagates shardings through the model (jax.make_mesh now defaults to Explicit).
  return jax.make_mesh((n // fsdp, fsdp), DATA_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(shape, fsdp: int) -> P:
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  # Shard the largest dimension that divides evenly; conv kernels are [kh, kw, in, out], so this is in or out.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state):
  """NamedShardings for every leaf of a (possibly abstract) state pytree."""
  fsdp = mesh.shape['fsdp']
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _leaf_spec(x.shape, fsdp)), abstract_state)
