"""`conret-export`: a trained run as a TensorFlow SavedModel, for TF Serving or tf.saved_model.load.

  conret-export --workdir=DIR --output=OUT [--step=N] [--overwrite] [--platforms=cpu,cuda] [--config.KEY=VALUE]

Built on `conret_jax.load(DIR).predict` (conret_jax/predictor.py): the SavedModel holds the predictor's config,
variables and classes, and computes what it computes (conret_jax/export/module.py). Signatures: `serving_default`
(uint8 images [B, H, W, 3], one size per call) and `serving_bytes` (encoded images [B]); outputs `boxes` (x1y1x2y2 in
each image's own pixels), `scores`, `classes` (the dataset's category ids), `num_detections`. Class names: the
model's `labels()` function (tf constants). The eval settings are the run's (config.eval.*,
config.consistent.inference_reg_steps); --config.KEY=VALUE changes one, e.g. --config.eval.score_threshold=0.3.

The batch size is free; the padded input size is fixed by the config (anchors and the network's shapes follow it):
one per orientation for short_side resizing, each image routed to its own. Each new batch size compiles on its first
call. --platforms lists the platforms to serialize for (default: this machine's); the export runs the model here
once before keeping it, so this machine's platform must be among them. The convolutions' lowering is resolved for
the exporting machine when config.model.conv_lowering is 'auto' (on CPU: matrix products for 1x1 convolutions): for
a model to serve on GPU or TPU, export with --config.model.conv_lowering=xla. OUT is written whole or not at all:
an existing, non-empty OUT is refused unless --overwrite, and replaced only once the new model has run.
"""

from absl import app, flags, logging

from conret_jax.cli import startup, tool, tool_flags

tool_flags.define_common_flags()
tool_flags.define_step_flag()

_OUTPUT = flags.DEFINE_string('output', None, 'Folder to write the SavedModel to (created; must be empty or absent).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing, non-empty --output.')
_PLATFORMS = flags.DEFINE_list(
  'platforms', [], "Platforms the model is serialized for, e.g. cpu,cuda (default: this machine's backend)."
)


def _main(argv):
  from conret_jax import config_checks
  from conret_jax import export as export_lib
  from conret_jax.train import restore as restore_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  export_lib.check_output(_OUTPUT.value, _OVERWRITE.value)
  if flags.FLAGS.config is not None:  # in seconds, before the checkpoint is looked for
    config_checks.validate(flags.FLAGS.config)
  restore_lib.check_weights_available(flags.FLAGS.config, flags.FLAGS.workdir or '', flags.FLAGS.step)
  config, workdir = startup.setup('export', writes_workdir=False, distributed_init=False)
  import conret_jax

  predictor = conret_jax.load(workdir, flags.FLAGS.step, config=config)
  path = export_lib.export(predictor, _OUTPUT.value, overwrite=_OVERWRITE.value, platforms=_PLATFORMS.value or None)
  logging.info('wrote the SavedModel of %s (checkpoint step %d) to %s', workdir, predictor.step, path)
  print(f'exported step {predictor.step} of {workdir} -> {path}')


def main():
  tool.run(
    _main,
    tool='conret-export',
    doc=__doc__,
    flag_names=tool_flags.COMMON_FLAGS + ('output', 'overwrite', 'step', 'platforms'),
  )


if __name__ == '__main__':
  main()
