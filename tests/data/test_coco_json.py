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


def _write(root, images, annotations, categories=({'id': 1, 'name': 'a'},), **extra):
  """(json path, image dir) under root: images are (id, file_name) of 50 x 60 PNGs; annotations ... is the json's
  "annotations" value (the key is left out for ...)."""
  d = root / 'images'
  d.mkdir(parents=True, exist_ok=True)
  rows = []
  for image_id, name in images:
    _save(d / name, 50, 60)
    rows.append({'id': image_id, 'file_name': name, 'height': 50, 'width': 60})
  data = {'images': rows, 'annotations': annotations, 'categories': list(categories), **extra}
  if annotations is ...:
    del data['annotations']
  path = root / 'instances.json'
  path.write_text(json.dumps(data))
  return str(path), str(d)


def _ann(ann_id, image_id=1, category_id=1, box=(1, 1, 5, 5)):
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': list(box), 'iscrowd': 0}


def test_annotation_ids_in_coco_gt_are_unique(tmp_path):
  """The evaluators index annotations by id and read 0 as "no match": a repeated id is renumbered above every id in
  the json (the first keeps it), and so is one missing or not a positive integer; each is counted, no box is lost."""
  anns = [_ann(5, box=(1, 1, 5, 5)), _ann(5, box=(10, 10, 5, 5)), _ann(None), _ann('a1'), _ann(3), _ann(3)]
  anns += [_ann(0), _ann(-2)]  # 0 is "no match" to the evaluators (exports numbering from 0 are common)
  del anns[2]['id']
  table, info, counts = coco_json.load_coco(*_write(tmp_path, [(1, 'a.png')], anns), train=False, max_boxes=8)
  assert [a['id'] for a in info.coco_gt['annotations']] == [5, 6, 7, 8, 3, 9, 10, 11]
  assert [a['bbox'][0] for a in info.coco_gt['annotations'][:2]] == [1, 10]
  assert counts == {
    'dropped': {},
    'repaired': {
      'duplicate annotation id: renumbered': 2,
      'annotation id missing or not a positive integer: numbered': 4,
    },
  }
  assert table.row_lengths.tolist() == [8]


def test_malformed_annotation_rows_are_dropped_and_counted(tmp_path):
  """Rows that are not objects, or whose image/category id is an array or object, reach the 'malformed annotation'
  count instead of raising; "annotations": null means no annotations, as an absent key does; any other non-list is
  an error."""
  anns = [_ann(1), 'junk', 7, None, [1], _ann(2, image_id=[1]), _ann(3, category_id={'id': 1}), _ann('x')]
  _, info, counts = coco_json.load_coco(*_write(tmp_path, [(1, 'a.png')], anns), train=False, max_boxes=8)
  assert counts == {
    'dropped': {'malformed annotation': 6},
    'repaired': {'annotation id missing or not a positive integer: numbered': 1},
  }
  assert [a['id'] for a in info.coco_gt['annotations']] == [1, 4]
  for anns in (None, ...):
    table, info, counts = coco_json.load_coco(*_write(tmp_path, [(1, 'a.png')], anns), train=False, max_boxes=8)
    assert counts == {'dropped': {}, 'repaired': {}} and table.row_lengths.tolist() == [0]
    assert info.coco_gt['annotations'] == []
  with pytest.raises(info_lib.DatasetError, match=r'instances.json: "annotations" must be a list, got dict'):
    coco_json.load_coco(*_write(tmp_path, [(1, 'a.png')], {'1': _ann(1)}), train=False, max_boxes=8)


def test_image_ids_outside_int32_are_dropped(tmp_path):
  """The batch carries image ids as int32 with -1 for padding: ids outside [0, 2**31 - 1] would wrap or pose as
  padding, so their images are dropped and counted (their annotations go with them, uncounted)."""
  ids = [0, 2**31 - 1, 2**31, 2**31 + 5, -1, -7]
  images = [(i, f'{k}.png') for k, i in enumerate(ids)]
  anns = [_ann(k + 1, image_id=i) for k, i in enumerate(ids)]
  table, info, counts = coco_json.load_coco(*_write(tmp_path, images, anns), train=False, max_boxes=8)
  assert table.image_ids.tolist() == [0, 2**31 - 1]
  assert counts == {'dropped': {'image id outside int32 [0, 2**31 - 1]': 4}, 'repaired': {}}
  assert [a['image_id'] for a in info.coco_gt['annotations']] == [0, 2**31 - 1]


