"""The optimizer: the schedule follows num_steps, parameter groups (Detectron's biases), frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np

from conret_jax import defaults
from conret_jax.train import optim


def _train_config(**overrides):
  t = defaults.base_config().train
  t.learning_rate, t.global_batch_size, t.reference_batch_size = 0.01, 32, 16
  for key, value in overrides.items():
    t[key] = value
  return t


def test_learning_rate_schedule_with_absolute_steps():
  t = _train_config(warmup_steps=100, warmup_factor=1 / 3, decay_steps=(1000, 2000), decay_factor=0.1, num_steps=3000)
  lr = optim.learning_rate_schedule(t)
  np.testing.assert_allclose(float(lr(0)), 0.02 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(50)), 0.02 * (1 / 3 * 0.5 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 0.02, rtol=1e-6)
  np.testing.assert_allclose(float(lr(999)), 0.02, rtol=1e-6)
  np.testing.assert_allclose(float(lr(1000)), 0.002, rtol=1e-6)
  np.testing.assert_allclose(float(lr(2500)), 0.0002, rtol=1e-5)


def test_schedule_follows_num_steps():
  """Detectron 1x by default: warm-up 500 of 90k steps, decays at 60k and 80k; a shorter run scales all of it."""
  assert defaults.schedule_steps(_train_config()) == (500, (60_000, 80_000))
  assert defaults.schedule_steps(_train_config(num_steps=900)) == (5, (600, 800))
  lr = optim.learning_rate_schedule(_train_config(num_steps=900))
  np.testing.assert_allclose([float(lr(s)) for s in (5, 599, 600, 800)], [0.02, 0.02, 0.002, 0.0002], rtol=1e-5)
  # A tiny run still decays inside itself: 0.92 * 4 rounds to step 4, kept at the last step, 3.
  assert defaults.schedule_steps(_train_config(num_steps=4, decay_fractions=(0.75, 0.92))) == (0, (3, 3))
  # Absolute values win over the fractions.
  assert defaults.schedule_steps(_train_config(num_steps=900, warmup_steps=7, decay_steps=(100,))) == (7, (100,))


def _one_update(config, params, trainable=None):
  tx = optim.make_optimizer(config.train, trainable)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_biases_follow_detectron_in_the_paper_config_and_torchvision_in_its_own():
  """Detectron: a conv bias gets twice the learning rate and no weight decay; a kernel gets lr and decay;
  normalization parameters get lr without decay. torchvision: biases like kernels."""
  config = defaults.base_config()
  config.train.weight_decay, config.train.warmup_steps = 0.1, 0
  lr = config.train.learning_rate * config.train.global_batch_size / config.train.reference_batch_size
  params = {
    'head': {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))},
    'gn1': {'scale': jnp.ones((2,)), 'bias': jnp.ones((2,))},
  }
  updates = _one_update(config, params)
  np.testing.assert_allclose(updates['head']['kernel'], -lr * (1 + 0.1), rtol=1e-6)
  np.testing.assert_allclose(updates['head']['bias'], -2 * lr, rtol=1e-6)
  np.testing.assert_allclose(updates['gn1']['scale'], -lr, rtol=1e-6)
  np.testing.assert_allclose(updates['gn1']['bias'], -lr, rtol=1e-6)
  config.train.bias_lr_factor, config.train.bias_weight_decay = 1.0, 0.1  # configs/retinanet_torchvision.py
  np.testing.assert_allclose(_one_update(config, params)['head']['bias'], -lr * (1 + 0.1), rtol=1e-6)


def test_frozen_parameters_get_no_update_and_no_decay():
  params = {'backbone': {'stem': {'kernel': jnp.ones((2,))}}, 'head': {'kernel': jnp.ones((2,))}}
  trainable = {'backbone': {'stem': {'kernel': False}}, 'head': {'kernel': True}}
  config = defaults.base_config()
  config.train.weight_decay, config.train.warmup_steps = 0.1, 0
  updates = _one_update(config, params, trainable)
  np.testing.assert_array_equal(updates['backbone']['stem']['kernel'], 0.0)
  lr = config.train.learning_rate * config.train.global_batch_size / config.train.reference_batch_size
  np.testing.assert_allclose(updates['head']['kernel'], -lr * 1.1, rtol=1e-6)


def test_parameter_groups_and_a_layout_that_does_not_depend_on_the_settings():
  params = {'conv': {'kernel': 1.0, 'bias': 1.0}, 'gn1': {'scale': 1.0, 'bias': 1.0}}
  assert optim.param_groups(params) == {
    'conv': {'kernel': 'weight', 'bias': 'bias'},
    'gn1': {'scale': 'norm', 'bias': 'norm'},
  }
  assert optim.weight_decay_mask(params) == {
    'conv': {'kernel': True, 'bias': False},
    'gn1': {'scale': False, 'bias': False},
  }
  plain, tuned = defaults.base_config(), defaults.base_config()
  tuned.train.grad_clip_norm, tuned.train.weight_decay, tuned.train.bias_weight_decay = 5.0, 0.0, 1e-4
  structure = lambda c: jax.tree_util.tree_structure(optim.make_optimizer(c.train).init(params))
  assert structure(plain) == structure(tuned)  # a checkpoint restores whatever these values are
