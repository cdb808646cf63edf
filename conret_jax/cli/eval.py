"""`conret-eval`: COCO evaluation of a checkpoint, with the same code the trainer uses.

  conret-eval --config=configs/conretinanet_coco.py --workdir=DIR [--step=N]

Restores DIR/checkpoints/<N> (default: the latest; without a checkpoint, the weights of --config.init_from), runs
`evaluation.evaluate` over config.data.eval, writes DIR/eval/step_N/{detections.json, metrics.json,
detections.png} and prints the metrics. Inference-only settings may differ from training, e.g.
`--config.consistent.inference_reg_steps=1` (Table 3's "2*") or `--config.eval.num_images=500`.
"""

from absl import app
from absl import flags

from conret_jax.cli import common

common.define_step_flag()


def format_metrics(metrics: dict, step: int) -> str:
  """Two aligned rows: metric names, and values in percent (COCO's usual presentation)."""
  names = list(metrics)
  width = max(6, *(len(n) for n in names))
  header = ' '.join(f'{n:>{width}}' for n in names)
  values = ' '.join(f'{100 * metrics[n]:>{width}.2f}' if metrics[n] >= 0 else f'{"-":>{width}}' for n in names)
  return f'step {step}\n{header}\n{values}'


def run(config, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """Restores and evaluates; returns (step, metrics)."""
  from conret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from conret_jax import evaluation  # pylint: disable=g-import-not-at-top

  config_checks.validate(config)
  model, variables, step, mesh = common.restore_for_inference(config, workdir, step)
  metrics = evaluation.evaluate(model, variables, config, mesh, workdir=workdir, step=step)
  return step, metrics


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = common.setup('eval')
  import jax  # pylint: disable=g-import-not-at-top
  step, metrics = run(config, workdir, flags.FLAGS.step)
  if jax.process_index() == 0:
    print(format_metrics(metrics, step), flush=True)


def main():
  app.run(_main)


if __name__ == '__main__':
  main()
