"""`conret-predict`: detections on image files, drawn on the original images and written as json.

  conret-predict --workdir=DIR --images='photos/*.jpg' --output=OUT [--score_threshold=0.3] [--step=N]

Each image is resized and padded exactly as the eval pipeline does (same scale rule, same TF bilinear resize, zero
padding at the bottom/right), run through `conret_jax.detect` on one device, and its boxes are mapped back to the
original pixels. Class names are those the run recorded at training time (DIR/run.json); without --config the
run's own config (DIR/config.json) is used. Writes OUT/<image name>.png (boxes, class names, scores) and
OUT/detections.json:
  [{'image': path, 'output': png path, 'height', 'width',
    'detections': [{'bbox': [x, y, w, h], 'score', 'category_id', 'class_name'}]}]
"""

import glob
import json
import os

import numpy as np
from absl import app, flags, logging

from conret_jax.cli import startup, tool, tool_flags
from conret_jax.errors import UserError

tool_flags.define_common_flags()

_IMAGES = flags.DEFINE_string('images', None, 'Glob of input images; several globs separated by commas.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output folder for the drawn images and detections.json.')
_SCORE = flags.DEFINE_float('score_threshold', 0.3, 'Keep (and draw) detections scoring at least this.')
flags.DEFINE_alias('score-threshold', 'score_threshold')
tool_flags.define_step_flag()

_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def list_images(patterns: str) -> list[str]:
  """Sorted files matching any of the comma-separated globs (a folder means every image in it)."""
  paths = set()
  for pattern in (p.strip() for p in patterns.split(',') if p.strip()):
    if os.path.isdir(pattern):
      pattern = os.path.join(pattern, '*')
    paths.update(p for p in glob.glob(pattern) if os.path.isfile(p) and p.lower().endswith(_IMAGE_EXTENSIONS))
  return sorted(paths)


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB, with the EXIF orientation applied (what an image viewer shows)."""
  from PIL import Image, ImageOps

  with Image.open(path) as image:
    return np.asarray(ImageOps.exif_transpose(image).convert('RGB'))


def prepare_image(image: np.ndarray, data_config) -> tuple[np.ndarray, float]:
  """One image as the eval pipeline feeds it: resized (TF bilinear) and zero-padded at the bottom/right.

  Args:
    image: uint8 [H, W, 3].
  Returns:
    (float32 [Hp, Wp, 3] on the 0..255 scale, scale = resized / original).
  """
  import tensorflow as tf

  from conret_jax.data import sizes

  h, w = image.shape[:2]
  shapes = sizes.padded_shapes(data_config)
  size = float(data_config.image_size)
  if data_config.resize == 'square':
    scale = np.float32(size) / np.float32(max(h, w))
    pad_hw = shapes['square']
  else:
    scale = min(np.float32(size) / np.float32(min(h, w)), np.float32(data_config.max_size) / np.float32(max(h, w)))
    pad_hw = shapes['landscape'] if w >= h else shapes['portrait']
  new_hw = np.maximum(np.round(np.array([h, w], np.float32) * scale).astype(np.int32), 1)
  resized = tf.image.resize(tf.constant(image), new_hw, method='bilinear').numpy()
  padded = np.zeros(tuple(pad_hw) + (3,), np.float32)
  padded[: new_hw[0], : new_hw[1]] = resized[: pad_hw[0], : pad_hw[1]]
  return padded, float(scale)


def class_metadata(config, workdir: str):
  """The model's classes (a data.info.ClassLayout): as the run recorded them at training time (W/run.json); without
  a record, the eval dataset's categories where reading them generates nothing; else class indices, with a warning."""
  from conret_jax import run_record
  from conret_jax.data import info as info_lib

  classes = (run_record.load_run(workdir) or {}).get('classes')
  if classes:
    return info_lib.ClassLayout(
      classes['layout'], int(classes['num_classes']), tuple(classes['category_ids']), tuple(classes['names'])
    )
  try:
    if config.data.eval.source == 'shapes':  # its fixed categories, without generating the dataset
      from conret_jax.data import shapes

      info = info_lib.DatasetInfo(list(shapes.CATEGORY_IDS), list(shapes.SHAPE_NAMES), 0)
    else:
      from conret_jax import data as data_lib

      info = data_lib.dataset_info(config.data.eval, config, train=True)  # the categories only
    return info_lib.ClassLayout.of(info, config)
  except (UserError, OSError, ImportError) as e:
    logging.warning('no class names (%s): %s has no run.json; labelling detections by class index', e, workdir)
    n = int(config.model.num_classes)
    return info_lib.ClassLayout('category_id', n, tuple(range(n)), tuple(str(i) for i in range(n)))


