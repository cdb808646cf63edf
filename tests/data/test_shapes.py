"""The synthetic shapes dataset: COCO format, deterministic, cached atomically, usable by the pipeline."""

import json
import os

import numpy as np
from PIL import Image

from conret_jax.cli import make_shapes
from conret_jax.data import coco_json, pipeline, shapes
from tests.data.conftest import small_config


def test_cli_writes_deterministic_coco(tmp_path):
  make_shapes.main(['--output', str(tmp_path / 'a'), '--num-train', '12', '--num-val', '3', '--seed', '5'])
  make_shapes.main(['--output', str(tmp_path / 'b'), '--num-train', '12', '--num-val', '3', '--seed', '5'])
  data = json.loads((tmp_path / 'a' / 'annotations' / 'instances_train.json').read_text())
  assert data == json.loads((tmp_path / 'b' / 'annotations' / 'instances_train.json').read_text())
  assert (tmp_path / 'a' / 'train' / '0000003.jpg').read_bytes() == (
    tmp_path / 'b' / 'train' / '0000003.jpg'
  ).read_bytes()
  assert len(data['images']) == 12
  assert [c['id'] for c in data['categories']] == [3, 7, 11, 15, 19]
  assert {c['name'] for c in data['categories']} == {'circle', 'square', 'triangle', 'cross', 'ring'}
  per_image = np.bincount([a['image_id'] for a in data['annotations']], minlength=13)[1:]
  assert per_image.min() >= 1 and per_image.max() <= 6
  for im in data['images']:
    with Image.open(tmp_path / 'a' / 'train' / im['file_name']) as f:
      assert f.size == (im['width'], im['height']) and f.format == 'JPEG'
    assert 160 <= im['height'] <= 320 and 160 <= im['width'] <= 320
  sizes = np.array([a['bbox'][2:] for a in data['annotations']])
  assert sizes.min() >= 24 - 1e-6 and sizes.max() <= 120 + 1e-6
  other = json.loads((tmp_path / 'a' / 'annotations' / 'instances_val.json').read_text())
  assert other['images'] and other['annotations'][0]['bbox'] != data['annotations'][0]['bbox']
  # Every json row is usable as is: nothing dropped or repaired.
  _, _, counts = coco_json.load_coco(
    str(tmp_path / 'a' / 'annotations' / 'instances_train.json'),
    str(tmp_path / 'a' / 'train'),
    train=True,
    max_boxes=10,
  )
  assert counts == {'dropped': {}, 'repaired': {}}


def test_objects_of_different_classes_overlap():
  rng = np.random.RandomState(0)
  overlaps = 0
  for _ in range(30):
    _, objects = shapes.make_image(rng)
    for i, a in enumerate(objects):
      for b in objects[:i]:
        overlaps += a[5] != b[5] and shapes._iou(a[:4], b[:4]) > 0.05
  assert overlaps >= 5


def test_shapes_source_generates_once_into_cache(tmp_path):
  config = small_config('', '', batch=4)
  for section in (config.data.train, config.data.eval):
    section.source, section.cache_dir, section.num_examples = 'shapes', str(tmp_path), 8
  config.model.num_classes = 5
  batch = next(pipeline.host_batches(config))
  assert batch['images'].shape == (4, 128, 128, 3) and batch['valid'].any()
  info = pipeline.dataset_info(config.data.eval, config, train=False)
  assert info.category_ids == [3, 7, 11, 15, 19] and info.num_examples == 8
  assert sorted(os.listdir(tmp_path)) == [
    f'v{shapes.FORMAT_VERSION}_train_n8_seed0',
    f'v{shapes.FORMAT_VERSION}_val_n8_seed0',
  ]  # no temp dirs left
  stamp = os.path.getmtime(
    tmp_path / f'v{shapes.FORMAT_VERSION}_train_n8_seed0' / 'annotations' / 'instances_train.json'
  )
  shapes.ensure_shapes_split(config.data.train)
  assert (
    os.path.getmtime(tmp_path / f'v{shapes.FORMAT_VERSION}_train_n8_seed0' / 'annotations' / 'instances_train.json')
    == stamp
  )
