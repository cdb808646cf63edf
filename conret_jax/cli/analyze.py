"""`conret-analyze`: the paper's analysis of a run (Figures 3 and 5): how anchors localize before and after
regression, and how the scores follow the IoU.

  conret-analyze --workdir=DIR --output=OUT [--step=N] [--num_images=N] [--compare=DIR2]

Restores DIR/checkpoints/<N> (default: the latest; without a checkpoint, the weights of config.init_from), runs it
over config.data.eval on the accelerator with conret-eval's inference (the detector's anchors and decoding, the same
post-processing) and writes, in OUT only (nothing in DIR):
  localization.png   Figure 3: IoU with the nearest ground truth before vs after regression, for anchors near objects
  score_iou.png      Figure 5: (a, b) score mean and std by output IoU, (c, d) output IoU mean and std by input IoU
  analysis.json      the binned numbers behind both, the definitions used, the run, step and number of images
--compare=DIR2 adds a second run (e.g. the RetinaNet baseline of the same budget) to both figures, in its own colour,
and to analysis.json under `compare`; DIR2's latest checkpoint runs with DIR2's own config.json. Without --config,
DIR's saved config is used. What counts (which anchors, which detections, crowd regions) is in
conret_jax/analysis.py and analysis.json's `definitions`.
"""

import os

from absl import app, flags, logging

from conret_jax.cli import startup, tool, tool_flags
from conret_jax.errors import ConfigError

tool_flags.define_common_flags()

_OUTPUT = flags.DEFINE_string('output', None, 'Folder for localization.png, score_iou.png and analysis.json.')
_NUM_IMAGES = flags.DEFINE_integer(
  'num_images', None, 'Analyze the first N eval images (default: config.eval.num_images; 0: all).'
)
_COMPARE = flags.DEFINE_string('compare', None, 'A second workdir (written by conret-train) drawn beside --workdir.')
tool_flags.define_step_flag()


def label(workdir: str, method: str) -> str:
  """How a run is named in the figures' legends: its folder and its method."""
  return f'{os.path.basename(os.path.normpath(workdir))} ({method})'


def run(config, workdir: str, step: int | None = None, num_images: int | None = None) -> dict:
  """Restores and analyzes one run; returns `analysis.analyze`'s results with workdir, step and label."""
  from conret_jax import analysis, config_checks, evaluation
  from conret_jax import data as data_lib
  from conret_jax.train import restore as restore_lib

  if num_images is not None:
    config = config.copy_and_resolve_references()
    config.eval.num_images = int(num_images)
  config_checks.validate(config)  # with num_images in it: a negative one is refused too
  cache = data_lib.SourceCache()
  info = data_lib.dataset_info(config.data.eval, config, train=False, cache=cache)
  classes = evaluation.run_classes(workdir)
  if classes is None:
    data_lib.check_num_classes(info, config)
  model, variables, step, mesh = restore_lib.restore_for_inference(config, workdir, step)
  data = evaluation.EvalData(info=info, cache=cache)
  results = analysis.analyze(model, variables, config, mesh, classes=classes, data=data)
  return dict(workdir=workdir, step=step, label=label(workdir, results['method']), **results)


def compare_config(workdir: str | None):
  """The config of the --compare run (its own config.json), checked before anything heavy; None without one."""
  from conret_jax.train import restore as restore_lib

  if workdir is None:
    return None
  from conret_jax import run_record

  startup.check_workdir(workdir, create=False, flag='compare')
  if not run_record.has_record(workdir):
    raise ConfigError(f'--compare={workdir} holds no {run_record.CONFIG_FILE}: name a workdir that conret-train wrote')
  config = run_record.load_config(workdir)
  restore_lib.check_weights_available(config, workdir, None)
  return config


def _main(argv):
  from conret_jax.train import restore as restore_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUTPUT.value:
    raise app.UsageError('--output is required')
  if _NUM_IMAGES.value is not None and _NUM_IMAGES.value < 0:  # would cut images off the end of the eval set
    raise app.UsageError(f'--num_images={_NUM_IMAGES.value} must be >= 0 (0: every image)')
  restore_lib.check_weights_available(flags.FLAGS.config, flags.FLAGS.workdir or '', flags.FLAGS.step)
  other = compare_config(_COMPARE.value)
  config, workdir = startup.setup('analyze', writes_workdir=False, log_to_workdir=False)
  output = startup.check_workdir(_OUTPUT.value, create=True, flag='output')
  import jax

  from conret_jax import analysis

  startup.setup_logging(output, 'analyze')  # OUT/analyze.log on process 0
  runs = [run(config, workdir, flags.FLAGS.step, _NUM_IMAGES.value)]
  if other is not None:
    if other.data.eval.to_dict() != config.data.eval.to_dict():
      logging.warning(
        "--compare=%s evaluates on config.data.eval of its own, which differs from this run's: the two "
        'runs are measured on different images',
        _COMPARE.value,
      )
    runs.append(run(other, _COMPARE.value, None, _NUM_IMAGES.value))
  if jax.process_index() == 0:
    analysis.write(output, runs)
    for r in runs:
      near = r['fig3']['num_anchors']
      print(f'{r["label"]}, step {r["step"]}: {r["num_images"]} images, {near} anchors near objects', flush=True)
    print(f'wrote localization.png, score_iou.png and analysis.json to {output}', flush=True)
    logging.info('analysis written to %s', output)


def main():
  tool.run(
    _main,
    tool='conret-analyze',
    doc=__doc__,
    flag_names=tool_flags.COMMON_FLAGS + ('output', 'step', 'num_images', 'compare') + tool_flags.DISTRIBUTED_FLAGS,
  )


if __name__ == '__main__':
  main()
