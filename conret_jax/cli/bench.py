"""`conret-bench`: throughput of the train step, of inference, and of the input pipeline, each alone.

  conret-bench step   --config=configs/conretinanet_coco.py --config.data.image_size=512 --steps=10
  conret-bench detect --config=configs/retinanet_torchvision.py --config.data.resize=square \
                      --config.data.image_size=640 --config.eval.global_batch_size=16 --steps=20
  conret-bench input  --config=configs/conretinanet_coco.py --batches=50

The last line printed is one JSON object: for `step`, step_time_s (median), compile_time_s, images_per_s,
step_tflops (the step's FLOPs, counted from its computation: conret_jax/flops.py), peak_memory_mb, device, and mfu
where the chip's peak is known; for `detect`, images_per_s, forward_s, postprocess_s and total_s (medians, each
timed alone; conret_jax/detect_bench.py), device and compute_dtype; for `input`, images_per_s and cpu_cores.
`step` and `detect` import no TensorFlow. Results of record go to bench/RESULTS.md with the machine and the date.
"""

import json

from absl import app, flags

from conret_jax.cli import startup, tool, tool_flags
from conret_jax.errors import ConfigError

tool_flags.define_common_flags()

_STEPS = flags.DEFINE_integer('steps', 10, '`step`, `detect`: timed calls after compilation (median reported).')
_BATCHES = flags.DEFINE_integer('batches', 50, '`input`: batches timed after a warm-up batch.')
_MODES = ('step', 'detect', 'input')


def _main(argv):
  if len(argv) != 2 or argv[1] not in _MODES:
    raise app.UsageError(
      f'name what to time: conret-bench {{{"|".join(_MODES)}}} --config=FILE [--config.key=value ...]'
    )
  config = flags.FLAGS.config
  if config is None:
    raise ConfigError('--config is required, e.g. --config=configs/conretinanet_coco.py')
  startup.setup_logging(None, 'bench')
  if argv[1] == 'step':  # imports no TensorFlow: the GPU image has none
    from conret_jax.train import bench

    result = bench.run_step_bench(config, _STEPS.value)
  elif argv[1] == 'detect':
    from conret_jax import detect_bench

    result = detect_bench.run_detect_bench(config, _STEPS.value)
  else:
    startup.hide_accelerators_from_tf()
    from conret_jax.data import bench

    result = bench.run_input_bench(config, _BATCHES.value)
  print(json.dumps(result), flush=True)


def main():
  tool.run(_main, tool='conret-bench', doc=__doc__, flag_names=('config', 'steps', 'batches', 'debug'))


if __name__ == '__main__':
  main()
