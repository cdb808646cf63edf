"""Train and eval iterators: per-host tf.data pipelines assembled into global, sharded jax.Arrays.

Position = step. Training runs in epochs of `batches_per_epoch` global batches (bpe = N // B - (buckets - 1), the
same every epoch). Step t is batch t % bpe of epoch t // bpe. Indexed sources draw epoch e's order from
np.random.RandomState([seed, e]); streamed sources from a tf.data shuffle seeded by (seed, e). Images are grouped
into batches of one padded shape (one bucket for 'square' and 'stretch', landscape/portrait for 'short_side'); a
batch is emitted when its bucket fills, and the first bpe of them make the epoch (bpe is always reachable, see
_epoch_plan).
Augmentation is seeded by (seed, global example index = e * N + position in epoch e's order). Restoring at step t
skips straight to (epoch, batch): nothing before it is decoded (streamed sources read, but do not decode, the
records of the skipped batches of that one epoch).

Hosts: every host builds the same sequence of GLOBAL batches of example references and keeps the contiguous slice
[p * B / P, (p + 1) * B / P) of each, which is the layout jax.make_array_from_process_local_data gives a batch
sharded over 'data'. So global example j of step t is the same image, same augmentation, for any host count.
Evaluation visits every image once in its source order (per bucket), the last batch of each bucket padded with
copies flagged example_valid=False.
"""

import collections

import numpy as np
import tensorflow as tf

from conret_jax.batch import FIELDS, Batch
from conret_jax.data import info as info_lib
from conret_jax.data import preprocess, sizes, sources

BATCH_KEYS = FIELDS


def num_buckets(data_config) -> int:
  return len(preprocess.padded_shapes(data_config))


def batches_per_epoch(num_examples: int, global_batch_size: int, data_config) -> int:
  """Full batches every epoch is guaranteed to have: with k buckets at most k-1 partial batches are left over."""
  bpe = num_examples // global_batch_size - (num_buckets(data_config) - 1)
  if bpe < 1:
    raise info_lib.DatasetError(
      f'{num_examples} training examples cannot fill one batch of {global_batch_size} per epoch '
      f'({num_buckets(data_config)} shape buckets)'
    )
  return bpe


def train_position(step: int, bpe: int) -> tuple:
  """(epoch, batch index within the epoch) of a global step."""
  return divmod(int(step), bpe)


def _host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(f'global batch size {global_batch} is not divisible by the process count {process_count}')
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _buckets_of(table, data_config) -> np.ndarray:
  if num_buckets(data_config) == 1:
    return np.zeros(len(table), np.int64)
  return (table.widths < table.heights).astype(np.int64)


def _epoch_plan(buckets: np.ndarray, batch: int, seed: int, epoch: int, bpe: int):
  """Global batches of epoch `epoch`: (rows [bpe, B] table rows, index [bpe, B] global example indices)."""
  n = len(buckets)
  perm = np.random.RandomState([seed % 2**32, epoch % 2**32]).permutation(n)
  chunks, ends = [], []
  for b in np.unique(buckets):
    pos = np.nonzero(buckets[perm] == b)[0]
    k = len(pos) // batch
    chunks.append(pos[: k * batch].reshape(k, batch))
    ends.append(chunks[-1][:, -1])
  pos = np.concatenate(chunks)[np.argsort(np.concatenate(ends), kind='stable')][:bpe]
  return perm[pos], epoch * n + pos


