"""The focal loss's hand-written gradient against autodiff's, in the whole train step, alternating in one process.

  python bench/focal_gradient.py --config=configs/retinanet_torchvision.py --config.consistent.enabled=true \
      --config.data.resize=square --config.data.image_size=512 --config.train.global_batch_size=2 \
      --config.eval.global_batch_size=2 --config.model.backbone.allow_random_frozen=true \
      [--pairs=5] [--steps=2] [--loss_repeats=10] [--json_out=FILE]

Four steps are compiled: RetinaNet (the config with consistent.enabled=False) and the config as given (ConRetinaNet
when consistent is enabled), each with `losses.classification_losses` (the training code: one exp and one log1p per
logit, gradient written by hand) and with `losses.classification_losses_autodiff` (the same sums through autodiff
of log-sigmoids). Blocks of --steps steps then alternate over the four, --pairs times, so a drift of the machine's
load falls on all alike. Per step: wall and process CPU seconds; per variant also the first step's loss, which
agrees between the two implementations up to float rounding (the same sums, evaluated differently). With
--loss_repeats, bench/step_compare.py's loss-alone timing (targets, loss forward, forward+backward to the head
outputs) runs once per implementation. Prints a Markdown table and, last, one JSON line. Imports no TensorFlow.
"""

import os
import statistics
import time

import step_compare  # bench/step_compare.py, next to this file (python puts the script's folder on sys.path)
from absl import app, flags

from conret_jax.core import losses
from conret_jax.train import bench

# The flags are bench/step_compare.py's (importing it defines them): --config, --steps (per block), --pairs (here:
# rounds over the four variants), --loss_repeats (0 skips the loss-alone timing), --json_out.
_ROUNDS, _STEPS = step_compare._PAIRS, step_compare._STEPS
_LOSS_REPEATS, _JSON_OUT = step_compare._LOSS_REPEATS, step_compare._JSON_OUT

GRADIENTS = {'hand': losses.classification_losses, 'autodiff': losses.classification_losses_autodiff}


def _with_gradient(name, fn, *args):
  """fn(*args) with losses.classification_losses replaced by the GRADIENTS[name] implementation."""
  saved = losses.classification_losses
  losses.classification_losses = GRADIENTS[name]
  try:
    return fn(*args)
  finally:
    losses.classification_losses = saved


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required')
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
  models = step_compare._variants(config)  # {'retinanet': ..., 'conretinanet': ...}
  # StepRunner traces and compiles in its constructor, so the implementation in place then is the one compiled.
  runners = {
    (model, grad): _with_gradient(grad, bench.StepRunner, cfg) for model, cfg in models.items() for grad in GRADIENTS
  }
  first_loss = {key: float(r.metrics['loss']) for key, r in runners.items()}  # the warm-up step, from one state
  times = {key: ([], []) for key in runners}
  for r in range(_ROUNDS.value):
    for key in runners if r % 2 == 0 else list(runners)[::-1]:
      wall, cpu = runners[key].run(_STEPS.value)
      times[key][0].extend(wall)
      times[key][1].extend(cpu)
  result = {'started': started, 'variants': {}}
  lines = ['| model | focal gradient | wall median s (min) | CPU median s | first loss |', '|---|---|---|---|---|']
  for (model, grad), runner in runners.items():
    wall, cpu = times[(model, grad)]
    v = {
      'wall_median_s': statistics.median(wall),
      'wall_min_s': min(wall),
      'cpu_median_s': statistics.median(cpu),
      'first_loss': first_loss[(model, grad)],
      'steps': len(wall),
    }
    result['variants'][f'{model}/{grad}'] = v
    lines.append(
      f'| {model} | {grad} | {v["wall_median_s"]:.3f} ({v["wall_min_s"]:.3f}) | {v["cpu_median_s"]:.3f} | '
      f'{v["first_loss"]:.6f} |'
    )
  med = lambda model, grad: result['variants'][f'{model}/{grad}']['wall_median_s']
  for model in models:
    result[f'{model}_hand_over_autodiff'] = med(model, 'hand') / med(model, 'autodiff')
  for grad in GRADIENTS:
    result[f'consistent_over_retinanet_{grad}'] = med('conretinanet', grad) / med('retinanet', grad)
  lines.append(
    '\nhand / autodiff (wall medians): '
    + ', '.join(f'{m} {result[f"{m}_hand_over_autodiff"]:.3f}' for m in models)
    + '; ConRetinaNet / RetinaNet: '
    + ', '.join(f'{g} {result[f"consistent_over_retinanet_{g}"]:.3f}' for g in GRADIENTS)
  )
  if _LOSS_REPEATS.value:
    hw = runners[('retinanet', 'hand')].image_hw
    result['loss_only'] = {
      grad: _with_gradient(grad, step_compare.loss_only, models, hw, _LOSS_REPEATS.value) for grad in GRADIENTS
    }
    lines += ['', '| loss alone (jit), wall ms | gradient | targets | loss forward | forward+backward |']
    lines.append('|---|---|---|---|---|')
    for grad, loss in result['loss_only'].items():
      for model in models:
        cells = [f'{1e3 * loss[model][kind]["wall_s"]:.1f}' for kind in ('targets', 'forward', 'forward_backward')]
        lines.append(f'| {model} | {grad} | {" | ".join(cells)} |')
  result.update(
    step_compare.run_environment(),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    batch=config.train.global_batch_size,
    image_hw=list(runners[('retinanet', 'hand')].image_hw),
  )
  step_compare.emit('\n'.join(lines), result)


if __name__ == '__main__':
  app.run(main)
