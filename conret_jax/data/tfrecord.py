"""COCO json + images -> sharded TFRecords (source 'tfrecord'), for large or remote (gs://) datasets.

    python -m conret_jax.data.tfrecord --annotation_file A.json --image_dir IMAGES --output_prefix OUT/train \
        --num_shards 64

writes OUT/train-00000-of-00064.tfrecord ... and OUT/train.info.json (categories, num_examples, the shard names and
the COCO ground truth for evaluation). Point config.data.<split>.tfrecord_pattern at 'OUT/train-*.tfrecord'; the info
file is found by cutting the pattern at its first '*' (and a trailing '-' or '_'); the files it matches must be that
whole shard set (`check_shards`). The dataset is validated and repaired as for 'coco_json' (coco_json.load_coco,
evaluation semantics: images without annotations are kept); encoded image bytes are copied, not re-encoded. Examples
go to shards round-robin, so reading the shards interleaved restores the json's order.

Record features: image/encoded bytes, image/id, image/height, image/width int64, image/filename bytes,
objects/bbox float [4k] x1y1x2y2 original pixels, objects/class int64 [k] contiguous index, objects/crowd int64 [k].
"""

import argparse
import collections
import json
import os
import re

import tensorflow as tf

from conret_jax.data import coco_json, decode
from conret_jax.errors import DatasetError, DatasetFileNotFoundError

_SHARD = re.compile(r'-(\d+)-of-(\d+)')  # '-00001-of-00064' in a shard's file name


def info_path(pattern_or_prefix: str) -> str:
  prefix = pattern_or_prefix.split('*', 1)[0].rstrip('-_')
  return prefix + '.info.json'


def _feature(values, kind):
  if kind == 'bytes':
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  if kind == 'float':
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def convert(
  annotation_file: str, image_dir: str, output_prefix: str, num_shards: int = 16, max_boxes: int = 1000
) -> str:
  """Writes the shards and the info file; returns the glob pattern for config.data.<split>.tfrecord_pattern."""
  table, info, _ = coco_json.load_coco(annotation_file, image_dir, train=False, max_boxes=max_boxes)
  num_shards = max(1, min(num_shards, len(table)))
  parent = os.path.dirname(output_prefix)
  if parent:
    tf.io.gfile.makedirs(parent)
  names = [f'{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord' for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(n) for n in names]
  starts = [0]
  for n in table.row_lengths:
    starts.append(starts[-1] + int(n))
  for row in range(len(table)):
    lo, hi = starts[row], starts[row + 1]
    with tf.io.gfile.GFile(table.paths[row], 'rb') as f:
      encoded = f.read()
    features = {
      'image/encoded': _feature([encoded], 'bytes'),
      'image/filename': _feature([os.path.basename(table.paths[row]).encode()], 'bytes'),
      'image/id': _feature([int(table.image_ids[row])], 'int'),
      'image/height': _feature([int(table.heights[row])], 'int'),
      'image/width': _feature([int(table.widths[row])], 'int'),
      'objects/bbox': _feature(table.boxes[lo:hi].reshape(-1).tolist(), 'float'),
      'objects/class': _feature(table.classes[lo:hi].tolist(), 'int'),
      'objects/crowd': _feature(table.crowd[lo:hi].astype(int).tolist(), 'int'),
    }
    example = tf.train.Example(features=tf.train.Features(feature=features))
    writers[row % num_shards].write(example.SerializeToString())
  for w in writers:
    w.close()
  meta = {
    'category_ids': info.category_ids,
    'class_names': info.class_names,
    'num_examples': len(table),
    'shards': [os.path.basename(n) for n in names],
    'coco_gt': info.coco_gt,
    'source': os.path.abspath(annotation_file),
  }
  with tf.io.gfile.GFile(info_path(output_prefix), 'w') as f:
    json.dump(meta, f)
  return f'{output_prefix}-*-of-{num_shards:05d}.tfrecord'


def read_info(pattern: str) -> dict:
  path = info_path(pattern)
  if not tf.io.gfile.exists(path):
    raise DatasetFileNotFoundError(
      f'TFRecord info file {path!r} (written by conret_jax.data.tfrecord next to the shards) not found'
    )
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _few(items, limit=10) -> str:
  items = sorted(items)
  return str(items[:limit])[:-1] + (f', ... ({len(items)} in all)]' if len(items) > limit else ']')


