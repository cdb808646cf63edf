"""Source 'tfds' (coco/2017) through tfds.testing.mock_data: no download, examples we know exactly."""

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from conret_jax.data import info as info_lib
from conret_jax.data import pipeline
from tests.data.conftest import small_config

# (height, width, [(ymin, xmin, ymax, xmax) normalized, label, is_crowd])
EXAMPLES = [
  (60, 100, [((0.1, 0.2, 0.5, 0.6), 0, False), ((0.5, 0.5, 1.0, 1.0), 79, True)]),
  (100, 60, [((0.0, 0.0, 0.3, 0.3), 11, False)]),
  (80, 80, [((0.25, 0.25, 0.75, 0.75), 45, False)]),
  (50, 120, [((0.2, 0.1, 0.8, 0.4), 24, False)]),
  (90, 70, [((0.1, 0.1, 0.2, 0.2), 5, False)]),
]


def _fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
  del self, split, read_config, shuffle_files
  assert isinstance(decoders['image'], tfds.decode.SkipDecoding)  # the pipeline never lets tfds decode

  def gen():
    for i, (h, w, objs) in enumerate(EXAMPLES):
      buf = io.BytesIO()
      Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(buf, 'JPEG')
      yield {
        'image': buf.getvalue(),
        'image/filename': f'{i}.jpg',
        'image/id': 1000 + i,
        'objects': {
          'bbox': np.array([o[0] for o in objs], np.float32),
          'label': np.array([o[1] for o in objs], np.int64),
          'is_crowd': np.array([o[2] for o in objs]),
          'area': np.arange(len(objs), dtype=np.int64) + 7,
          'id': np.arange(len(objs), dtype=np.int64) + 10 * i,
        },
      }

  spec = {
    'image': tf.TensorSpec([], tf.string),
    'image/filename': tf.TensorSpec([], tf.string),
    'image/id': tf.TensorSpec([], tf.int64),
    'objects': {
      'bbox': tf.TensorSpec([None, 4], tf.float32),
      'label': tf.TensorSpec([None], tf.int64),
      'is_crowd': tf.TensorSpec([None], tf.bool),
      'area': tf.TensorSpec([None], tf.int64),
      'id': tf.TensorSpec([None], tf.int64),
    },
  }
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


@pytest.fixture()
def tfds_config():
  config = small_config('', '', image_size=128, batch=4, eval_batch=4)
  for section, split in ((config.data.train, 'train'), (config.data.eval, 'validation')):
    section.source, section.name, section.split, section.data_dir = 'tfds', 'coco/2017', split, '/nonexistent'
  config.data.shuffle_buffer = 4
  config.data.random_flip = False
  with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset):
    yield config


def test_tfds_eval_batches_and_coco_gt(tfds_config):
  batches = list(pipeline.host_batches(tfds_config, train=False))
  assert len(batches) == 2
  b = batches[0]
  np.testing.assert_array_equal(b['image_id'], [1000, 1001, 1002, 1003])
  np.testing.assert_array_equal(b['orig_hw'][0], [60, 100])
  scale = 128 / 100
  np.testing.assert_allclose(b['boxes'][0, :2], np.array([[20, 6, 60, 30], [50, 30, 100, 60]]) * scale, rtol=1e-5)
  np.testing.assert_array_equal(b['classes'][0, :2], [0, 79])
  np.testing.assert_array_equal(b['crowd'][0, :3], [False, True, False])
  np.testing.assert_array_equal(batches[1]['example_valid'], [True, False, False, False])

  info = pipeline.dataset_info(tfds_config.data.eval, tfds_config, train=False)
  assert info.num_examples == 5 and info.category_ids == list(info_lib.COCO_CATEGORY_IDS)
  assert info.class_names[0] == 'person' and len(info.class_names) == 80
  gt = info.coco_gt
  assert gt['images'][1] == {'id': 1001, 'file_name': '1.jpg', 'height': 100, 'width': 60}
  first = [a for a in gt['annotations'] if a['image_id'] == 1000]
  assert [a['category_id'] for a in first] == [1, 90] and [a['iscrowd'] for a in first] == [0, 1]
  np.testing.assert_allclose(first[0]['bbox'], [20, 6, 40, 24], rtol=1e-5)
  assert [a['category_id'] for a in gt['annotations'] if a['image_id'] == 1001] == [13]  # label 11 -> id 13
  assert len(gt['categories']) == 80 and gt['categories'][-1] == {'id': 90, 'name': 'toothbrush'}


def test_tfds_train_is_deterministic_across_hosts(tfds_config):
  tfds_config.data.scale_jitter = (0.8, 1.2)
  one = next(pipeline.host_batches(tfds_config))
  parts = [next(pipeline.host_batches(tfds_config, p, 2)) for p in range(2)]
  for k in pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(one[k], np.concatenate([p[k] for p in parts]), err_msg=k)
  assert set(one['image_id'].tolist()) <= set(range(1000, 1005))


def test_unprepared_tfds_dir_is_a_clear_start_up_error(tmp_path):
  config = small_config('', '')
  config.data.train.source, config.data.train.data_dir = 'tfds', str(tmp_path)
  with pytest.raises(info_lib.DatasetFileNotFoundError, match='not prepared in data_dir'):
    pipeline.host_batches(config)


def test_tfds_source_is_read_once_per_cache(tfds_config):
  """Every evaluation asks for the eval source again; through the trainer's SourceCache its ground truth (a pass
  over the split) is built once. Without a cache each call opens the source anew."""
  from conret_jax.data import sources

  cache = sources.SourceCache()
  first = sources.open_source(tfds_config.data.eval, tfds_config, train=False, cache=cache)
  again = sources.open_source(tfds_config.data.eval, tfds_config, train=False, cache=cache)
  assert again is first and first.info.coco_gt is not None
  assert sources.open_source(tfds_config.data.eval, tfds_config, train=True, cache=cache) is not first  # filters
  assert sources.open_source(tfds_config.data.eval, tfds_config, train=False) is not first
