"""The tf.data input pipeline: sources (tfds, COCO json, TFRecords, synthetic shapes), decoding, preprocessing.

Public API (loaded lazily, so `import conret_jax.data.info` does not pull in TensorFlow):
  make_train_iterator(config, mesh, data_sharding, *, start_step=0, cache=None)  endless, resumable global batches
  make_eval_iterator(config, mesh, data_sharding, *, cache=None)                  one pass, padded last batch
  host_batches(config, process_index, process_count, *, train, start_step)       this host's numpy batches
  dataset_info(source_config, config, train=...) -> DatasetInfo;  check_num_classes(info, config);  DatasetError
  SourceCache()                                  opened sources, shared by the calls it is passed to
  run_input_bench(config, num_batches) -> dict   the input benchmark

Every batch is a conret_jax.batch.Batch (its fields and shapes are defined there). Its `classes` are the model's
class indices: the dataset's contiguous category numbers mapped through data.info.ClassLayout.
TensorFlow only feeds the host: the command-line tools keep it off accelerators at start-up
(conret_jax/cli/startup.py); a program that builds the pipeline on a GPU host should do the same first.
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
  'SourceCache': 'conret_jax.data.sources',
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module conret_jax.data has no attribute {name!r}')
  return getattr(importlib.import_module(_LAZY[name]), name)
