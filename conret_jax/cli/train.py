"""`conret-train`: trains a config in a workdir, resuming from its latest checkpoint, and evaluates it.

  conret-train --config=configs/shapes_demo.py --workdir=runs/shapes_demo
  conret-train --config=configs/conretinanet_coco.py:depth=50,scale=500 --config.init_from=weights/r50 \
      --workdir=gs://bucket/run --config.train.global_batch_size=64 --config.consistent.enabled=False
  conret-train --workdir=runs/shapes_demo        # resume a run with its saved config

Running the same command again after an interruption (SIGTERM, preemption, a crash) resumes where the newest intact
checkpoint left off (a damaged one is named, moved aside to <step>.damaged and skipped). A resume whose config
changes how training goes on (learning rate, schedule, batch, image size, data, ...) is refused with each change
named, unless --accept_config_changes; accepted changes are recorded in run.json. Extending num_steps moves the
schedule with it (the warm-up and decays are fractions of num_steps): the refusal says where they move and what the
learning rate becomes; keep the old schedule with absolute --config.train.warmup_steps and decay_steps.

The workdir records the run: config.json (the resolved config, which later tools use when
--config is absent) and run.json (the dataset's classes, every command that started the run). Multi-process jobs add
--coordinator_address/--num_processes/--process_id, or rely on the auto-detection of Cloud TPU, Slurm and Open MPI
(see README, "Cloud TPU pod" and "Multi-GPU").
"""

import sys

from absl import app, flags, logging

from conret_jax.cli import startup, tool, tool_flags

tool_flags.define_common_flags()
_ACCEPT = flags.DEFINE_bool(
  'accept_config_changes',
  False,
  'Resume a run with changed training settings (learning rate, schedule, batch, data, ...); without it such a '
  'resume is refused, naming each change. Accepted changes are recorded in run.json.',
)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from conret_jax import config_checks

  if flags.FLAGS.config is not None:  # in seconds, before TensorFlow, devices or compilation
    config_checks.validate_training(flags.FLAGS.config)
  config, workdir = startup.setup('train', writes_workdir=True)
  from conret_jax import run_record
  from conret_jax.train import restore

  changes = run_record.resume_changes(workdir, config, step=restore.latest_step_on_disk(workdir), accept=_ACCEPT.value)
  import jax  # after distributed initialization

  from conret_jax import distributed, eval_files
  from conret_jax.train import loop

  logging.info('%s', distributed.process_info())
  try:
    metrics = loop.train_and_evaluate(config, workdir, config_changes=changes)
  except loop.NonFiniteLossError as e:  # divergence: the last good checkpoint stays; one clear line
    logging.error('%s', e)
    print(f'conret-train: error: {e}', file=sys.stderr, flush=True)
    sys.exit(3)
  if metrics and jax.process_index() == 0:
    step = int(config.train.num_steps)
    record = eval_files.record_for(workdir, step, config, config)  # the folder the loop's evaluation wrote
    per_class = eval_files.read_per_class(record.directory)
    print(eval_files.format_metrics(metrics, per_class, title=f'{workdir}, step {step}{record.suffix}'), flush=True)


def main():
  flag_names = tool_flags.COMMON_FLAGS + ('accept_config_changes',) + tool_flags.DISTRIBUTED_FLAGS
  tool.run(_main, tool='conret-train', doc=__doc__, flag_names=flag_names)


if __name__ == '__main__':
  main()
