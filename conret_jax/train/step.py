"""The train step: a pure `(state, batch) -> (state, metrics)`, jitted once with explicit shardings.

It talks to a detector (conret_jax/detectors.py): the network's outputs, its anchors and its loss. For ConRetinaNet
everything the paper adds runs inside it on the devices: decoding the first regression into refined anchors,
matching them at the stage's thresholds, and the losses of Eq. 1 and 2 (`conret_jax.consistent`). The state is
donated, so parameters and optimizer state are updated in place. A non-finite loss or gradient leaves the state
unchanged (the update is dropped on device) and is reported in `metrics['finite']`, so the loop can stop with the
last good state instead of training on NaNs. The learning rate applied at step t is the schedule's at t (the logged
`learning_rate`), skipped steps or not.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from conret_jax import detectors
from conret_jax import mesh as mesh_lib
from conret_jax.batch import Batch
from conret_jax.train import optim
from conret_jax.train import state as state_lib
from conret_jax.train.state import TrainState


def make_step_fn(model: nn.Module, config: ml_collections.ConfigDict, params_tree) -> Callable:
  """The un-jitted step. `params_tree` is any pytree with the params' structure (arrays or shapes); the batch is a
  Batch or a mapping of its training fields (conret_jax/batch.py)."""
  detector = detectors.from_config(config, model)
  tx = state_lib.optimizer(config, params_tree)
  schedule = optim.learning_rate_schedule(config.train)

  def step_fn(state: TrainState, batch) -> tuple[TrainState, dict]:
    batch = Batch.of(batch).train_view()
    anchors = detector.anchors(tuple(batch.images.shape[1:3]))
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      variables = state.replace(params=params).variables()
      if state.batch_stats:
        outputs, updates = detector.module.apply(
          variables, batch.images, train=True, mutable=['batch_stats'], rngs={'dropout': step_rng}
        )
        batch_stats = updates['batch_stats']
      else:
        outputs = detector.module.apply(variables, batch.images, train=True, rngs={'dropout': step_rng})
        batch_stats = state.batch_stats
      loss, metrics = detector.loss(outputs, anchors, batch)
      return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, optim.at_step(state.opt_state, state.step), state.params)
    new_state = state.replace(
      params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
    )
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Drop a non-finite update on device; the step counter still advances so the loop can name the step.
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite.astype(jnp.float32))
    return new_state, metrics

  return step_fn


def make_train_step(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh, state_shardings):
  """jax.jit of the step over `mesh`: state in `state_shardings` (donated), batch split over all devices,
  metrics replicated. Compiles once per input shape."""
  step_fn = make_step_fn(model, config, state_shardings.params)
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
    out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
