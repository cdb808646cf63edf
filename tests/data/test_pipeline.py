"""Host pipelines: same global batch for any host count, resumable by step, eval visits each image once."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from conret_jax.data import info as info_lib
from conret_jax.data import pipeline, preprocess, sources
from tests.data.conftest import small_config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _global(config, hosts, n, **kw):
  """n global batches assembled from `hosts` simulated processes (each host's rows are a contiguous slice)."""
  its = [pipeline.host_batches(config, p, hosts, **kw) for p in range(hosts)]
  return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]} for parts in zip(*[_take(it, n) for it in its])]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('resize', ['square', 'short_side'])
def test_one_and_two_hosts_give_the_same_global_batches(rect_dataset, resize):
  config = small_config(*rect_dataset[:2], batch=4)
  jitter = (0.7, 1.3) if resize == 'square' else (0.5, 1.0)  # short_side jitter stays below image_size
  config.data.resize, config.data.scale_jitter, config.data.max_size = resize, jitter, 200
  _assert_same(_global(config, 1, 5), _global(config, 2, 5))


def test_resume_equals_uninterrupted_and_follows_the_numpy_order(rect_dataset):
  config = small_config(*rect_dataset[:2], batch=4)
  config.data.scale_jitter = (0.7, 1.3)
  config.train.seed = 3
  full = _take(pipeline.host_batches(config), 8)  # 12 images / 4 = 3 batches per epoch: crosses 2 epochs
  _assert_same(full[4:], _take(pipeline.host_batches(config, start_step=4), 4))
  table = sources.open_source(config.data.train, config, train=True).table
  for step in (0, 4, 7, 10**6):  # step 10**6 is instant: skipping happens on indices, nothing is decoded
    epoch, k = divmod(step, 3)
    perm = np.random.RandomState([3, epoch]).permutation(12)
    batch = full[step] if step < 8 else next(pipeline.host_batches(config, start_step=step))
    np.testing.assert_array_equal(batch['image_id'], table.image_ids[perm[4 * k : 4 * k + 4]])
  ids = np.concatenate([b['image_id'] for b in full[:3]])
  assert len(set(ids.tolist())) == 12  # one epoch visits every image once
  other = small_config(*rect_dataset[:2], batch=4)
  other.train.seed = 4
  assert not np.array_equal(next(pipeline.host_batches(other))['image_id'], full[0]['image_id'])


def test_short_side_batches_are_homogeneous_and_padded_to_128(rect_dataset):
  config = small_config(*rect_dataset[:2], batch=2)
  config.data.resize, config.data.image_size, config.data.max_size = 'short_side', 100, 150
  shapes = set(preprocess.padded_shapes(config.data).values())
  assert shapes == {(128, 256), (256, 128)}
  for batch in _take(pipeline.host_batches(config), 8):
    assert batch['images'].shape[1:3] in shapes
    portrait = batch['orig_hw'][:, 0] > batch['orig_hw'][:, 1]
    assert portrait.all() == (batch['images'].shape[1] > batch['images'].shape[2]) and len(set(portrait)) == 1
    want = np.minimum(100 / batch['orig_hw'].min(1), 150 / batch['orig_hw'].max(1))
    np.testing.assert_allclose(batch['scale'], np.stack([want, want], 1), rtol=1e-6)  # (sy, sx)


@pytest.mark.parametrize('hosts', [1, 2])
def test_eval_sees_every_image_once(rect_dataset, hosts):
  config = small_config(*rect_dataset[:2], eval_batch=4)
  config.data.resize, config.data.max_size = 'short_side', 200
  parts = [list(pipeline.host_batches(config, p, hosts, train=False)) for p in range(hosts)]
  assert len({len(p) for p in parts}) == 1  # every host runs the same number of eval steps
  batches = [{k: np.concatenate([b[k] for b in group]) for k in group[0]} for group in zip(*parts)]
  ids = np.concatenate([b['image_id'][b['example_valid']] for b in batches])
  assert sorted(ids.tolist()) == list(range(100, 112))
  # 8 landscape + 4 portrait images -> 2 + 1 batches of 4 (no padding); with 5 per batch there would be.
  assert len(batches) == 3
  config.eval.global_batch_size = 6 if hosts == 2 else 5
  parts = [list(pipeline.host_batches(config, p, hosts, train=False)) for p in range(hosts)]
  valid = np.concatenate([b['example_valid'] for p in parts for b in p])
  ids = np.concatenate([b['image_id'] for p in parts for b in p])
  assert sorted(ids[valid].tolist()) == list(range(100, 112))
  assert (ids[~valid] == -1).all() and (~valid).sum() == len(valid) - 12 > 0


def test_eval_num_images_limits_iterator_and_coco_gt(rect_dataset):
  config = small_config(*rect_dataset[:2], eval_batch=4)
  config.eval.num_images = 5
  ids = np.concatenate([b['image_id'][b['example_valid']] for b in pipeline.host_batches(config, train=False)])
  np.testing.assert_array_equal(ids, np.arange(100, 105))
  info = pipeline.dataset_info(config.data.eval, config, train=False)
  assert [im['id'] for im in info.coco_gt['images']] == list(range(100, 105))
  assert {a['image_id'] for a in info.coco_gt['annotations']} <= set(range(100, 105))
  assert info.category_ids == [2, 5, 9]


def test_device_iterators_build_global_arrays(rect_dataset):
  config = small_config(*rect_dataset[:2], batch=8, eval_batch=8)
  mesh = jax.make_mesh((8,), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  it = pipeline.make_train_iterator(config, mesh, sharding, start_step=2)
  batch = next(it)
  want = next(pipeline.host_batches(config, start_step=2))
  for k in pipeline.BATCH_KEYS:
    assert batch[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch[k]), want[k])
  state = json.loads(json.dumps(it.state()))
  assert state['step'] == 3 and state['batches_per_epoch'] == 1 and state['epoch'] == 3
  evals = list(pipeline.make_eval_iterator(config, mesh, sharding))
  assert sum(int(np.asarray(b['example_valid']).sum()) for b in evals) == 12


def test_num_classes_and_small_datasets_are_start_up_errors(rect_dataset):
  config = small_config(*rect_dataset[:2], batch=16)
  with pytest.raises(info_lib.DatasetError, match='cannot fill one batch'):
    pipeline.host_batches(config)
  info = pipeline.dataset_info(config.data.train, config, train=True)
  with pytest.raises(info_lib.DatasetError, match='num_classes'):
    info_lib.check_num_classes(info, config)
  with pytest.raises(ValueError, match='not divisible by the process count'):
    pipeline.host_batches(small_config(*rect_dataset[:2], batch=4), 0, 3)
