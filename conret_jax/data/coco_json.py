"""Reads a COCO-format dataset (instances json + image folder), validates it, repairs what can be repaired.

Real datasets have bad rows. Each is repaired or dropped, counted, and reported in ONE log line at start-up:
  images: missing file, undecodable header, a format or variant TensorFlow cannot decode (`check_image_file`),
          truncated file (no end marker), malformed entry, duplicate id, id outside int32 [0, 2**31 - 1] -> dropped;
          json height/width that disagree with the file -> repaired (the file's size wins, boxes clipped to it);
  annotations: unknown image or category id, malformed row or bbox, zero/negative area after clipping -> dropped;
               partly outside the image -> clipped; beyond max_boxes for one image -> dropped (kept in coco_gt);
               id missing, not a positive integer or repeated -> repaired (a fresh id: the evaluators index them
               by id, and take 0 for "no match");
  categories: the same id listed twice with the same name -> repaired (merged);
  training only: images with no usable non-crowd annotation -> dropped (Detectron); kept for evaluation.
A dataset unusable as a whole (missing/malformed json, no categories, no usable image, one category id with two
names) raises DatasetError. "annotations" absent or null both mean none (an unlabelled split such as test-dev).

Image check cost: one PIL header parse (`Image.open(...).size`, reads the first few KB), for a JPEG a walk over its
marker segments to the first scan, and one read of the last 4 KiB for the JPEG EOI / PNG IEND marker, i.e. a few
small reads per image, run on a thread pool. On local disk this is ~0.1 ms per image (COCO train2017: ~10-20 s on
one core); it reads no pixel data, so a file corrupt in its middle passes the check (libjpeg then decodes what it
can: decode_jpeg(try_recover_truncated=True)).
"""

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import struct

import numpy as np
from absl import logging
from PIL import Image

from conret_jax.data import info as info_lib

_JPEG_EOI = b'\xff\xd9'
_PNG_IEND = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the whole IEND chunk (length 0, type, CRC): 12 fixed bytes
_TAIL = 4096  # end markers are looked for in the last 4 KiB: files may carry trailing bytes (more counts as truncated)
# What decode.decode_image decodes (checked on tf 2.21: TIFF, PPM, ICO, TGA, JPEG 2000, ... raise in training).
# PIL names a camera's multi-picture JPEG 'MPO'; TensorFlow decodes its first picture, as PIL does.
_TF_FORMATS = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP', 'WEBP')
_BMP_RGB_MASKS = (0xFF0000, 0xFF00, 0xFF)  # BI_BITFIELDS masks equal to the BI_RGB layout tf.io.decode_bmp assumes


@dataclasses.dataclass
class ExampleTable:
  """The examples of one split, in the json's image order; boxes are ragged per image (row_lengths).

  paths [N] str, image_ids [N] int64, heights/widths [N] int32 (the file's true size),
  boxes [T, 4] float32 x1y1x2y2 original pixels, classes [T] int32 contiguous, crowd [T] bool, row_lengths [N].
  """

  paths: np.ndarray
  image_ids: np.ndarray
  heights: np.ndarray
  widths: np.ndarray
  boxes: np.ndarray
  classes: np.ndarray
  crowd: np.ndarray
  row_lengths: np.ndarray

  def __len__(self):
    return len(self.paths)


def _bmp_problem(head: bytes) -> str | None:
  """Why tf.io.decode_bmp (tf 2.21) would reject or misread a BMP whose first bytes are `head`, or None.

  It reads only the pixel array as 8 (grey), 24 or 32 bits per pixel, ignoring the compression field, the colour
  masks and the palette: 8-bit palette colours came out as their indices, RLE as garbage, 1/4/16 bits raised."""
  problem = 'BMP that tf.io.decode_bmp misreads (palette colours, compression or bit depth)'
  if len(head) < 54 or struct.unpack_from('<I', head, 14)[0] < 40:  # OS/2 core header: other field layout
    return problem
  header_size = struct.unpack_from('<I', head, 14)[0]
  bits, compression = struct.unpack_from('<HI', head, 28)
  if compression == 3 and bits == 32 and len(head) >= 66 and struct.unpack_from('<III', head, 54) == _BMP_RGB_MASKS:
    compression = 0  # BI_BITFIELDS spelling out the plain layout
  if compression != 0 or bits not in (8, 24, 32):
    return problem
  if bits == 8:  # decoded as grey levels: right only when palette entry i is grey level i
    colours = struct.unpack_from('<I', head, 46)[0] or 256
    palette = head[14 + header_size : 14 + header_size + 4 * colours]
    if len(palette) < 4 * colours or any(palette[4 * i : 4 * i + 3] != bytes([i] * 3) for i in range(colours)):
      return problem
  return None


