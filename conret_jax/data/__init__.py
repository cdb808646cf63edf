"""The tf.data input pipeline: sources (tfds, COCO json, TFRecords, synthetic shapes), decoding, preprocessing.

The entry points, loaded lazily so that `conret_jax.data.info` never pulls in TensorFlow:
  dataset_info(source_config, config)                  -> DatasetInfo (category ids, names, COCO ground truth)
  make_train_iterator(config, mesh, sharding, start_step)  endless, resumable global batches
  make_eval_iterator(config, mesh, sharding)           one pass, every image once across hosts
"""

import importlib

_LAZY = {
    'dataset_info': 'conret_jax.data.pipeline',
    'make_train_iterator': 'conret_jax.data.pipeline',
    'make_eval_iterator': 'conret_jax.data.pipeline',
    'DatasetInfo': 'conret_jax.data.info',
    'DatasetError': 'conret_jax.data.info',
    'check_num_classes': 'conret_jax.data.info',
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module conret_jax.data has no attribute {name!r}')
  return getattr(importlib.import_module(_LAZY[name]), name)