def _eval_plan(buckets: np.ndarray, batch: int):
  """(rows, index, example_valid) [num_batches, B]: source order per bucket, last batch padded."""
  rows, valid = [], []
  for b in np.unique(buckets):
    idx = np.nonzero(buckets == b)[0]
    pad = -len(idx) % batch
    last_first = idx[len(idx) // batch * batch] if pad else 0  # pad with copies of the last batch's first image
    rows.append(np.concatenate([idx, np.full(pad, last_first)]).reshape(-1, batch))
    valid.append((np.arange(len(idx) + pad) < len(idx)).reshape(-1, batch))
  rows, valid = np.concatenate(rows), np.concatenate(valid)
  return rows, rows.astype(np.int64), valid


def _options(ds):
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def _finish(refs, load, config, source, *, train, local_batch):
  """refs: per-example references -> decoded, preprocessed, locally batched examples."""
  seed = int(config.train.seed)
  data_config = config.data
  class_table = info_lib.ClassLayout.of(source.info, config).model_class
  pad_value = sizes.pad_value_of(config.model)
  pixel_mean = tuple(float(v) for v in config.model.pixel_mean)
  calls = tf.data.AUTOTUNE if int(data_config.num_parallel_calls) < 0 else int(data_config.num_parallel_calls)
  ds = refs.map(
    lambda *r: preprocess.preprocess_example(
      load(*r),
      data_config,
      train=train,
      seed=seed,
      class_table=class_table,
      pad_value=pad_value,
      pixel_mean=pixel_mean,
    ),
    num_parallel_calls=calls,
    deterministic=True,
  )
  return _options(ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def _indexed_dataset(source, config, *, train, process_index, process_count, start_step, limit):
  table, data_config = source.table, config.data
  batch = int(config.train.global_batch_size if train else config.eval.global_batch_size)
  sl = _host_slice(batch, process_index, process_count)
  buckets = _buckets_of(table, data_config)
  seed = int(config.train.seed)
  if train:
    bpe = batches_per_epoch(len(table), batch, data_config)

    def generate():
      epoch, first = train_position(start_step, bpe)
      while True:  # endless; the trainer decides when to stop
        rows, index = _epoch_plan(buckets, batch, seed, epoch, bpe)
        for b in range(first, bpe):
          yield rows[b, sl], index[b, sl], np.ones(sl.stop - sl.start, bool)
        epoch, first = epoch + 1, 0
  else:
    keep = buckets if not limit else buckets[:limit]
    rows, index, valid = _eval_plan(keep, batch)

    def generate():
      for b in range(len(rows)):
        yield rows[b, sl], index[b, sl], valid[b, sl]

  spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.bool))
  refs = tf.data.Dataset.from_generator(generate, output_signature=spec).unbatch()
  read = sources.table_example(table, int(data_config.max_boxes))

  def load(row, index, example_valid):
    raw = read(row)
    raw.update(index=index, example_valid=example_valid)
    return raw

  return _finish(refs, load, config, source, train=train, local_batch=sl.stop - sl.start)


def _streamed_dataset(source, config, *, train, process_index, process_count, start_step, limit):
  data_config = config.data
  batch = int(config.train.global_batch_size if train else config.eval.global_batch_size)
  sl = _host_slice(batch, process_index, process_count)
  n, seed = source.num_examples, int(config.train.seed)
  one_bucket = num_buckets(data_config) == 1

  def key(raw):
    return tf.constant(0, tf.int64) if one_bucket else preprocess.orientation(raw['height'], raw['width'])

  def with_index(offset):
    return lambda k, raw: dict(raw, index=offset + k, example_valid=tf.constant(True))

  if train:
    bpe = batches_per_epoch(n, batch, data_config)
    epoch0, first = train_position(start_step, bpe)
    base = source.stream()

    def epoch_batches(epoch):
      ds = base.shuffle(
        max(1, int(data_config.shuffle_buffer)), seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False
      )
      ds = ds.enumerate().map(with_index(epoch * n))
      ds = ds.group_by_window(key, lambda _, w: w.batch(batch, drop_remainder=True), window_size=batch)
      return ds.take(bpe)

    global_batches = tf.data.Dataset.range(epoch0, 2**62).flat_map(epoch_batches).skip(first)
  else:
    base = source.stream()
    if limit:
      base = base.take(limit)

    def pad(b):  # fill the bucket's last batch with copies of its first example, flagged invalid
      count = tf.shape(b['index'])[0]
      out = {k: tf.concat([v, tf.repeat(v[:1], batch - count, axis=0)], 0) for k, v in b.items()}
      out['example_valid'] = tf.range(batch) < count
      return out

    global_batches = (
      base.enumerate().map(with_index(0)).group_by_window(key, lambda _, w: w.batch(batch), window_size=batch).map(pad)
    )
  refs = global_batches.map(lambda b: {k: v[sl] for k, v in b.items()}).unbatch()
  return _finish(refs, lambda raw: raw, config, source, train=train, local_batch=sl.stop - sl.start)


def host_dataset(
  config,
  process_index: int = 0,
  process_count: int = 1,
  *,
  train: bool = True,
  start_step: int = 0,
  cache: sources.SourceCache | None = None,
) -> tf.data.Dataset:
  """This host's part of every global batch as a tf.data.Dataset of dicts (train: endless; eval: one pass)."""
  source_config = config.data.train if train else config.data.eval
  source = sources.open_source(source_config, config, train=train, cache=cache)
  limit = 0 if train else int(config.eval.num_images)
  build = _indexed_dataset if source.table is not None else _streamed_dataset
  return build(
    source,
    config,
    train=train,
    process_index=process_index,
    process_count=process_count,
    start_step=start_step,
    limit=limit,
  )