def _jpeg_scan_start(f) -> int:
  """Offset of the first scan's entropy-coded data: the marker segments from the start of the file are walked to the
  first SOS (FF DA); 0 where they do not parse."""
  pos = 2  # after SOI
  while True:
    f.seek(pos)
    marker = f.read(4)
    if len(marker) < 2 or marker[0] != 0xFF:
      return 0
    if marker[1] == 0xFF:  # fill byte before a marker
      pos += 1
    elif marker[1] == 0x01 or 0xD0 <= marker[1] <= 0xD7:  # markers without a length
      pos += 2
    elif len(marker) < 4:
      return 0
    else:
      pos += 2 + int.from_bytes(marker[2:4], 'big')
      if marker[1] == 0xDA:
        return pos


def check_image_file(path: str):
  """Returns (height, width, None) for an image decode.decode_image decodes, or (0, 0, reason) where reason names
  why it is not."""
  if not os.path.isfile(path):
    return 0, 0, 'missing image file'
  try:
    with Image.open(path) as im:
      width, height = im.size
      fmt = im.format
      animated_webp = fmt == 'WEBP' and getattr(im, 'is_animated', False)  # PIL counted the frames at open
  except Exception:  # PIL raises many types for garbage; all mean "not an image"
    return 0, 0, 'undecodable image'
  if width <= 0 or height <= 0:
    return 0, 0, 'undecodable image'
  if fmt not in _TF_FORMATS:
    return 0, 0, f'{fmt} image (TensorFlow decodes JPEG, PNG, GIF, BMP and WebP)'
  if animated_webp:
    return 0, 0, 'animated WebP image (tf.io.decode_image decodes it only as RGBA)'
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    if fmt == 'BMP':
      problem = _bmp_problem(f.read(4096))
      return (0, 0, problem) if problem else (height, width, None)
    # Entropy-coded JPEG data cannot hold FF D9: an FF byte there is always followed by a stuffed 00 or is a restart
    # marker (FF D0-D7), so an EOI found after the first scan began means the scan data ended. The window starts no
    # earlier than that scan: header segments (an EXIF thumbnail, an ICC profile) may hold FF D9 of their own.
    start = max(size - _TAIL, _jpeg_scan_start(f) if fmt in ('JPEG', 'MPO') else 0)
    f.seek(start)
    tail = f.read()
  if (fmt in ('JPEG', 'MPO') and _JPEG_EOI not in tail) or (fmt == 'PNG' and _PNG_IEND not in tail):
    return 0, 0, 'truncated image file'
  return height, width, None


def _read_json(annotation_file: str) -> dict:
  if not annotation_file or not os.path.isfile(annotation_file):
    raise info_lib.DatasetFileNotFoundError(f'COCO annotation file not found: {annotation_file!r}')
  try:
    with open(annotation_file) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise info_lib.DatasetError(f'malformed COCO json {annotation_file}: {e}') from None
  if not isinstance(data, dict) or not isinstance(data.get('images'), list) or not data['images']:
    raise info_lib.DatasetError(f'COCO json {annotation_file} has no "images" list (or it is empty)')
  if not isinstance(data.get('categories'), list) or not data['categories']:
    raise info_lib.DatasetError(f'COCO json {annotation_file} has no "categories" list (or it is empty)')
  if data.get('annotations') is None:  # absent or null, as for "images": the same meaning (here: no annotations)
    data['annotations'] = []
  if not isinstance(data['annotations'], list):
    raise info_lib.DatasetError(
      f'COCO json {annotation_file}: "annotations" must be a list, got {type(data["annotations"]).__name__}'
    )
  return data


def _clean_bbox(bbox, height, width):
  """xywh -> (clipped x1y1x2y2 or None, was_clipped, reason)."""
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return None, False, 'malformed bbox'
  try:
    x, y, w, h = (float(v) for v in bbox)
  except (TypeError, ValueError):
    return None, False, 'malformed bbox'
  if not all(math.isfinite(v) for v in (x, y, w, h)):
    return None, False, 'malformed bbox'
  x1, y1, x2, y2 = x, y, x + w, y + h
  c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
  if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
    return None, False, 'zero/negative-area box'
  return c, c != [x1, y1, x2, y2], None


class _Counts:
  """What was dropped and repaired, by reason: counted as the phases go, reported once."""

  def __init__(self):
    self.dropped, self.repaired = collections.Counter(), collections.Counter()


