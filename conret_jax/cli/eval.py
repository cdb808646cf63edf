"""`conret-eval`: COCO evaluation of a checkpoint, with the same code the trainer uses.

  conret-eval --workdir=DIR [--step=N] [--config.eval.num_images=500]
  conret-eval --config=configs/retinanet_torchvision.py --config.init_from=weights/tv_retinanet --workdir=DIR

Restores DIR/checkpoints/<N> (default: the newest that restores; without a checkpoint, the weights of
config.init_from), runs `evaluation.evaluate` over config.data.eval with the classes the run was trained on
(DIR/run.json), writes DIR/eval/step_N/{detections.json, metrics.json, detections.png} and prints the metrics, per
class too. Without --config it uses the config the run saved (DIR/config.json). Settings that change the results
may differ from the run's, e.g. `--config.consistent.inference_reg_steps=1` (Table 3's "2*") or
`--config.eval.num_images=500`: such an evaluation is written next to the run's own, in
DIR/eval/step_N+consistent.inference_reg_steps=1/ (one `+key=value` per setting that differs, and a settings.json),
never over it.
"""

from absl import app, flags

from conret_jax.cli import startup, tool, tool_flags

tool_flags.define_common_flags()
tool_flags.define_step_flag()


def run(config, workdir: str, step: int | None = None) -> tuple:
  """Restores and evaluates; returns (the eval_files.Record written, metrics)."""
  from conret_jax import config_checks, eval_files, evaluation, run_record
  from conret_jax import data as data_lib
  from conret_jax.train import restore as restore_lib

  config_checks.validate(config)
  cache = data_lib.SourceCache()
  info = data_lib.dataset_info(config.data.eval, config, train=False, cache=cache)
  classes = evaluation.run_classes(workdir)
  if classes is None:  # weights without a training record: the eval set's categories must fit the model
    data_lib.check_num_classes(info, config)
  model, variables, step, mesh = restore_lib.restore_for_inference(config, workdir, step)
  run_config = run_record.load_config(workdir) if run_record.has_record(workdir) else None
  record = eval_files.record_for(workdir, step, run_config, config)
  data = evaluation.EvalData(info=info, cache=cache)
  metrics = evaluation.evaluate(model, variables, config, mesh, classes=classes, record=record, data=data)
  return record, metrics


def _main(argv):
  from conret_jax.train import restore as restore_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  restore_lib.check_weights_available(flags.FLAGS.config, flags.FLAGS.workdir or '', flags.FLAGS.step)
  config, workdir = startup.setup('eval', writes_workdir=False)
  import jax

  from conret_jax import eval_files

  record, metrics = run(config, workdir, flags.FLAGS.step)
  if jax.process_index() == 0:
    title = f'{workdir}, step {record.step}{record.suffix}'
    print(eval_files.format_metrics(metrics, eval_files.read_per_class(record.directory), title=title), flush=True)


def main():
  tool.run(
    _main,
    tool='conret-eval',
    doc=__doc__,
    flag_names=tool_flags.COMMON_FLAGS + ('step',) + tool_flags.DISTRIBUTED_FLAGS,
  )


if __name__ == '__main__':
  main()
