"""Every kind of bad data a real COCO-format dataset has: repaired or dropped, counted, one summary line."""

import io
import json
import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from conret_jax.data import coco_json
from conret_jax.data import info as info_lib


def _save(path, h, w, fmt='PNG', colour=(200, 10, 10)):
  Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path, fmt)


@pytest.fixture()
def bad_dataset(tmp_path):
  d = tmp_path / 'images'
  d.mkdir()
  _save(d / 'good.png', 80, 120)
  _save(d / 'size_lies.png', 80, 120)  # json says 50 x 50
  _save(d / 'png_named.jpg', 64, 64)  # a PNG with a .jpg name: fine
  _save(d / 'noanns.png', 40, 40)
  _save(d / 'crowd_only.png', 40, 40)
  _save(d / 'many.png', 100, 100)
  (d / 'garbage.jpg').write_bytes(os.urandom(500))
  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(buf, 'JPEG')
  (d / 'truncated.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  names = [
    'good.png',
    'size_lies.png',
    'png_named.jpg',
    'noanns.png',
    'crowd_only.png',
    'many.png',
    'garbage.jpg',
    'truncated.jpg',
    'missing.jpg',
  ]
  images = [
    {'id': i + 1, 'file_name': n, 'height': 80 if i < 2 else 64, 'width': 120 if i < 2 else 64}
    for i, n in enumerate(names)
  ]
  images[1].update(height=50, width=50)
  images[3].update(height=40, width=40)
  images[4].update(height=40, width=40)
  images[5].update(height=100, width=100)
  anns = [
    dict(image_id=1, category_id=7, bbox=[10, 10, 20, 30]),  # fine
    dict(image_id=1, category_id=3, bbox=[100, 70, 40, 40]),  # partly outside -> clipped to 100,70,120,80
    dict(image_id=1, category_id=3, bbox=[5, 5, 0, 10]),  # zero area
    dict(image_id=1, category_id=3, bbox=[5, 5, 10, -5]),  # negative area
    dict(image_id=1, category_id=999, bbox=[1, 1, 5, 5]),  # unknown category
    dict(image_id=12345, category_id=3, bbox=[1, 1, 5, 5]),  # unknown image
    dict(image_id=1, category_id=3, bbox=[1, 2, 3]),  # malformed bbox
    dict(image_id=2, category_id=7, bbox=[60, 10, 20, 20]),  # inside the true 120 px width, outside json's 50
    dict(image_id=3, category_id=3, bbox=[0, 0, 64, 64]),
    dict(image_id=5, category_id=3, bbox=[0, 0, 10, 10], iscrowd=1),
    dict(image_id=7, category_id=3, bbox=[0, 0, 10, 10]),  # on the garbage image: goes with it
  ] + [dict(image_id=6, category_id=7, bbox=[i * 5, i * 5, 10, 10]) for i in range(12)]
  for i, a in enumerate(anns):
    a.update(id=i + 1, area=1.0)
    a.setdefault('iscrowd', 0)
  data = {'images': images, 'annotations': anns, 'categories': [{'id': 7, 'name': 'seven'}, {'id': 3, 'name': 'three'}]}
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(data))
  return str(path), str(d)


def test_bad_rows_are_repaired_or_dropped_and_counted(bad_dataset):
  annotation_file, image_dir = bad_dataset
  with mock.patch.object(coco_json.logging, 'info') as log:
    table, info, counts = coco_json.load_coco(annotation_file, image_dir, train=True, max_boxes=8)
  assert counts['dropped'] == {
    'missing image file': 1,
    'undecodable image': 1,
    'truncated image file': 1,
    'zero/negative-area box': 2,
    'annotation with unknown category id': 1,
    'annotation with unknown image id': 1,
    'malformed bbox': 1,
    'annotations beyond max_boxes=8': 4,
    'train image without usable annotations': 2,
  }
  assert counts['repaired'] == {'json size != file size': 1, 'box clipped to image': 1}
  assert log.call_count == 1
  line = log.call_args[0][1]
  assert 'kept 4/9 images' in line and '1 truncated image file' in line and '1 box clipped' in line

  assert info.category_ids == [3, 7] and info.class_names == ['three', 'seven']
  np.testing.assert_array_equal(table.image_ids, [1, 2, 3, 6])
  np.testing.assert_array_equal(table.heights, [80, 80, 64, 100])  # the file's size wins over the json's
  np.testing.assert_array_equal(table.widths, [120, 120, 64, 100])
  np.testing.assert_array_equal(table.row_lengths, [2, 1, 1, 8])
  np.testing.assert_allclose(table.boxes[:4], [[10, 10, 30, 40], [100, 70, 120, 80], [60, 10, 80, 30], [0, 0, 64, 64]])
  np.testing.assert_array_equal(table.classes[:4], [1, 0, 1, 0])  # 7 -> 1, 3 -> 0 (sorted ids)


def test_eval_keeps_images_without_annotations(bad_dataset):
  table, info, counts = coco_json.load_coco(*bad_dataset, train=False, max_boxes=8)
  np.testing.assert_array_equal(table.image_ids, [1, 2, 3, 4, 5, 6])
  assert 'train image without usable annotations' not in counts['dropped']
  gt = info.coco_gt
  assert [im['id'] for im in gt['images']] == [1, 2, 3, 4, 5, 6]
  # coco_gt keeps every usable annotation (all 12 of image 6), with clipped xywh boxes and the dataset's ids.
  assert sum(a['image_id'] == 6 for a in gt['annotations']) == 12
  clipped = [a for a in gt['annotations'] if a['image_id'] == 1 and a['category_id'] == 3]
  assert clipped[0]['bbox'] == [100, 70, 20, 10] and clipped[0]['area'] == 200
  assert table.crowd[np.cumsum(table.row_lengths)[3]]  # image 5's only row is its crowd box


def test_unusable_datasets_stop_with_one_clear_error(tmp_path, bad_dataset):
  with pytest.raises(info_lib.DatasetFileNotFoundError, match='nope.json') as e:
    coco_json.load_coco(str(tmp_path / 'nope.json'), str(tmp_path), train=True, max_boxes=8)
  assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
  bad = tmp_path / 'bad.json'
  bad.write_text('{"images": [')
  with pytest.raises(info_lib.DatasetError, match='malformed COCO json .*bad.json'):
    coco_json.load_coco(str(bad), str(tmp_path), train=True, max_boxes=8)
  empty = tmp_path / 'empty.json'
  empty.write_text(json.dumps({'images': [], 'annotations': [], 'categories': [{'id': 1, 'name': 'a'}]}))
  with pytest.raises(info_lib.DatasetError, match='no "images"'):
    coco_json.load_coco(str(empty), str(tmp_path), train=True, max_boxes=8)
  with pytest.raises(info_lib.DatasetFileNotFoundError, match='image_dir'):
    coco_json.load_coco(bad_dataset[0], str(tmp_path / 'no_dir'), train=True, max_boxes=8)
  gone = tmp_path / 'gone.json'
  gone.write_text(json.dumps({'images': [{'id': 1, 'file_name': 'x.jpg'}], 'categories': [{'id': 1}]}))
  with pytest.raises(info_lib.DatasetError, match='no usable image in .*gone.json'):
    coco_json.load_coco(str(gone), str(tmp_path), train=False, max_boxes=8)