def _categories(data: dict, annotation_file: str, counts: _Counts) -> list[tuple[int, str]]:
  """[(category id, name)] sorted by id. An id listed again with the same name is merged (counted); with another name
  it is an error: which of the two the annotations mean cannot be known."""
  try:
    entries = [(int(c['id']), str(c.get('name', c['id']))) for c in data['categories']]
  except (KeyError, TypeError, ValueError):
    raise info_lib.DatasetError(f'malformed "categories" in {annotation_file}') from None
  names = {}
  for cat_id, name in entries:
    if cat_id not in names:
      names[cat_id] = name
    elif names[cat_id] == name:
      counts.repaired['duplicate category entry (same id and name): merged'] += 1
    else:
      raise info_lib.DatasetError(
        f'category id {cat_id} is listed twice in {annotation_file}, named {names[cat_id]!r} and {name!r}'
      )
  return sorted(names.items())


def _usable_images(data: dict, image_dir: str, counts: _Counts, *, check_images: bool, num_threads: int):
  """(OrderedDict image_id -> (path, height, width, json entry), every id the json names). Malformed, duplicate and
  unusable files are dropped, and so are ids the batch's int32 image_id cannot hold (-1 there marks padding); a
  size the file contradicts is repaired (the file wins)."""
  entries, seen = [], set()
  for im in data['images']:
    try:
      image_id, file_name = int(im['id']), str(im['file_name'])
    except (KeyError, TypeError, ValueError):
      counts.dropped['malformed image entry'] += 1
      continue
    if image_id in seen:
      counts.dropped['duplicate image id'] += 1
      continue
    seen.add(image_id)  # its annotations go with it, uncounted, if it is dropped below
    if not 0 <= image_id < 2**31:
      counts.dropped['image id outside int32 [0, 2**31 - 1]'] += 1
      continue
    entries.append((image_id, os.path.join(image_dir, file_name), im))
  if check_images:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      checks = list(pool.map(check_image_file, [p for _, p, _ in entries]))
  else:
    checks = [(im.get('height', 0), im.get('width', 0), None) for _, _, im in entries]
  images = collections.OrderedDict()
  for (image_id, path, im), (height, width, reason) in zip(entries, checks):
    if reason:
      counts.dropped[reason] += 1
      continue
    if (im.get('height'), im.get('width')) != (height, width):
      counts.repaired['json size != file size'] += 1
    images[image_id] = (path, int(height), int(width), im)
  return images, seen


def _usable_annotations(data: dict, images: dict, seen: set, cat_to_class: dict, counts: _Counts):
  """(image_id -> [(box x1y1x2y2, class, crowd)], COCO gt annotations). Malformed rows, annotations of unknown images
  or categories, malformed or empty boxes are dropped; boxes partly outside their image are clipped. The gt ids are
  unique and positive: an id missing, not a positive integer or repeated is replaced by a fresh one (the evaluators
  index annotations by id, so a repeated id would hide one of them, and read 0 as "no match"; detections never name
  annotation ids)."""
  per_image = collections.defaultdict(list)
  ids = [a['id'] for a in data['annotations'] if isinstance(a, dict) and isinstance(a.get('id'), int)]
  gt_annotations, used, next_id = [], set(), 1 + max(ids + [0])  # fresh ids: above every id in the json
  for a in data['annotations']:
    # JSON's unhashable values (arrays, objects) as ids would raise in the lookups below
    if not isinstance(a, dict) or any(isinstance(a.get(k), (list, dict)) for k in ('image_id', 'category_id')):
      counts.dropped['malformed annotation'] += 1
      continue
    image_id, cat = a.get('image_id'), a.get('category_id')
    if image_id not in images:
      if image_id not in seen:
        counts.dropped['annotation with unknown image id'] += 1
      continue  # annotations of dropped images go with them
    if cat not in cat_to_class:
      counts.dropped['annotation with unknown category id'] += 1
      continue
    _, height, width, _ = images[image_id]
    box, clipped, reason = _clean_bbox(a.get('bbox'), height, width)
    if reason:
      counts.dropped[reason] += 1
      continue
    if clipped:
      counts.repaired['box clipped to image'] += 1
    crowd = bool(a.get('iscrowd', 0))
    per_image[image_id].append((box, cat_to_class[cat], crowd))
    xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    area = float(a['area']) if not clipped and isinstance(a.get('area'), (int, float)) else xywh[2] * xywh[3]
    ann_id = a.get('id')
    if not isinstance(ann_id, int) or isinstance(ann_id, bool) or ann_id <= 0:  # the evaluators read 0 as "none"
      counts.repaired['annotation id missing or not a positive integer: numbered'] += 1
      ann_id, next_id = next_id, next_id + 1
    elif ann_id in used:
      counts.repaired['duplicate annotation id: renumbered'] += 1
      ann_id, next_id = next_id, next_id + 1
    used.add(ann_id)
    gt_annotations.append(
      {'id': ann_id, 'image_id': image_id, 'category_id': cat, 'bbox': xywh, 'area': area, 'iscrowd': int(crowd)}
    )
  return per_image, gt_annotations


