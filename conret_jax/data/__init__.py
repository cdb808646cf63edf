"""The tf.data input pipeline: sources (tfds, COCO json, TFRecords, synthetic shapes), decoding, preprocessing.

Public API (loaded lazily, so `import conret_jax.data.info` does not pull in TensorFlow):
  make_train_iterator(config, mesh, data_sharding, *, start_step=0)  endless, resumable global batches
  make_eval_iterator(config, mesh, data_sharding)                     one pass, padded last batch
  host_batches(config, process_index, process_count, *, train, start_step)  this host's numpy batches
  dataset_info(source_config, config) -> DatasetInfo;  check_num_classes(info, config);  DatasetError
  run_input_bench(config, num_batches) -> dict                        the input benchmark

The batch layout (data -> train step -> evaluation), a dict of arrays with a leading global-batch axis B:
  images         float32 [B, H, W, 3]  RGB in [0, 255], resized and padded at the bottom/right
  boxes          float32 [B, M, 4]     x1y1x2y2 in the resized image's pixels (M = config.data.max_boxes)
  classes        int32   [B, M]        contiguous class index 0..K-1 (0 on padding rows)
  valid          bool    [B, M]        real annotation rows (crowd rows are valid too)
  crowd          bool    [B, M]        iscrowd rows: never matched as positives
  image_id       int32   [B]           the dataset's image id (-1 for padding examples)
  orig_hw        int32   [B, 2]        original image height, width
  scale          float32 [B]           resized / original size (same for x and y)
  example_valid  bool    [B]           False for the examples that pad the last eval batch
Class index i is the dataset's i-th smallest category id (`info.DatasetInfo.category_ids[i]`).
"""

import importlib

_LAZY = {
    'make_train_iterator': 'conret_jax.data.pipeline',
    'make_eval_iterator': 'conret_jax.data.pipeline',
    'host_batches': 'conret_jax.data.pipeline',
    'host_dataset': 'conret_jax.data.pipeline',
    'dataset_info': 'conret_jax.data.pipeline',
    'DatasetInfo': 'conret_jax.data.info',
    'DatasetError': 'conret_jax.data.info',
    'check_num_classes': 'conret_jax.data.info',
    'run_input_bench': 'conret_jax.data.bench',
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module conret_jax.data has no attribute {name!r}')
  return getattr(importlib.import_module(_LAZY[name]), name)
