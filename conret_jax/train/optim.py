"""The optimizer: SGD with momentum, coupled weight decay, linear warm-up and step decay (Detectron's recipe).

The learning rate scales linearly with the global batch (Goyal et al.): `learning_rate` is the rate at
`reference_batch_size` images (Detectron: 0.01 at 16). The warm-up length and the decay points follow
`num_steps` (fractions of it) unless absolute steps are given, so shortening a run shortens its whole schedule.

Parameters fall into four groups, each with its own learning-rate factor and coupled L2 weight decay (added to the
gradient before momentum, as Detectron and torch.optim.SGD do):
  weight  conv and dense kernels              lr x 1                weight_decay
  bias    conv and dense biases               lr x bias_lr_factor   bias_weight_decay
          (Detectron, lib/modeling/optimizer.py: BIAS_DOUBLE_LR and no BIAS_WEIGHT_DECAY, i.e. x2 and 0;
          torchvision's detection recipe treats biases like weights: x1 and weight_decay)
  norm    GroupNorm / BatchNorm scales, offsets   lr x 1            none
  frozen  the backbone prefix below freeze_at  no update at all (weight decay included)
The group structure is the same for every config, so the optimizer state's layout depends only on the parameters.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from conret_jax import defaults

GROUPS = ('weight', 'bias', 'norm', 'frozen')


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """step -> learning rate (defaults.learning_rate, traced)."""
  return functools.partial(defaults.learning_rate, train_config, xp=jnp)


def _is_norm_param(names: list[str]) -> bool:
  return any('norm' in n or n.startswith('bn') or n.startswith('gn') for n in names[:-1]) or names[-1] == 'scale'


def param_groups(params, trainable=None):
  """Pytree of group names like `params` (see the module docstring); `trainable` False marks 'frozen'."""

  def group(path, _):
    names = [str(getattr(p, 'key', p)).lower() for p in path]
    if _is_norm_param(names):
      return 'norm'
    return 'bias' if names[-1] == 'bias' else 'weight'

  groups = jax.tree_util.tree_map_with_path(group, params)
  if trainable is None:
    return groups
  return jax.tree_util.tree_map(lambda g, keep: g if keep else 'frozen', groups, trainable)


def weight_decay_mask(params):
  """True for parameters that the base weight decay applies to (kernels; biases have their own setting)."""
  return jax.tree_util.tree_map(lambda g: g == 'weight', param_groups(params))


def _sgd(
  train_config: ml_collections.ConfigDict, lr_factor: float, weight_decay: float
) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_config)
  # Always both links, even at weight decay 0: the state's layout must not depend on the settings.
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.sgd(lambda step: lr_factor * schedule(step), momentum=train_config.momentum),
  )


def make_optimizer(train_config: ml_collections.ConfigDict, trainable=None) -> optax.GradientTransformation:
  """Optional global-norm clipping, then per-group SGD(momentum) with coupled weight decay.

  Args:
    train_config: config.train.
    trainable: optional pytree of bools like params; False leaves are frozen (no update, no decay).
  The schedule reads the optimizer state's step counts; `at_step` keeps them equal to the train step.
  """
  t = train_config
  groups = {
    'weight': _sgd(t, 1.0, float(t.weight_decay)),
    'bias': _sgd(t, float(t.bias_lr_factor), float(t.bias_weight_decay)),
    'norm': _sgd(t, 1.0, 0.0),
    'frozen': optax.set_to_zero(),
  }
  # Clipping sees every gradient (frozen ones are zero: the forward stops them); identity keeps the layout when off.
  clip = optax.clip_by_global_norm(t.grad_clip_norm) if t.grad_clip_norm > 0 else optax.identity()
  return optax.chain(clip, optax.multi_transform(groups, lambda params: param_groups(params, trainable)))


def at_step(opt_state, step: jax.Array):
  """`opt_state` with every step count set to `step`, so the rate the update applies is `learning_rate_schedule`
  at the train step. The counts advance with each update, but a dropped (non-finite) update restores them while the
  train step moves on: without this the schedule would lag by one step per skip."""
  return optax.tree_utils.tree_set(opt_state, count=jnp.asarray(step, jnp.int32))
