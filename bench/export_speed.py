"""The exported SavedModel against conret_jax.detect on CPU, on the same images, in one process.

  python bench/export_speed.py [--config configs/shapes_demo.py] [--batch 8] [--image_hw 480,640] [--rounds 7]
      [--calls 3] [--score_threshold 0.001]

The config's network with freshly initialised weights, as a conret_jax.load predictor, is exported with
conret_jax.export (into a temporary folder) and loaded back with tf.saved_model.load. Timed, in alternating order
within each round (`--calls` calls per entry per round; medians over the rounds, after one untimed call each; the
SavedModel's first call, which compiles it for the batch size, is reported alone):
  saved_model  serving_default on uint8 [B, H, W, 3] images: resize and padding in TensorFlow, the network,
               decoding, top-k and NMS in the converted XLA module, boxes back to image pixels;
  detect       conret_jax.detect (jitted, batched post-processing) on the same images already resized and padded
               (preparation not timed: the model and post-processing alone);
  predict      Predictor.predict on the same images (its TF resize, detect, boxes back to image pixels).
Fresh weights score every anchor near the prior (0.01), under the config's 0.05 threshold: --score_threshold
(default 0.001) keeps candidates, so that top-k and NMS do the work they do for a trained model. Checks that the
SavedModel's detections equal predict's (classes, scores within 1e-4). Prints one JSON line.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, 'bench'))
from postprocess_share import cpu_model  # noqa: E402 (bench/, the script's folder)


def _predictor(config_path: str, score_threshold: float):
  from conret_jax import detectors
  from conret_jax.cli.import_weights import load_config
  from conret_jax.data import shapes
  from conret_jax.data.info import ClassLayout
  from conret_jax.predictor import Predictor

  config = load_config(config_path)
  config.eval.score_threshold = score_threshold
  model = detectors.build_model(config)
  side = detectors.from_config(config, model).input_size.smallest()
  variables = detectors.init_variables(model, jax.random.PRNGKey(0), side)
  n = int(config.model.num_classes)
  ids = tuple(shapes.CATEGORY_IDS) if n == len(shapes.CATEGORY_IDS) else tuple(range(1, n + 1))
  classes = ClassLayout('contiguous', n, ids, tuple(f'class {i}' for i in ids))
  return Predictor(config, model, variables, classes, 0)


def _entries(predictor, saved, images):
  """{name: a call that runs it to completion on `images` [B, H, W, 3] uint8}."""
  import tensorflow as tf

  from conret_jax import detect
  from conret_jax.data.sizes import pad_value_of
  from conret_jax.predictor import prepare_image

  config = predictor.config
  prepared = [prepare_image(image, config.data, pad_value_of(config.model)) for image in images]
  batch = np.stack([p[0] for p in prepared])
  sizes = np.array([p[2] for p in prepared], np.int32)
  serving = saved.signatures['serving_default']
  return {
    'saved_model': lambda: serving(images=tf.constant(images))['num_detections'].numpy(),
    'detect': lambda: jax.block_until_ready(detect(predictor.model, predictor.variables, batch, config, sizes)),
    'predict': lambda: predictor.predict(images),
  }


def _timed(entries: dict, rounds: int, calls: int) -> dict:
  """Median seconds per call of each entry, after one call each (compiled already by `_check`)."""
  for fn in entries.values():
    fn()
  seconds = {name: [] for name in entries}
  for r in range(rounds):
    names = list(entries) if r % 2 == 0 else list(reversed(entries))  # alternate which goes first
    for name in names:
      start = time.perf_counter()
      for _ in range(calls):
        entries[name]()
      seconds[name].append((time.perf_counter() - start) / calls)
  return {name: statistics.median(s) for name, s in seconds.items()}


def _check(saved, predictor, images) -> dict:
  """The SavedModel's detections against predict's: scores within 1e-4 slot by slot, and the same class in every slot
  except where two scores lie within 1e-6 (TF's XLA and JAX's round a few float32 scores differently, about 1e-7
  here, which may order such a near-tie the other way)."""
  import tensorflow as tf

  start = time.perf_counter()  # the first call of this batch size: XLA compiles the model for it
  out = {k: v.numpy() for k, v in saved.signatures['serving_default'](images=tf.constant(images)).items()}
  first_call_s = time.perf_counter() - start
  compared, worst, swapped = 0, 0.0, 0
  for row, want in enumerate(predictor.predict(images)):
    n = int(out['num_detections'][row])
    assert n == len(want['scores']), (n, len(want['scores']))
    worst = max(worst, float(np.abs(out['scores'][row, :n] - want['scores']).max(initial=0.0)))
    gaps = np.abs(np.diff(want['scores']))
    near_tie = np.zeros(n, bool)
    near_tie[:-1] |= gaps < 1e-6
    near_tie[1:] |= gaps < 1e-6
    differ = out['classes'][row, :n] != want['category_ids']
    assert not (differ & ~near_tie).any(), np.nonzero(differ & ~near_tie)
    compared, swapped = compared + n, swapped + int(differ.sum())
  assert worst <= 1e-4, worst
  return {
    'saved_model_first_call_s': round(first_call_s, 2),
    'detections_compared': compared,
    'max_score_difference': worst,
    'classes_swapped_in_near_ties': swapped,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default=os.path.join(_ROOT, 'configs', 'shapes_demo.py'))
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--image_hw', default='480,640')
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--calls', type=int, default=3, help='calls per entry per round')
  p.add_argument('--score_threshold', type=float, default=0.001)
  args = p.parse_args()
  import tensorflow as tf

  import conret_jax
  from conret_jax.data import sizes

  predictor = _predictor(args.config, args.score_threshold)
  h, w = (int(v) for v in args.image_hw.split(','))
  images = np.random.default_rng(0).integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    path = conret_jax.export.export(predictor, os.path.join(folder, 'model'))
    export_s = time.perf_counter() - start
    saved = tf.saved_model.load(path)
    check = _check(saved, predictor, images)
    seconds = _timed(_entries(predictor, saved, images), args.rounds, args.calls)
  result = {
    'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    'machine': f'{cpu_model()}, {os.cpu_count()} cores',
    'load_1min': round(os.getloadavg()[0], 2),
    'versions': {'jax': jax.__version__, 'tensorflow': tf.__version__},
    'config': os.path.relpath(args.config, _ROOT),
    'batch': args.batch,
    'image_hw': [h, w],
    'padded_shapes': {k: list(v) for k, v in sizes.padded_shapes(predictor.config.data).items()},
    'export_s': round(export_s, 1),
    'median_s_per_batch': {k: round(v, 4) for k, v in seconds.items()},
    'images_per_s': {k: round(args.batch / v, 2) for k, v in seconds.items()},
    'saved_model_time_over_detect': round(seconds['saved_model'] / seconds['detect'], 3),
    **check,
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
