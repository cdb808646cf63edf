"""The optimizer: SGD with momentum, weight decay, linear warm-up and step decay (Detectron's schedule).

The learning rate scales linearly with the global batch (Goyal et al.): `learning_rate` is the rate at
`reference_batch_size` images (Detectron: 0.01 at 16). Weight decay is the coupled L2 form Detectron uses, applied
to kernels and biases but not to normalization scales and offsets. Frozen parameters (the backbone prefix below
`freeze_at`) get no update at all, weight decay included.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """step -> learning rate: linear warm-up from `warmup_factor`, then x`decay_factor` at each of `decay_steps`."""
  t = train_config
  base = t.learning_rate * t.global_batch_size / t.reference_batch_size
  warmup = max(int(t.warmup_steps), 0)
  boundaries = tuple(int(b) for b in t.decay_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup > 0:
      progress = jnp.minimum(step / warmup, 1.0)
      factor = t.warmup_factor * (1.0 - progress) + progress
    else:
      factor = jnp.ones_like(step)
    for boundary in boundaries:
      factor = factor * jnp.where(step >= boundary, t.decay_factor, 1.0)
    return base * factor

  return schedule


def _is_norm_param(path) -> bool:
  names = [str(getattr(p, 'key', p)).lower() for p in path]
  return any('norm' in n or n.startswith('bn') or n.startswith('gn') for n in names[:-1]) or names[-1] == 'scale'


def weight_decay_mask(params):
  """True for parameters that weight decay applies to: everything but normalization scales and offsets."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _is_norm_param(path), params)


def make_optimizer(config: ml_collections.ConfigDict, trainable=None) -> optax.GradientTransformation:
  """SGD(momentum) on the gradient plus coupled weight decay, optional global-norm clipping.

  Args:
    config: the full config (reads `config.train`).
    trainable: optional pytree of bools like params; False leaves are frozen (no update, no decay).
  """
  t = config.train
  parts = []
  if t.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
  if t.weight_decay > 0:
    parts.append(optax.add_decayed_weights(t.weight_decay, mask=weight_decay_mask))
  parts.append(optax.sgd(learning_rate_schedule(t), momentum=t.momentum))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  labels = jax.tree_util.tree_map(lambda keep: 'train' if keep else 'frozen', trainable)
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
