"""`conret-train`: trains a config in a workdir, resuming from its latest checkpoint, and evaluates it.

  conret-train --config=configs/shapes_demo.py --workdir=runs/shapes_demo
  conret-train --config=configs/conretinanet_coco.py:depth=50,scale=500 --workdir=gs://bucket/run \
      --config.train.global_batch_size=64 --config.consistent.enabled=False

Running the same command again after an interruption (SIGTERM, preemption, a crash) resumes where the last
checkpoint left off. Multi-process jobs add --coordinator_address/--num_processes/--process_id, or rely on the
auto-detection of Cloud TPU, Slurm and Open MPI (see README, "Cloud TPU pod" and "Multi-GPU").
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from conret_jax.cli import common


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from conret_jax import config_checks  # pylint: disable=g-import-not-at-top
  config_checks.validate_training(flags.FLAGS.config)  # in seconds, before TensorFlow, devices or compilation
  config, workdir = common.setup('train')
  import jax  # pylint: disable=g-import-not-at-top  (after distributed initialization)
  from conret_jax.train import loop  # pylint: disable=g-import-not-at-top
  from conret_jax import distributed  # pylint: disable=g-import-not-at-top
  from conret_jax.data.info import DatasetError  # pylint: disable=g-import-not-at-top

  logging.info('%s', distributed.process_info())
  try:
    metrics = loop.train_and_evaluate(config, workdir)
  except (ValueError, DatasetError, FileNotFoundError, loop.NonFiniteLossError) as e:
    # Configuration, data and divergence errors are the user's to fix: one clear line, no traceback.
    logging.error('%s', e)
    print(f'conret-train: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2 if not isinstance(e, loop.NonFiniteLossError) else 3)
  if metrics and jax.process_index() == 0:
    print(json.dumps({'eval': metrics}), flush=True)


def main():
  app.run(_main)


if __name__ == '__main__':
  main()