def _table(images: dict, per_image: dict, counts: _Counts, *, train: bool, max_boxes: int) -> ExampleTable:
  """The ExampleTable of the kept images (training drops images without a usable non-crowd box)."""
  rows = {'paths': [], 'image_ids': [], 'heights': [], 'widths': [], 'row_lengths': []}
  boxes, classes, crowds = [], [], []
  for image_id, (path, height, width, _) in images.items():
    anns = per_image.get(image_id, [])
    if train and not any(not crowd for _, _, crowd in anns):
      counts.dropped['train image without usable annotations'] += 1
      continue
    if len(anns) > max_boxes:
      counts.dropped[f'annotations beyond max_boxes={max_boxes}'] += len(anns) - max_boxes
      anns = anns[:max_boxes]
    for key, value in zip(rows, (path, image_id, height, width, len(anns))):
      rows[key].append(value)
    boxes += [b for b, _, _ in anns]
    classes += [c for _, c, _ in anns]
    crowds += [c for _, _, c in anns]
  return ExampleTable(
    paths=np.asarray(rows['paths'], dtype=object),
    image_ids=np.asarray(rows['image_ids'], np.int64),
    heights=np.asarray(rows['heights'], np.int32),
    widths=np.asarray(rows['widths'], np.int32),
    boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
    classes=np.asarray(classes, np.int32),
    crowd=np.asarray(crowds, bool),
    row_lengths=np.asarray(rows['row_lengths'], np.int64),
  )


def load_coco(
  annotation_file: str, image_dir: str, *, train: bool, max_boxes: int, check_images: bool = True, num_threads: int = 16
):
  """Parses, validates and repairs one COCO split.

  Returns (ExampleTable, DatasetInfo with coco_gt, {'dropped': {reason: n}, 'repaired': {reason: n}}).
  """
  data = _read_json(annotation_file)
  if not os.path.isdir(image_dir):
    raise info_lib.DatasetFileNotFoundError(f'image_dir not found: {image_dir!r} (for {annotation_file})')
  counts = _Counts()
  cats = _categories(data, annotation_file, counts)
  cat_to_class = info_lib.category_to_class_table([c for c, _ in cats])
  images, seen = _usable_images(data, image_dir, counts, check_images=check_images, num_threads=num_threads)
  per_image, gt_annotations = _usable_annotations(data, images, seen, cat_to_class, counts)
  table = _table(images, per_image, counts, train=train, max_boxes=max_boxes)
  if not len(table):
    raise info_lib.DatasetError(
      f'no usable image in {annotation_file} (image_dir {image_dir}); dropped: {dict(counts.dropped)}'
    )
  kept_ids = set(table.image_ids.tolist())
  coco_gt = {
    'images': [
      {'id': i, 'file_name': os.path.basename(p), 'height': h, 'width': w}
      for i, (p, h, w, _) in images.items()
      if i in kept_ids
    ],
    'annotations': [a for a in gt_annotations if a['image_id'] in kept_ids],
    'categories': [{'id': c, 'name': n} for c, n in cats],
  }
  logging.info(
    '%s',
    summary_line(
      annotation_file,
      len(data['images']),
      len(table),
      len(data['annotations']),
      len(table.classes),
      counts.dropped,
      counts.repaired,
    ),
  )
  info = info_lib.DatasetInfo(
    category_ids=[c for c, _ in cats], class_names=[n for _, n in cats], num_examples=len(table), coco_gt=coco_gt
  )
  return table, info, {'dropped': dict(counts.dropped), 'repaired': dict(counts.repaired)}


def summary_line(name, n_images, n_kept, n_anns, n_kept_anns, dropped, repaired) -> str:
  def fmt(counter):
    return ', '.join(f'{v} {k}' for k, v in sorted(counter.items()) if v) or 'none'

  return (
    f'dataset {name}: kept {n_kept}/{n_images} images, {n_kept_anns}/{n_anns} annotations; '
    f'dropped: {fmt(dropped)}; repaired: {fmt(repaired)}'
  )
