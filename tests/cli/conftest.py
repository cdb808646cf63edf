"""Shared by the CLI tests: a tiny model config and a workdir holding a checkpoint of it."""

import jax
import numpy as np
import pytest

from conret_jax import defaults


def tiny_config_overrides() -> dict:
  return {
    'model.num_classes': 5,
    'model.backbone.depth': 18,
    'model.backbone.width': 8,
    'model.fpn.channels': 16,
    'model.fpn.max_level': 5,  # P3-P5: faster to compile (P6-P7 are tested in tests/model)
    'model.head.channels': 16,
    'model.head.num_convs': 1,
    'data.image_size': 128,
    'train.global_batch_size': 8,
    'eval.global_batch_size': 8,
    'eval.score_threshold': 0.0,  # an untrained model scores about prior_prob: keep everything
    'eval.topk_per_level': 50,
    'eval.max_detections': 5,
  }


def tiny_config():
  config = defaults.base_config()
  for key, value in tiny_config_overrides().items():
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  return config


def _filled_state(model, config, mesh):
  """A TrainState of the right structure with small deterministic values, without compiling the init."""
  from conret_jax.train import state as state_lib

  abstract = state_lib.abstract_state(model, config, mesh)
  rs = np.random.RandomState(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'opt_state' in name or leaf.dtype.kind in 'iu' or 'mean' in name or 'bias' in name:
      value = np.zeros(leaf.shape, leaf.dtype)
    elif 'var' in name or 'scale' in name:
      value = np.ones(leaf.shape, leaf.dtype)
    else:
      value = (0.05 * rs.randn(*leaf.shape)).astype(leaf.dtype)
    return jax.device_put(value, leaf.sharding)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def save_run(config, workdir: str, step: int, *, layout=None):
  """A checkpoint at `step` of `config`'s model (filled with `_filled_state`), saved from a mesh of every device;
  with `layout` (a data.info.ClassLayout) also config.json and run.json, as conret-train writes them. Returns the
  saved variables as numpy."""
  import conret_jax
  from conret_jax import mesh as mesh_lib
  from conret_jax import run_record
  from conret_jax.train import checkpoint

  state = _filled_state(conret_jax.build_model(config), config, mesh_lib.make_mesh(config))
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=1, config=config)
  ckpt.save(step, state, {'step': step})
  ckpt.close()
  if layout is not None:
    run_record.save(workdir, config, layout, step=step, processes=1, devices=jax.device_count(), argv=['test'])
  return jax.tree.map(np.asarray, state.variables())


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A workdir holding a step-7 checkpoint of the tiny model, saved from an 8-device mesh."""
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, save_run(tiny_config(), workdir, 7)


@pytest.fixture(name='make_saved_run')
def fixture_make_saved_run():
  """`save_run`: a workdir with a checkpoint (and, given a class layout, its config.json) without training."""
  return save_run


@pytest.fixture(name='make_tiny_config')
def fixture_make_tiny_config():
  """The factory of fresh tiny configs (tests change their copies)."""
  return tiny_config


@pytest.fixture(name='tiny_overrides')
def fixture_tiny_overrides():
  return tiny_config_overrides()
