"""`conret-eval`: COCO evaluation of a checkpoint, with the same code the trainer uses.

  conret-eval --workdir=DIR [--step=N] [--config.eval.num_images=500]
  conret-eval --config=configs/retinanet_torchvision.py --config.init_from=weights/tv_retinanet --workdir=DIR

Restores DIR/checkpoints/<N> (default: the latest; without a checkpoint, the weights of config.init_from), runs
`evaluation.evaluate` over config.data.eval, writes DIR/eval/step_N/{detections.json, metrics.json,
detections.png} and prints the metrics, per class too. Without --config it uses the config the run saved
(DIR/config.json). Inference-only settings may differ from training, e.g. `--config.consistent.inference_reg_steps=1`
(Table 3's "2*") or `--config.eval.num_images=500`.
"""

from absl import app, flags

from conret_jax.cli import startup, tool, tool_flags

tool_flags.define_common_flags()

tool_flags.define_step_flag()


def run(config, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """Restores and evaluates; returns (step, metrics)."""
  from conret_jax import (
    config_checks,
    evaluation,
  )
  from conret_jax import data as data_lib
  from conret_jax.train import restore as restore_lib

  config_checks.validate(config)
  cache = data_lib.SourceCache()
  info = data_lib.dataset_info(config.data.eval, config, train=False, cache=cache)
  data_lib.check_num_classes(info, config)  # a model of other classes would be scored under the wrong names
  model, variables, step, mesh = restore_lib.restore_for_inference(config, workdir, step)
  metrics = evaluation.evaluate(model, variables, config, mesh, workdir=workdir, step=step, info=info, cache=cache)
  return step, metrics


def _main(argv):
  from conret_jax.train import restore as restore_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  restore_lib.check_weights_available(flags.FLAGS.config, flags.FLAGS.workdir or '', flags.FLAGS.step)
  config, workdir = startup.setup('eval', writes_workdir=False)
  import jax

  from conret_jax import evaluation

  step, metrics = run(config, workdir, flags.FLAGS.step)
  if jax.process_index() == 0:
    print(
      evaluation.format_metrics(metrics, evaluation.read_per_class(workdir, step), title=f'{workdir}, step {step}'),
      flush=True,
    )


def main():
  tool.run(
    _main,
    tool='conret-eval',
    doc=__doc__,
    flag_names=tool_flags.COMMON_FLAGS + ('step',) + tool_flags.DISTRIBUTED_FLAGS,
  )


if __name__ == '__main__':
  main()