def _output_name(path: str, taken: set) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  name, k = stem, 1
  while name in taken:  # same file name in two input folders
    name, k = f'{stem}_{k}', k + 1
  taken.add(name)
  return name + '.png'


def run(
  config,
  workdir: str,
  image_paths: list[str],
  output: str,
  *,
  score_threshold: float = 0.3,
  step: int | None = None,
  class_layout=None,
) -> list[dict]:
  """Detects on each image, writes OUTPUT/<name>.png and OUTPUT/detections.json; returns the json's entries."""
  import jax

  import conret_jax
  from conret_jax import evaluation, visualize
  from conret_jax.train import restore as restore_lib

  if not image_paths:
    raise FileNotFoundError('no input images')
  config = config.copy_and_resolve_references()
  config.train.fsdp_axis_size = 1  # one device: nothing to shard
  model, variables, step, _ = restore_lib.restore_for_inference(config, workdir, step, devices=jax.local_devices()[:1])
  layout = class_layout or class_metadata(config, workdir)
  names = layout.class_names
  class_of = {int(c): k for k, c in enumerate(layout.category_of) if c >= 0}
  os.makedirs(output, exist_ok=True)
  entries, taken = [], set()
  for index, path in enumerate(image_paths):
    image = load_image(path)
    padded, scale = prepare_image(image, config.data)
    dets = jax.tree.map(np.asarray, conret_jax.detect(model, variables, padded[None], config))
    meta = {
      'image_id': np.array([index]),
      'scale': np.array([scale], np.float32),
      'orig_hw': np.array([image.shape[:2]]),
      'example_valid': np.array([True]),
    }
    results = [
      r for r in evaluation.detections_to_coco(dets, meta, layout.category_of) if r['score'] >= score_threshold
    ]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r['bbox'] for r in results)], np.float32)
    drawn = visualize.draw_detections(
      image,
      boxes,
      np.array([r['score'] for r in results]),
      np.array([class_of[r['category_id']] for r in results], int),
      names,
    )
    out_path = os.path.join(output, _output_name(path, taken))
    drawn.save(out_path, format='PNG')
    entries.append(
      {
        'image': path,
        'output': out_path,
        'height': int(image.shape[0]),
        'width': int(image.shape[1]),
        'detections': [
          {
            'bbox': r['bbox'],
            'score': r['score'],
            'category_id': r['category_id'],
            'class_name': names[class_of[r['category_id']]],
          }
          for r in results
        ],
      }
    )
    logging.info('%s: %d detections >= %.2f', path, len(results), score_threshold)
  with open(os.path.join(output, 'detections.json'), 'w') as f:
    json.dump(entries, f, indent=1)
  logging.info('wrote %d images and detections.json to %s (checkpoint step %d)', len(entries), output, step)
  return entries


def _main(argv):
  from conret_jax.train import restore as restore_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _IMAGES.value or not _OUTPUT.value:
    raise app.UsageError('--images and --output are required')
  restore_lib.check_weights_available(flags.FLAGS.config, flags.FLAGS.workdir or '', flags.FLAGS.step)
  config, workdir = startup.setup('predict', writes_workdir=False, distributed_init=False)
  startup.check_workdir(_OUTPUT.value, create=True, flag='output')
  paths = list_images(_IMAGES.value)
  if not paths:
    raise app.UsageError(f'--images={_IMAGES.value!r} matches no image files')
  entries = run(config, workdir, paths, _OUTPUT.value, score_threshold=_SCORE.value, step=flags.FLAGS.step)
  print(f'{sum(len(e["detections"]) for e in entries)} detections on {len(entries)} images -> {_OUTPUT.value}')


def main():
  tool.run(
    _main,
    tool='conret-predict',
    doc=__doc__,
    flag_names=tool_flags.COMMON_FLAGS + ('images', 'output', 'score_threshold', 'step'),
  )


if __name__ == '__main__':
  main()