def check_shards(pattern: str, files: list[str], meta: dict) -> None:
  """Raises DatasetError unless `files` (what `pattern` matched) are one whole shard set, each shard once: where the
  names carry '-NNNNN-of-TTTTT', indices 0..T-1 of one total T; where the info file lists the shards (`convert`
  writes the list), exactly those.

  Names only: counting the records against meta['num_examples'] would read every shard (the whole dataset, maybe
  from gs://) at start-up. A shard cut short in a copy fails its record checksum when read (DataLossError)."""
  names = [os.path.basename(f) for f in files]
  marks = [(n, _SHARD.findall(n)) for n in names]
  marked = [m[-1] for _, m in marks if m]  # (index, total)
  problems = []
  if marked:
    totals = sorted({int(t) for _, t in marked})
    unmarked = [n for n, m in marks if not m]
    if len(totals) > 1:
      problems.append(f'shards of {len(totals)} sets (totals {totals}: stale shards of another conversion?)')
    if unmarked:
      problems.append(f'files without -NNNNN-of-NNNNN: {_few(unmarked)}')
    if len(totals) == 1:
      found = collections.Counter(int(i) for i, _ in marked)
      missing = [i for i in range(totals[0]) if i not in found]
      extra = [i for i, k in found.items() if i >= totals[0] or k > 1]
      if missing:
        problems.append(f'missing shard indices {_few(missing)} of {totals[0]}')
      if extra:
        problems.append(f'shard indices outside 0..{totals[0] - 1} or matched twice: {_few(extra)}')
  if meta.get('shards') is not None:  # info files written before the list existed have none
    listed, counted = set(meta['shards']), collections.Counter(names)
    missing, extra = listed - set(names), {n for n, k in counted.items() if n not in listed or k > 1}
    wrong = ([f'missing {_few(missing)}'] if missing else []) + ([f'extra or twice {_few(extra)}'] if extra else [])
    if wrong:
      problems.append(f'against the shards {info_path(pattern)} lists: ' + ', '.join(wrong))
  if problems:
    raise DatasetError(f'tfrecord_pattern {pattern!r} matches {len(files)} files: ' + '; '.join(problems))


_SPEC = {
  'image/encoded': tf.io.FixedLenFeature([], tf.string),
  'image/id': tf.io.FixedLenFeature([], tf.int64),
  'image/height': tf.io.FixedLenFeature([], tf.int64),
  'image/width': tf.io.FixedLenFeature([], tf.int64),
  'objects/bbox': tf.io.VarLenFeature(tf.float32),
  'objects/class': tf.io.VarLenFeature(tf.int64),
  'objects/crowd': tf.io.VarLenFeature(tf.int64),
}


def parse_example(serialized, max_boxes: int) -> dict:
  """One serialized record -> raw example (preprocess.py layout without 'index'/'example_valid')."""
  ex = tf.io.parse_single_example(serialized, _SPEC)
  boxes = tf.reshape(tf.sparse.to_dense(ex['objects/bbox']), [-1, 4])
  raw = {
    'image_data': ex['image/encoded'],
    'image_id': ex['image/id'],
    'height': tf.cast(ex['image/height'], tf.int32),
    'width': tf.cast(ex['image/width'], tf.int32),
  }
  raw.update(
    decode.pad_ground_truth(
      boxes, tf.sparse.to_dense(ex['objects/class']), tf.sparse.to_dense(ex['objects/crowd']) > 0, max_boxes
    )
  )
  return raw


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m conret_jax.data.tfrecord', description=__doc__.splitlines()[0])
  parser.add_argument('--annotation_file', required=True)
  parser.add_argument('--image_dir', required=True)
  parser.add_argument('--output_prefix', required=True, help='e.g. gs://bucket/coco/train')
  parser.add_argument('--num_shards', type=int, default=16)
  args = parser.parse_args(argv)
  print(convert(args.annotation_file, args.image_dir, args.output_prefix, args.num_shards))


if __name__ == '__main__':
  main()
