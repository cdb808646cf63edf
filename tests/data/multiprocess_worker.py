"""One process of the 2-process data test (run by test_multiprocess.py, not collected by pytest)."""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


def main():
  port, index, annotation_file, image_dir, out = sys.argv[1:6]
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=int(index))
  from conret_jax.data import pipeline
  from tests.data.conftest import small_config

  config = small_config(annotation_file, image_dir, batch=4, eval_batch=4)
  config.data.scale_jitter = (0.8, 1.2)
  mesh = jax.make_mesh((4,), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  it = pipeline.make_train_iterator(config, mesh, sharding, start_step=1)
  result = {}
  for step in range(2):
    batch = next(it)
    result[f'train{step}'] = {
      k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True)).tolist()
      for k in ('image_id', 'boxes', 'scale')
    }
  ids = [
    np.asarray(multihost_utils.process_allgather(b['image_id'], tiled=True)).tolist()
    for b in pipeline.make_eval_iterator(config, mesh, sharding)
  ]
  result['eval_ids'] = ids
  result['state'] = it.state()
  with open(out, 'w') as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