def host_batches(
  config,
  process_index: int = 0,
  process_count: int = 1,
  *,
  train: bool = True,
  start_step: int = 0,
  cache: sources.SourceCache | None = None,
):
  """Iterator of this host's rows of each global batch: conret_jax.batch.Batch of numpy arrays."""
  dataset = host_dataset(config, process_index, process_count, train=train, start_step=start_step, cache=cache)
  return map(Batch.of, dataset.as_numpy_iterator())


def dataset_info(
  source_config, config, *, train: bool, cache: sources.SourceCache | None = None
) -> info_lib.DatasetInfo:
  """DatasetInfo of a source, read as training reads it (train=True: the training filters, no coco_gt needed) or as
  evaluation does (the coco_gt restricted to the images the eval iterator visits, config.eval.num_images)."""
  info = sources.open_source(source_config, config, train=train, cache=cache).info
  limit = int(config.eval.num_images)
  if not train and limit and info.coco_gt is not None and limit < len(info.coco_gt['images']):
    images = info.coco_gt['images'][:limit]
    ids = {im['id'] for im in images}
    gt = dict(info.coco_gt, images=images, annotations=[a for a in info.coco_gt['annotations'] if a['image_id'] in ids])
    info = info_lib.DatasetInfo(info.category_ids, info.class_names, len(images), gt)
  return info


class DeviceIterator:
  """Wraps a host iterator: global jax.Arrays via make_array_from_process_local_data, `prefetch` batches ahead."""

  def __init__(self, host_iter, data_sharding, prefetch: int, process_count: int, *, step: int = 0, meta=None):
    self._host_iter, self._sharding = host_iter, data_sharding
    self._prefetch, self._count = max(1, int(prefetch)), process_count
    self._queue = collections.deque()
    self.step = int(step)
    self._meta = dict(meta or {})

  def _to_global(self, local: Batch) -> Batch:
    import jax  # keeps this module importable without jax for tools

    out = {}
    for k, x in local.items():
      sharding = self._sharding[k] if isinstance(self._sharding, dict) else self._sharding
      out[k] = jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * self._count,) + x.shape[1:])
    return Batch.of(out)

  def _fill(self):
    while len(self._queue) < self._prefetch:
      try:
        self._queue.append(self._to_global(next(self._host_iter)))
      except StopIteration:
        break

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    self.step += 1
    return self._queue.popleft()

  def state(self) -> dict:
    """JSON-able position: restart with make_train_iterator(..., start_step=state['step'])."""
    state = dict(self._meta, step=self.step)
    if 'batches_per_epoch' in state:
      state['epoch'], state['batch_in_epoch'] = train_position(self.step, state['batches_per_epoch'])
    return state


def _process():
  import jax

  return jax.process_index(), jax.process_count()


def make_train_iterator(
  config, mesh, data_sharding, *, start_step: int = 0, cache: sources.SourceCache | None = None
) -> DeviceIterator:
  """Endless iterator of global training batches, resumable at `start_step` (its .state() is JSON-able).

  mesh is accepted for symmetry with the trainer; the layout comes from data_sharding (one sharding for every
  leaf, or a dict per batch key), normally NamedSharding(mesh, PartitionSpec('data'))."""
  del mesh
  index, count = _process()
  info = dataset_info(config.data.train, config, train=True, cache=cache)
  bpe = batches_per_epoch(info.num_examples, int(config.train.global_batch_size), config.data)
  it = host_batches(config, index, count, train=True, start_step=start_step, cache=cache)
  meta = {
    'seed': int(config.train.seed),
    'batches_per_epoch': bpe,
    'num_examples': info.num_examples,
    'global_batch_size': int(config.train.global_batch_size),
  }
  return DeviceIterator(it, data_sharding, config.data.prefetch, count, step=start_step, meta=meta)


def make_eval_iterator(config, mesh, data_sharding, *, cache: sources.SourceCache | None = None) -> DeviceIterator:
  """One pass over the eval split: every image exactly once across hosts, padded rows have example_valid=False."""
  del mesh
  index, count = _process()
  it = host_batches(config, index, count, train=False, cache=cache)
  return DeviceIterator(it, data_sharding, config.data.prefetch, count)
