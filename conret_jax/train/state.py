"""The training state: its type (one pytree holding everything a resumed run needs), its optimizer, and its creation,
fresh or abstract (shapes and shardings only, the target of a checkpoint restore)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from conret_jax import detectors
from conret_jax import mesh as mesh_lib
from conret_jax.train import optim


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: trained weights; batch_stats: BN statistics ({} without trainable BN);
  frozen: other non-trained collections, e.g. frozen BN ({} if none); opt_state: optax state;
  rng: uint32 [2] raw key data (orbax saves plain arrays)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array

  def variables(self) -> dict:
    """The flax variables for `model.apply` and `conret_jax.detect`."""
    variables = {'params': self.params}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    variables.update(self.frozen)
    return variables


def optimizer(config: ml_collections.ConfigDict, params_tree):
  """The run's optax transformation, with the detector's frozen parameters masked out.
  `params_tree`: anything with the params' structure (arrays or shapes); the detector owns its module names."""
  return optim.make_optimizer(config.train, detectors.from_config(config).trainable_mask(params_tree))


def init_compiler_options(devices) -> dict | None:
  """Compiler options for a one-off initialization program on `devices`: on CPU, LLVM's lowest optimization level.

  LLVM spends almost all of that compile on the unrolled threefry generators of the parameter initializers (about 4x
  faster at level 0: bench/RESULTS.md). The program runs once, so its own speed does not matter. A few normal draws
  can then differ from the default level's in the last bit, the same way for every run and topology. Other
  platforms keep their defaults.
  """
  if all(d.platform == 'cpu' for d in devices):
    return {'xla_backend_optimization_level': 0}
  return None


def split_variables(variables: dict) -> tuple[Any, Any, dict]:
  """flax variables -> (params, batch_stats, every other collection)."""
  variables = flax.core.unfreeze(variables)
  params = variables.pop('params')
  batch_stats = variables.pop('batch_stats', {})
  return params, batch_stats, variables


def create_train_state(
  model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array, image_hw: tuple[int, int]
) -> TrainState:
  """A fresh state: initialized variables, zero optimizer state, step 0. Pure, so it can run under
  `jax.jit(..., out_shardings=...)` and materialize each shard on its own device."""
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats, frozen = split_variables(detectors.init_variables(model, init_rng, image_hw))
  tx = optimizer(config, params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    frozen=frozen,
    opt_state=tx.init(params),
    rng=jax.random.key_data(state_rng),
  )


def _create_fn(model: nn.Module, config: ml_collections.ConfigDict, image_hw=None):
  # Parameters do not depend on the image size: initialize on the smallest input the network takes.
  image_hw = tuple(image_hw or detectors.from_config(config, model).input_size.smallest())
  return lambda rng: create_train_state(model, config, rng, image_hw)


def abstract_state(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh):
  """The TrainState's shapes and dtypes (no memory, no compilation), each leaf carrying its sharding on `mesh`:
  the target of a checkpoint restore, which then never builds a fresh state first."""
  abstract = jax.eval_shape(_create_fn(model, config), jax.random.PRNGKey(0))
  shardings = mesh_lib.state_shardings(mesh, abstract)
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def shardings_of(abstract) -> object:
  """The sharding pytree of an abstract (or concrete) state."""
  return jax.tree_util.tree_map(lambda a: a.sharding, abstract)


def init_state(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  rng: jax.Array,
  image_hw: tuple[int, int] | None = None,
  shardings=None,
) -> tuple[TrainState, object]:
  """A fresh state created directly in its shardings (no full copy on one device). Returns (state, shardings).

  `shardings` (from `shardings_of(abstract_state(...))`) saves tracing the initialization a second time."""
  if shardings is None:
    shardings = shardings_of(abstract_state(model, config, mesh))
  create = jax.jit(
    _create_fn(model, config, image_hw),
    out_shardings=shardings,
    compiler_options=init_compiler_options(mesh.devices.flat),
  )
  return create(rng), shardings
