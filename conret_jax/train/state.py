"""The training state: one pytree holding everything a resumed run needs."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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


def create_train_state(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array,
                       image_hw: tuple[int, int]) -> TrainState:
  """A fresh state: initialized variables, zero optimizer state, step 0. Pure, so it can run under
  `jax.jit(..., out_shardings=...)` and materialize each shard on its own device."""
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats, frozen = split_variables(detector.init_variables(model, init_rng, image_hw))
  tx = optimizer(config, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, frozen=frozen,
                    opt_state=tx.init(params), rng=jax.random.key_data(state_rng))

