"""COCO json -> TFRecords -> source 'tfrecord' (the streamed path): same examples, hosts, resume."""

import os
import shutil

import numpy as np
import pytest

from conret_jax.data import info as info_lib
from conret_jax.data import pipeline, sources, tfrecord
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


def test_a_shard_set_with_shards_missing_or_extra_is_refused(tmp_path):
  """The pattern must match one whole shard set: a lost shard, stale shards of an earlier conversion (another total)
  or a stray file are errors naming the pattern and what is wrong, before any record is read; counting records is
  left out (it would read the whole dataset at start-up)."""
  annotation_file, image_dir, _ = conftest.write_rect_dataset(str(tmp_path / 'rects'), [(40, 60)] * 6)
  out = tmp_path / 'out'
  config = small_config(annotation_file, image_dir)
  config.data.eval.source, config.data.eval.tfrecord_pattern = 'tfrecord', str(out / 'r-*.tfrecord')
  pattern = repr(config.data.eval.tfrecord_pattern)

  def refused():
    with pytest.raises(info_lib.DatasetError) as e:
      sources.open_source(config.data.eval, config, train=False)
    message = str(e.value)
    assert message.startswith(f'tfrecord_pattern {pattern} matches ') and '\n' not in message
    return message

  tfrecord.convert(annotation_file, image_dir, str(out / 'r'), num_shards=3)
  assert tfrecord.read_info(str(out / 'r'))['shards'] == [f'r-0000{i}-of-00003.tfrecord' for i in range(3)]
  assert sources.open_source(config.data.eval, config, train=False).num_examples == 6  # the whole set opens

  shutil.move(out / 'r-00001-of-00003.tfrecord', tmp_path / 'kept')
  assert refused() == (
    f'tfrecord_pattern {pattern} matches 2 files: missing shard indices [1] of 3; against the shards '
    f"{out / 'r.info.json'} lists: missing ['r-00001-of-00003.tfrecord']"
  )
  shutil.move(tmp_path / 'kept', out / 'r-00001-of-00003.tfrecord')

  shutil.copy(out / 'r-00000-of-00003.tfrecord', out / 'r-extra.tfrecord')
  assert "files without -NNNNN-of-NNNNN: ['r-extra.tfrecord']; against the shards" in refused()
  assert refused().endswith("lists: extra or twice ['r-extra.tfrecord']")
  os.remove(out / 'r-extra.tfrecord')

  tfrecord.convert(annotation_file, image_dir, str(out / 'r'), num_shards=2)  # re-converted over the old shards
  message = refused()
  assert 'matches 5 files: shards of 2 sets (totals [2, 3]: stale shards of another conversion?)' in message
  assert message.endswith(f'lists: extra or twice {[f"r-0000{i}-of-00003.tfrecord" for i in range(3)]}')
  for i in range(3):
    os.remove(out / f'r-0000{i}-of-00003.tfrecord')
  assert sources.open_source(config.data.eval, config, train=False).num_examples == 6

  meta = tfrecord.read_info(str(out / 'r'))
  del meta['shards']  # an info file from before the list: the names alone are checked
  shutil.copy(out / 'r-00000-of-00002.tfrecord', out / 'r-00002-of-00002.tfrecord')
  with pytest.raises(info_lib.DatasetError, match=r'outside 0..1 or matched twice: \[2\]$'):
    tfrecord.check_shards('p', [str(out / f'r-0000{i}-of-00002.tfrecord') for i in range(3)], meta)
  tfrecord.check_shards('p', [str(out / f'r-0000{i}-of-00002.tfrecord') for i in range(2)], meta)
