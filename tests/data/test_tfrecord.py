"""COCO json -> TFRecords -> source 'tfrecord' (the streamed path): same examples, hosts, resume."""

import numpy as np

from conret_jax.data import pipeline, tfrecord
from tests.data import conftest
from tests.data.conftest import small_config
from tests.data.test_pipeline import _assert_same, _global, _take


def _tfrecord_config(rect_dataset, tmp_path, **kw):
  tfrecord.main(
    [
      '--annotation_file',
      rect_dataset[0],
      '--image_dir',
      rect_dataset[1],
      '--output_prefix',
      str(tmp_path / 'out' / 'rects'),
      '--num_shards',
      '3',
    ]
  )
  pattern = str(tmp_path / 'out' / 'rects-*-of-00003.tfrecord')
  config = small_config(*rect_dataset[:2], **kw)
  for section in (config.data.train, config.data.eval):
    section.source, section.tfrecord_pattern = 'tfrecord', pattern
  config.data.shuffle_buffer = 5
  return config


def test_tfrecord_eval_matches_coco_json(rect_dataset, tmp_path):
  config = _tfrecord_config(rect_dataset, tmp_path, eval_batch=5)
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
    'rects-00000-of-00003.tfrecord',
    'rects-00001-of-00003.tfrecord',
    'rects-00002-of-00003.tfrecord',
    'rects.info.json',
  ]
  got = list(pipeline.host_batches(config, train=False))
  want = list(pipeline.host_batches(small_config(*rect_dataset[:2], eval_batch=5), train=False))
  _assert_same(got, want)  # round-robin shards read interleaved give back the json order
  info = pipeline.dataset_info(config.data.eval, config, train=False)
  json_config = small_config(*rect_dataset[:2])
  json_info = pipeline.dataset_info(json_config.data.eval, json_config, train=False)
  assert info.category_ids == json_info.category_ids == [2, 5, 9] and info.num_examples == 12
  assert info.coco_gt == json_info.coco_gt


def test_more_shards_than_readers_keep_the_json_order(tmp_path):
  """20 shards (more than tf.data's 16 readers used to be): the eval stream is still the json's order, so an eval of
  the first N images keeps the ground truth of the images it visits."""
  sizes = [(40 + i, 60) for i in range(21)]
  annotation_file, image_dir, _ = conftest.write_rect_dataset(str(tmp_path / 'rects'), sizes)
  tfrecord.main(
    ['--annotation_file', annotation_file, '--image_dir', image_dir, '--output_prefix', str(tmp_path / 'out' / 'r')]
    + ['--num_shards', '20']
  )
  config = small_config(annotation_file, image_dir, eval_batch=7)
  config.data.eval.source, config.data.eval.tfrecord_pattern = 'tfrecord', str(tmp_path / 'out' / 'r-*.tfrecord')
  config.eval.num_images = 18  # past the 16th record, where 16 readers would have started the shards' second round
  ids = np.concatenate([b['image_id'][b['example_valid']] for b in pipeline.host_batches(config, train=False)])
  assert ids.tolist() == list(range(100, 118))
  info = pipeline.dataset_info(config.data.eval, config, train=False)
  assert sorted(im['id'] for im in info.coco_gt['images']) == ids.tolist()


def test_tfrecord_train_hosts_and_resume(rect_dataset, tmp_path):
  config = _tfrecord_config(rect_dataset, tmp_path, batch=4)
  config.data.scale_jitter = (0.8, 1.2)
  one = _global(config, 1, 7)
  _assert_same(one, _global(config, 2, 7))
  _assert_same(one[4:], _take(pipeline.host_batches(config, start_step=4), 3))
  epoch0 = np.concatenate([b['image_id'] for b in one[:3]])
  epoch1 = np.concatenate([b['image_id'] for b in one[3:6]])
  assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(100, 112))
  assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch


def test_tfrecord_short_side_groups_by_orientation(rect_dataset, tmp_path):
  config = _tfrecord_config(rect_dataset, tmp_path, batch=2)
  config.data.resize, config.data.image_size, config.data.max_size = 'short_side', 100, 150
  for batch in _global(config, 2, 6):
    portrait = batch['orig_hw'][:, 0] > batch['orig_hw'][:, 1]
    assert len(set(portrait)) == 1 and (batch['images'].shape[1] > batch['images'].shape[2]) == portrait[0]
