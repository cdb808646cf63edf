"""The training state: its type (one pytree holding everything a resumed run needs), its optimizer, and its creation,
fresh or abstract (shapes and shardings only, the target of a checkpoint restore)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from conret_jax import mesh as mesh_lib
from conret_jax.model import detector
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
  """The run's optax transformation, with the backbone's frozen prefix (`backbone.freeze_at`) masked out.
  `params_tree`: anything with the params' structure (arrays or shapes); the model owns its module names."""
  return optim.make_optimizer(config, detector.trainable_mask(params_tree, config))


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
  params, batch_stats, frozen = split_variables(detector.init_variables(model, init_rng, image_hw))
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
  # Parameters do not depend on the image size: initialize on the smallest input the anchors can tile.
  stride = 2 ** int(config.model.fpn.max_level)
  image_hw = tuple(image_hw or (stride, stride))
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
    compiler_options=detector.init_compiler_options(mesh.devices.flat),
  )
  return create(rng), shardings
