"""Checkpointer: round trips across meshes, the every_steps/keep policy, fingerprint errors, init_from merging."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from conret_jax import defaults
from conret_jax.errors import WeightFileError
from conret_jax.train import checkpoint


@flax.struct.dataclass
class ToyState:  # the TrainState's shape: step, params, batch_stats, frozen, opt_state, rng
  step: jax.Array
  params: dict
  batch_stats: dict
  frozen: dict
  opt_state: dict
  rng: jax.Array


def _config(num_classes=3):
  config = defaults.base_config()
  config.model.num_classes = num_classes
  return config


def _state(seed=0, kernel_shape=(16, 4)):
  rs = np.random.RandomState(seed)
  params = {
    'conv': {'kernel': rs.randn(*kernel_shape).astype(np.float32), 'bias': rs.randn(4).astype(np.float32)},
    'head': {'kernel': rs.randn(8, 6).astype(np.float32)},
  }
  return ToyState(
    step=np.int32(seed),
    params=params,
    batch_stats={},
    frozen={'bn': {'mean': rs.randn(4).astype(np.float32)}},
    opt_state={'momentum': jax.tree.map(lambda x: 0.5 * x, params)},
    rng=np.asarray(jax.random.key_data(jax.random.key(seed))),
  )


def _put(tree, mesh, axis):
  """Leading axis sharded over `axis` where it divides, replicated otherwise."""

  def put(x):
    x = jnp.asarray(x)
    spec = P(axis) if x.ndim and x.shape[0] % mesh.shape[axis] == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


def _abstract(tree, sharding_fn):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding_fn(x)), tree)


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_other_meshes(tmp_path):
  mesh8 = jax.make_mesh((8,), ('data',))
  host_state = _state(seed=5)
  state = _put(host_state, mesh8, 'data')
  assert len(state.params['conv']['kernel'].sharding.device_set) == 8
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=10, keep=3, config=_config())
  assert ckpt.save(10, state, {'epoch': 1, 'position': 320})
  ckpt.wait()
  assert ckpt.latest_step() == 10

  one_device = SingleDeviceSharding(jax.devices()[3])
  restored, data_state = ckpt.restore(None, _abstract(host_state, lambda x: one_device))
  _assert_trees_equal(restored, host_state)
  assert isinstance(restored, ToyState)
  assert data_state == {'epoch': 1, 'position': 320}
  assert restored.params['conv']['kernel'].sharding == one_device

  mesh4 = jax.make_mesh((2, 2), ('data', 'fsdp'), devices=jax.devices()[4:])
  target = NamedSharding(mesh4, P(('data', 'fsdp')))
  restored4, _ = ckpt.restore(
    10, _abstract(host_state, lambda x: target if np.ndim(x) and np.shape(x)[0] % 4 == 0 else NamedSharding(mesh4, P()))
  )
  _assert_trees_equal(restored4, host_state)
  kernel = restored4.params['conv']['kernel']
  assert kernel.sharding == target
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 4)}

  # A concrete state works as the target too (the trainer passes its freshly initialized state).
  fresh = _put(_state(seed=9), mesh8, 'data')
  restored8, _ = ckpt.restore(10, fresh)
  _assert_trees_equal(restored8, host_state)
  assert restored8.params['conv']['kernel'].sharding == fresh.params['conv']['kernel'].sharding
  ckpt.close()


def test_every_steps_force_and_keep(tmp_path):
  state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=2, keep=2, async_save=False)
  saved = [step for step in range(1, 7) if ckpt.save(step, state.replace(step=np.int32(step)), {'step': step})]
  assert saved == [2, 4, 6]
  assert ckpt.all_steps() == [4, 6]
  assert not ckpt.save(6, state, force=True)  # already there
  assert ckpt.save(7, state.replace(step=np.int32(7)), {'step': 7}, force=True)
  assert ckpt.all_steps() == [6, 7]
  restored, data_state = ckpt.restore(6, _abstract(state, lambda x: SingleDeviceSharding(jax.devices()[0])))
  assert int(restored.step) == 6 and data_state == {'step': 6}
  ckpt.close()
  # A new Checkpointer over the same workdir (a resumed run) sees the same steps.
  assert checkpoint.Checkpointer(str(tmp_path), every_steps=2, keep=2).latest_step() == 7


def test_restore_refuses_a_different_model(tmp_path):
  sharding = lambda x: SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, config=_config(num_classes=3), async_save=False)
  ckpt.save(1, _state())
  ckpt.close()

  other = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, config=_config(num_classes=5))
  with pytest.raises(ValueError, match='different model') as error:
    other.restore(None, _abstract(_state(kernel_shape=(16, 2)), sharding))
  message = str(error.value)
  assert 'model.num_classes: checkpoint 3 vs this run 5' in message
  assert 'conv/kernel: checkpoint [16, 4] vs this run [16, 2]' in message
  assert str(tmp_path) in message

  # Inference-only settings may differ (Table 3's "2*" evaluates with one regression step).
  config = _config(num_classes=3)
  config.consistent.inference_reg_steps = 1
  config.model.compute_dtype = 'bfloat16'
  same = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, config=config)
  restored, _ = same.restore(1, _abstract(_state(), sharding))
  _assert_trees_equal(restored, _state())

  with pytest.raises(FileNotFoundError):
    same.restore(7, _abstract(_state(), sharding))
  with pytest.raises(FileNotFoundError):
    checkpoint.Checkpointer(str(tmp_path / 'empty'), every_steps=1, keep=1).restore(None, _state())


def test_fingerprint_survives_json():
  config = _config()
  config.model.anchors.sizes = ((32, 40), (64, 80))
  fingerprint = checkpoint.model_fingerprint(config, _state().params)
  assert fingerprint['params']['conv/kernel'] == [16, 4]
  assert fingerprint['config']['model.anchors.sizes'] == [[32, 40], [64, 80]]
  assert 'model.compute_dtype' not in fingerprint['config']
  import json

  assert checkpoint.fingerprint_differences(json.loads(json.dumps(fingerprint)), fingerprint) == []


def test_load_variables_and_merge_init(tmp_path):
  mesh = jax.make_mesh((8,), ('data',))
  rs = np.random.RandomState(1)
  imported = {
    'params': {
      'conv': {'kernel': rs.randn(16, 4).astype(np.float32), 'bias': rs.randn(4).astype(np.float32)},
      'head': {'kernel': rs.randn(8, 9).astype(np.float32)},  # another class count
      'extra': {'w': np.ones(3, np.float32)},
    },
    'frozen': {'bn': {'mean': rs.randn(4).astype(np.float32)}},
  }
  saver = ocp.StandardCheckpointer()
  saver.save(tmp_path / 'imported', _put(imported, mesh, 'data'))  # saved sharded over 8 devices
  saver.wait_until_finished()

  loaded = checkpoint.load_variables(str(tmp_path / 'imported'))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  _assert_trees_equal(loaded, imported)

  fresh = _put(_state(seed=2).params, jax.make_mesh((4,), ('data',), devices=jax.devices()[:4]), 'data')
  fresh['conv']['scale'] = jnp.zeros(4)  # not in the import
  report = checkpoint.match_leaves(fresh, loaded['params'])
  assert sorted(report['copied']) == ['conv/bias', 'conv/kernel']
  assert report['missing'] == ['conv/scale'] and report['mismatched'] == ['head/kernel']
  assert report['unused'] == ['extra/w']

  merged = checkpoint.merge_init(fresh, loaded['params'])
  np.testing.assert_array_equal(merged['conv']['kernel'], imported['params']['conv']['kernel'])
  np.testing.assert_array_equal(merged['conv']['bias'], imported['params']['conv']['bias'])
  np.testing.assert_array_equal(merged['head']['kernel'], fresh['head']['kernel'])  # kept fresh
  np.testing.assert_array_equal(merged['conv']['scale'], np.zeros(4))
  assert merged['conv']['kernel'].sharding == fresh['conv']['kernel'].sharding

  with pytest.raises(ValueError, match='no parameter matched'):
    checkpoint.merge_init(fresh, loaded)  # the whole variables dict: wrong tree level


@pytest.mark.parametrize('damage', ['truncate_data', 'delete_metadata'])
def test_load_variables_names_a_damaged_checkpoint(tmp_path, damage):
  saver = ocp.StandardCheckpointer()
  saver.save(tmp_path / 'imported', {'params': {'w': np.arange(4096, dtype=np.float32)}})
  saver.wait_until_finished()
  files = [p for p in (tmp_path / 'imported').rglob('*') if p.is_file()]
  if damage == 'truncate_data':
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
  else:
    for p in files:
      if p.name == '_METADATA':
        p.unlink()
  with pytest.raises(WeightFileError, match='config.init_from=.*imported'):
    checkpoint.load_variables(str(tmp_path / 'imported'))


def test_init_from_merges_params_and_frozen(tmp_path):
  rs = np.random.RandomState(4)
  state = _state(seed=6)
  state = state.replace(frozen={'frozen': state.frozen})  # TrainState.frozen holds whole collections
  imported = {
    'params': {'conv': {'kernel': rs.randn(16, 4).astype(np.float32)}},
    'frozen': {'bn': {'mean': rs.randn(4).astype(np.float32)}},
  }
  saver = ocp.StandardCheckpointer()
  saver.save(tmp_path / 'vars', imported)
  saver.wait_until_finished()
  merged = checkpoint.init_from(state, str(tmp_path / 'vars'))
  np.testing.assert_array_equal(merged.params['conv']['kernel'], imported['params']['conv']['kernel'])
  np.testing.assert_array_equal(merged.params['conv']['bias'], state.params['conv']['bias'])
  np.testing.assert_array_equal(merged.frozen['frozen']['bn']['mean'], imported['frozen']['bn']['mean'])
  np.testing.assert_array_equal(
    merged.opt_state['momentum']['conv']['kernel'], state.opt_state['momentum']['conv']['kernel']
  )


def test_relative_workdir(tmp_path, monkeypatch):
  """`--workdir=runs/x` (relative, as in the README) works: orbax itself only takes absolute paths."""
  monkeypatch.chdir(tmp_path)
  state = _state(3)
  ckpt = checkpoint.Checkpointer('runs/x', every_steps=1, keep=2, config=_config())
  assert ckpt.save(1, state, {'step': 1})
  ckpt.wait()
  assert ckpt.directory == str(tmp_path / 'runs' / 'x' / 'checkpoints')
  restored, data = ckpt.restore(None, _abstract(state, lambda x: SingleDeviceSharding(jax.devices()[0])))
  ckpt.close()
  _assert_trees_equal(restored, state)
  assert data == {'step': 1}
  assert checkpoint.absolute('gs://bucket/run') == 'gs://bucket/run'


def test_a_step_damaged_twice_is_moved_aside_again_and_written_anew(tmp_path):
  """The second time step 4 is damaged, '4.damaged' already exists: the copy goes to '4.damaged.2' (both kept) and
  the run can write step 4 again."""
  from conret_jax.train import restore

  state = _state()
  sharding = lambda x: SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=2, keep=3, config=_config(), async_save=False)
  for step in (2, 4):
    ckpt.save(step, state.replace(step=np.int32(step)), {'step': step})
  (tmp_path / 'checkpoints' / '4.damaged').mkdir()  # left by an earlier damage of step 4
  (tmp_path / 'checkpoints' / '4.damaged' / 'kept').write_text('the first damaged copy')
  for f in (tmp_path / 'checkpoints' / '4' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'')
  _, _, step = restore.restore_newest(ckpt, _abstract(state, sharding), move_damaged=True)
  assert step == 2
  names = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  assert names == ['2', '4.damaged', '4.damaged.2'], names
  assert ckpt.save(4, state.replace(step=np.int32(4)), {'step': 4}, force=True)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
