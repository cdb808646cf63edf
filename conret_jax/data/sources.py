"""Dataset sources, chosen by `config.data.<train|eval>.source`, all reduced to one of two kinds:

* indexed ('coco_json', 'shapes'): an in-memory ExampleTable; examples are addressed by row, so the pipeline
  permutes, skips and shards at the index level and reads only the files this host decodes.
* streamed ('tfds', 'tfrecord'): records read in a fixed file order and shuffled with a seeded buffer; each
  record already holds the encoded image. Every host reads the same stream (I/O only; it decodes just its slice),
  which keeps the global batch order independent of the host count.

tfds: `coco/2017` (splits 'train', 'validation') from a prepared data_dir (local or gs://), never downloaded.
`coco/2014` has 'train' and 'validation'; the Detectron splits are approximated with split expressions:
trainval35k = 'train+validation[5000:]', minival = 'validation[:5000]' (same sizes, not the same image list;
COCO 2017's train/val ARE the 2014 trainval35k/minival images, so prefer coco/2017).
tfds label i (0..79, sorted COCO ids) is COCO category COCO_CATEGORY_IDS[i]; bbox is normalized ymin,xmin,ymax,xmax.

Streamed sources keep training images without annotations (they only add negatives): dropping them would make the
epoch length unknown before reading, and the step -> position rule needs it. Their rows beyond config.data.max_boxes
are cut silently (coco_json counts them); 'tfrecord' datasets were already validated by coco_json when converted.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from conret_jax.data import coco_json, decode, shapes, tfrecord
from conret_jax.data import info as info_lib
from conret_jax.errors import ConfigError

SOURCES = ('tfds', 'coco_json', 'tfrecord', 'shapes')


class SourceCache:
  """Opened sources, kept by whoever passes it around (the trainer: one for its whole run), so a COCO json is
  validated once and a streamed split's metadata and COCO ground truth (one pass over the split) are read once,
  not at every evaluation. Without one, every call opens its source anew."""

  def __init__(self):
    self._sources = {}

  def get(self, key, open_fn):
    if key not in self._sources:
      self._sources[key] = open_fn()
    return self._sources[key]


@dataclasses.dataclass
class Source:
  """info: DatasetInfo; table: ExampleTable for indexed sources, else None; stream(): tf.data of raw examples
  (preprocess.py layout without 'index'/'example_valid') in a fixed order, for streamed sources."""

  info: info_lib.DatasetInfo
  table: coco_json.ExampleTable | None = None
  stream: object = None

  @property
  def num_examples(self) -> int:
    return self.info.num_examples


def _open_coco_json(annotation_file, image_dir, *, train, max_boxes, cache):
  def load():
    table, info, _ = coco_json.load_coco(annotation_file, image_dir, train=train, max_boxes=max_boxes)
    return Source(info=info, table=table)

  key = ('coco_json', os.path.abspath(annotation_file), os.path.abspath(image_dir), train, max_boxes)
  return cache.get(key, load) if cache is not None else load()


def _open_tfds(source_config, *, max_boxes, build_gt):
  import tensorflow_datasets as tfds  # heavy; only this source needs it

  try:
    builder = tfds.builder(source_config.name, data_dir=source_config.data_dir or None)
    try:
      num_examples = builder.info.splits[source_config.split].num_examples
    except Exception:  # tfds: no split metadata; counted below
      num_examples = None
    if not isinstance(num_examples, int) or num_examples <= 0:  # no split metadata (tfds mock): count the records
      ds = builder.as_dataset(split=source_config.split, decoders={'image': tfds.decode.SkipDecoding()})
      num_examples = int(ds.reduce(0, lambda n, _: n + 1))
  except Exception as e:  # tfds raises assorted errors for a missing/unprepared data_dir or a bad split
    raise info_lib.DatasetFileNotFoundError(
      f'tfds dataset {source_config.name!r} split {source_config.split!r} is not prepared in data_dir '
      f'{source_config.data_dir!r} (prepare it with `tfds build`; download=False here): {e}'
    ) from None
  names = list(builder.info.features['objects']['label'].names)
  if len(names) != len(info_lib.COCO_CATEGORY_IDS):
    raise info_lib.DatasetError(f'{source_config.name}: expected 80 COCO labels, found {len(names)}')
  if all(n.isdigit() for n in names):  # no label names in the install (tfds mock): use COCO's
    names = list(info_lib.COCO_CLASS_NAMES)

  def parse(ex):
    hw = decode.image_shape(ex['image'])
    h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(ex['objects']['bbox'], [-1, 4]), axis=-1)
    boxes = tf.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=-1)
    raw = {'image_data': ex['image'], 'image_id': ex['image/id'], 'height': hw[0], 'width': hw[1]}
    raw.update(decode.pad_ground_truth(boxes, ex['objects']['label'], ex['objects']['is_crowd'], max_boxes))
    return raw

  def stream():
    ds = builder.as_dataset(
      split=source_config.split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()}
    )
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  coco_gt = _tfds_coco_gt(builder, source_config.split, names) if build_gt else None
  info = info_lib.DatasetInfo(
    category_ids=list(info_lib.COCO_CATEGORY_IDS), class_names=names, num_examples=int(num_examples), coco_gt=coco_gt
  )
  return Source(info=info, stream=stream)


def _tfds_coco_gt(builder, split, names) -> dict:
  """COCO-format ground truth from the examples of a tfds split (one pass reading image headers, no decode)."""
  import tensorflow_datasets as tfds

  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(
    lambda ex: {
      'hw': decode.image_shape(ex['image']),
      'id': ex['image/id'],
      'file': ex['image/filename'],
      'objects': ex['objects'],
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  images, annotations = [], []
  for ex in ds.as_numpy_iterator():
    h, w = (int(v) for v in ex['hw'])
    image_id = int(ex['id'])
    images.append({'id': image_id, 'file_name': ex['file'].decode(), 'height': h, 'width': w})
    obj = ex['objects']
    for box, label, crowd, area, ann_id in zip(obj['bbox'], obj['label'], obj['is_crowd'], obj['area'], obj['id']):
      ymin, xmin, ymax, xmax = (float(v) for v in box)
      annotations.append(
        {
          'id': int(ann_id),
          'image_id': image_id,
          'category_id': info_lib.COCO_CATEGORY_IDS[int(label)],
          'bbox': [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h],
          'area': float(area),
          'iscrowd': int(crowd),
        }
      )
  return {
    'images': images,
    'annotations': annotations,
    'categories': [{'id': c, 'name': n} for c, n in zip(info_lib.COCO_CATEGORY_IDS, names)],
  }


def _open_tfrecord(source_config, *, max_boxes, build_gt):
  files = sorted(tf.io.gfile.glob(source_config.tfrecord_pattern)) if source_config.tfrecord_pattern else []
  if not files:
    raise info_lib.DatasetFileNotFoundError(
      f'no TFRecord files match tfrecord_pattern {source_config.tfrecord_pattern!r}'
    )
  meta = tfrecord.read_info(source_config.tfrecord_pattern)
  tfrecord.check_shards(source_config.tfrecord_pattern, files, meta)
  info = info_lib.DatasetInfo(
    category_ids=meta['category_ids'],
    class_names=meta['class_names'],
    num_examples=int(meta['num_examples']),
    coco_gt=meta.get('coco_gt') if build_gt else None,
  )

  def stream():
    # One reader per shard, cycled one record at a time: the examples come back in the json's order, which the
    # converter dealt out to the shards round-robin. Fewer readers than shards would visit them in another order.
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=len(files))
    return ds.map(
      lambda s: tfrecord.parse_example(s, max_boxes), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )

  return Source(info=info, stream=stream)


def open_source(source_config, config, *, train: bool, cache: SourceCache | None = None) -> Source:
  """Opens the dataset one config section describes; train=True applies the training-only filters."""
  max_boxes = int(config.data.max_boxes)
  kind = source_config.source
  if kind == 'coco_json':
    return _open_coco_json(
      source_config.annotation_file, source_config.image_dir, train=train, max_boxes=max_boxes, cache=cache
    )
  if kind == 'shapes':
    annotation_file, image_dir = shapes.ensure_shapes_split(source_config)
    return _open_coco_json(annotation_file, image_dir, train=train, max_boxes=max_boxes, cache=cache)
  if kind in ('tfds', 'tfrecord'):
    opener = _open_tfds if kind == 'tfds' else _open_tfrecord
    load = lambda: opener(source_config, max_boxes=max_boxes, build_gt=not train)
    key = (kind, repr(sorted(source_config.to_dict().items())), train, max_boxes)
    return cache.get(key, load) if cache is not None else load()
  raise ConfigError(f'data source {kind!r} must be one of {SOURCES}')


def table_example(table: coco_json.ExampleTable, max_boxes: int):
  """Returns fn(row int64) -> raw example read from the table (reads the image file, no decode)."""
  paths = tf.constant(table.paths.astype(str))
  ids = tf.constant(table.image_ids)
  heights, widths = tf.constant(table.heights), tf.constant(table.widths)
  starts = tf.constant(np.concatenate([[0], np.cumsum(table.row_lengths)]).astype(np.int64))
  boxes, classes, crowd = tf.constant(table.boxes), tf.constant(table.classes), tf.constant(table.crowd)

  def fn(row):
    lo, hi = starts[row], starts[row + 1]
    raw = {
      'image_data': tf.io.read_file(paths[row]),
      'image_id': ids[row],
      'height': heights[row],
      'width': widths[row],
    }
    raw.update(decode.pad_ground_truth(boxes[lo:hi], classes[lo:hi], crowd[lo:hi], max_boxes))
    return raw

  return fn
