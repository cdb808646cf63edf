"""The jitted, sharded train step: same result on 1 and 8 devices (data and FSDP meshes), one compilation,
dropped non-finite updates, and the optimizer's schedule and frozen parameters."""

import float_noise
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conret_jax
from conret_jax import defaults
from conret_jax import mesh as mesh_lib
from conret_jax.train import bench, optim
from conret_jax.train import state as state_lib
from conret_jax.train import step as step_lib

HW = (128, 128)


def tiny_config(**overrides):
  c = defaults.base_config()
  c.model.num_classes = 3
  c.model.backbone.depth = 18
  c.model.backbone.width = 8
  c.model.backbone.norm = 'gn'
  c.model.backbone.freeze_at = 0
  c.model.fpn.channels = 16
  c.model.fpn.max_level = 5  # P3-P5: faster to compile; the step does not depend on the level count
  c.model.head.channels = 16
  c.model.head.num_convs = 1
  c.data.image_size = HW[0]
  c.data.max_boxes = 8
  c.train.global_batch_size = 8
  c.train.warmup_steps = 2
  c.eval.global_batch_size = 8
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


@pytest.fixture(scope='module')
def host_state():
  """One initialization (its compile is the slow part), placed on every mesh below."""
  config = tiny_config()
  mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
  state, _ = state_lib.init_state(conret_jax.build_model(config), config, mesh, jax.random.PRNGKey(0))
  return jax.device_get(state)


def _run(config, devices, host_state, steps=3):
  mesh = mesh_lib.make_mesh(config, devices)
  model = conret_jax.build_model(config)
  shardings = state_lib.shardings_of(state_lib.abstract_state(model, config, mesh))
  state = jax.device_put(host_state, shardings)
  train_step = step_lib.make_train_step(model, config, mesh, shardings)
  host = bench.synthetic_batch(config, HW, np.random.default_rng(0))
  logged = []
  for _ in range(steps):
    batch = jax.device_put(host, mesh_lib.batch_sharding(mesh))
    state, metrics = train_step(state, batch)
    logged.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return state, logged, train_step, mesh


@pytest.fixture(scope='module')
def one_device(host_state):
  return _run(tiny_config(), jax.devices()[:1], host_state)


@pytest.mark.parametrize('fsdp', [1, 2])
def test_eight_devices_match_one(host_state, one_device, fsdp):
  assert jax.device_count() == 8, 'tests/conftest.py must give 8 CPU devices'
  state1, metrics1, _, _ = one_device
  config = tiny_config(**{'train.fsdp_axis_size': fsdp})
  state8, metrics8, train_step, _ = _run(config, jax.devices(), host_state)
  # Equal to float32 noise: the 8-device sums run in another order (tolerances and why: tests/float_noise.py).
  assert float_noise.metric_mismatches(metrics8, metrics1) == []
  start = float_noise.flatten(host_state)
  assert float_noise.state_mismatches(float_noise.flatten(state8), float_noise.flatten(state1), start) == []
  assert train_step._cache_size() == 1  # compiled once over all steps
  assert int(state8.step) == 3
  if fsdp > 1:  # large leaves really are sharded over the fsdp axis
    specs = {
      tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(state8.params) if x.size >= mesh_lib.MIN_FSDP_SIZE
    }
    assert specs and all('fsdp' in s for s in specs)


def test_loss_decreases_on_a_repeated_batch(one_device):
  _, metrics, _, _ = one_device
  assert metrics[-1]['loss'] < metrics[0]['loss']


def test_non_finite_update_is_dropped(host_state, one_device):
  _, _, train_step, mesh = one_device  # the same compiled step, on a fresh copy of the initial state
  state = jax.device_put(
    host_state,
    state_lib.shardings_of(state_lib.abstract_state(conret_jax.build_model(tiny_config()), tiny_config(), mesh)),
  )
  batch = bench.synthetic_batch(tiny_config(), HW, np.random.default_rng(0))
  batch['images'][0, 0, 0, 0] = np.nan
  state, metrics = train_step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
  assert float(metrics['finite']) == 0.0
  assert int(state.step) == 1
  for a, b in zip(
    jax.tree_util.tree_leaves(host_state.params), jax.tree_util.tree_leaves(jax.device_get(state.params))
  ):
    np.testing.assert_array_equal(a, b)
  assert train_step._cache_size() == 1


def test_mesh_errors_name_the_key():
  with pytest.raises(ValueError, match='global_batch_size'):
    mesh_lib.make_mesh(tiny_config(**{'train.global_batch_size': 6}))
  with pytest.raises(ValueError, match='fsdp_axis_size'):
    mesh_lib.make_mesh(tiny_config(**{'train.fsdp_axis_size': 3}))


def test_bfloat16_compute_keeps_float32_params_and_loss(host_state, one_device):
  """Mixed precision: convs in bfloat16, parameters, optimizer state and losses in float32."""
  _, metrics_f32, _, _ = one_device
  config = tiny_config(**{'model.compute_dtype': 'bfloat16'})
  state, metrics, _, _ = _run(config, jax.devices()[:1], host_state, steps=1)
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype('float32')}
  assert np.isfinite(metrics[0]['loss'])
  np.testing.assert_allclose(metrics[0]['loss'], metrics_f32[0]['loss'], rtol=0.03)


def test_the_rate_after_a_skipped_step_is_the_schedules(host_state, one_device):
  """A dropped non-finite update restores the optimizer state; the next update still applies the schedule's rate at
  its own step (the logged learning_rate), not one step behind. With warmup_steps=2 the rate at step 1 is twice the
  rate at step 0 (factors 2/3 and 1/3), so the bias update after a skip at step 0 is twice a first step's."""
  _, _, train_step, mesh = one_device
  shardings = state_lib.shardings_of(
    state_lib.abstract_state(conret_jax.build_model(tiny_config()), tiny_config(), mesh)
  )
  batch = bench.synthetic_batch(tiny_config(), HW, np.random.default_rng(0))
  bad = dict(batch, images=batch['images'].copy())
  bad['images'][0, 0, 0, 0] = np.nan
  put = lambda b: jax.device_put(b, mesh_lib.batch_sharding(mesh))

  first, _ = train_step(jax.device_put(host_state, shardings), put(batch))
  skipped, m0 = train_step(jax.device_put(host_state, shardings), put(bad))
  assert float(m0['finite']) == 0.0
  after_skip, m1 = train_step(skipped, put(batch))
  schedule = optim.learning_rate_schedule(tiny_config().train)
  assert float(m1['learning_rate']) == pytest.approx(float(schedule(1))) == pytest.approx(2 * float(schedule(0)))
  bias = lambda tree: tree['head']['cls_pred']['bias']
  start = np.asarray(bias(host_state.params))
  step0 = np.asarray(bias(jax.device_get(first.params))) - start
  step1 = np.asarray(bias(jax.device_get(after_skip.params))) - start
  assert np.max(np.abs(step0)) > 2e-5  # well above the biases' float32 spacing (about 5e-7 at -4.6)
  # Each update is read back as a difference of float32 values near -4.6: equal up to two of their spacings. Had the
  # rate lagged a step, the update would equal step 0's, off by half of it.
  np.testing.assert_allclose(step1, 2 * step0, rtol=0, atol=1e-6)