def test_duplicate_category_ids(tmp_path):
  """One id with two names is an error naming it (which name the boxes mean is unknown); the same id and name twice
  is merged and counted."""
  cats = [{'id': 1, 'name': 'cat'}, {'id': 2, 'name': 'x'}, {'id': 1, 'name': 'dog'}]
  with pytest.raises(info_lib.DatasetError, match="category id 1 is listed twice in .*instances.json, named 'cat' and"):
    coco_json.load_coco(*_write(tmp_path, [(1, 'a.png')], [_ann(1)], cats), train=False, max_boxes=8)
  cats = [{'id': 1, 'name': 'cat'}, {'id': 2, 'name': 'x'}, {'id': 1, 'name': 'cat', 'supercategory': 'animal'}]
  _, info, counts = coco_json.load_coco(*_write(tmp_path, [(1, 'a.png')], [_ann(1)], cats), train=False, max_boxes=8)
  assert info.category_ids == [1, 2] and info.class_names == ['cat', 'x']
  assert counts == {'dropped': {}, 'repaired': {'duplicate category entry (same id and name): merged': 1}}


def _encoded(image, fmt, **kw):
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def test_the_check_keeps_exactly_the_images_tensorflow_decodes_as_pil_does(tmp_path):
  """tf 2.21's decode_image reads JPEG, PNG, GIF, BMP and WebP: each kept file decodes to PIL's pixels. TIFF, PPM
  (and other formats) raised in training, so did animated WebP (RGBA only) and 1-bit BMP; 8-bit palette BMPs came out
  as their palette indices. Those are dropped at the check, each with its reason."""
  import tensorflow as tf

  from conret_jax.data import decode

  rgb = Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 30, 3), np.uint8))
  bmp = 'BMP that tf.io.decode_bmp misreads (palette colours, compression or bit depth)'
  other = ' image (TensorFlow decodes JPEG, PNG, GIF, BMP and WebP)'
  cases = {  # name: (bytes, the check's reason, what TensorFlow does with a dropped one)
    'a.jpg': (_encoded(rgb, 'JPEG'), None, None),
    'a.png': (_encoded(rgb, 'PNG'), None, None),
    'a.gif': (_encoded(rgb.convert('P'), 'GIF'), None, None),
    'a.bmp': (_encoded(rgb, 'BMP'), None, None),
    'rgba.bmp': (_encoded(rgb.convert('RGBA'), 'BMP'), None, None),
    'grey.bmp': (_encoded(rgb.convert('L'), 'BMP'), None, None),  # 8 bits with the identity grey palette
    'a.webp': (_encoded(rgb, 'WEBP', lossless=True), None, None),
    'a.tiff': (_encoded(rgb, 'TIFF'), 'TIFF' + other, 'raises'),
    'a.ppm': (_encoded(rgb, 'PPM'), 'PPM' + other, 'raises'),
    'bits1.bmp': (_encoded(rgb.convert('1'), 'BMP'), bmp, 'raises'),
    'palette.bmp': (_encoded(rgb.convert('P'), 'BMP'), bmp, 'misreads'),
    'anim.webp': (
      _encoded(rgb, 'WEBP', save_all=True, append_images=[rgb.transpose(0)]),
      'animated WebP image (tf.io.decode_image decodes it only as RGBA)',
      'raises',
    ),
  }
  for name, (data, reason, tf_does) in cases.items():
    (tmp_path / name).write_bytes(data)
    assert coco_json.check_image_file(str(tmp_path / name)) == ((20, 30, None) if not reason else (0, 0, reason)), name
    if tf_does == 'raises':
      with pytest.raises(tf.errors.InvalidArgumentError):
        decode.decode_image(tf.constant(data))
      continue
    pixels = decode.decode_image(tf.constant(data)).numpy().astype(int)
    diff = np.abs(pixels - np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), int)).max()
    assert diff > 100 if tf_does == 'misreads' else diff <= (8 if name == 'a.jpg' else 0), name  # JPEG: IDCTs differ


def test_end_markers_are_found_before_trailing_bytes_and_truncation_is_still_caught(tmp_path):
  """A JPEG or PNG with up to a few KiB after its end marker (what some cameras and editors append) is whole; one cut
  short is not, even when a header segment before its scan holds FF D9 of its own (here a comment; an EXIF
  thumbnail ends with one)."""
  pixels = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8))
  jpeg, png = _encoded(pixels, 'JPEG'), _encoded(pixels, 'PNG')
  comment = b'\xff\xfe\x00\x04\xff\xd9'  # COM segment: length 4, data FF D9
  commented = jpeg[:2] + comment + jpeg[2:]
  scan = commented.index(b'\xff\xda')
  assert len(commented) > scan + 1000
  cases = {
    'trailing.jpg': (jpeg + b'\x00' * 16, None),
    'trailing_3k.jpg': (jpeg + os.urandom(3000).replace(b'\xff', b'\x00'), None),
    'trailing.png': (png + b'\x00' * 100, None),
    'commented.jpg': (commented, None),
    'cut.jpg': (jpeg[: len(jpeg) - 100], 'truncated image file'),
    'cut_commented.jpg': (commented[: scan + 600], 'truncated image file'),
    'cut.png': (png[:-1], 'truncated image file'),
  }
  for name, (data, reason) in cases.items():
    (tmp_path / name).write_bytes(data)
    assert coco_json.check_image_file(str(tmp_path / name)) == ((64, 64, None) if not reason else (0, 0, reason)), name
