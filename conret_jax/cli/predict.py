"""`conret-predict`: detections on image files, drawn on the original images and written as json.

  conret-predict --workdir=DIR --images='photos/*.jpg' --output=OUT [--score_threshold=0.3] [--step=N]

Built on `conret_jax.load(DIR).predict` (conret_jax/predictor.py): each image is resized and padded exactly as the
eval pipeline does, run through `conret_jax.detect` on one device with its true size, and its boxes are mapped back
to the original pixels. Class names are those the run recorded at training time (DIR/run.json); without --config the
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


def _output_name(path: str, taken: set) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  name, k = stem, 1
  while name in taken:  # same file name in two input folders
    name, k = f'{stem}_{k}', k + 1
  taken.add(name)
  return name + '.png'


def run(predictor, image_paths: list[str], output: str, *, score_threshold: float = 0.3) -> list[dict]:
  """Detects on each image with a `conret_jax.load` predictor, writes OUTPUT/<name>.png and
  OUTPUT/detections.json; returns the json's entries."""
  from conret_jax import visualize

  if not image_paths:
    raise FileNotFoundError('no input images')
  os.makedirs(output, exist_ok=True)
  entries, taken = [], set()
  class_of = {int(c): k for k, c in enumerate(predictor.classes.category_of) if c >= 0}
  for path in image_paths:
    image = load_image(path)
    found = predictor.predict([image], min_score=score_threshold)[0]
    out_path = os.path.join(output, _output_name(path, taken))
    classes = np.array([class_of[int(c)] for c in found['category_ids']], int)
    visualize.draw_detections(image, found['boxes'], found['scores'], classes, predictor.classes.class_names).save(
      out_path, format='PNG'
    )
    entries.append(_entry(path, out_path, image, found))
    logging.info('%s: %d detections >= %.2f', path, len(found['scores']), score_threshold)
  with open(os.path.join(output, 'detections.json'), 'w') as f:
    json.dump(entries, f, indent=1)
  logging.info('wrote %d images and detections.json to %s (checkpoint step %d)', len(entries), output, predictor.step)
  return entries


def _entry(path: str, out_path: str, image: np.ndarray, found: dict) -> dict:
  """One image's record in detections.json: boxes as COCO's [x, y, w, h] to 0.01 px, scores to 1e-5."""
  detections = []
  for (x1, y1, x2, y2), score, category, name in zip(
    found['boxes'], found['scores'], found['category_ids'], found['names']
  ):
    bbox = [round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)]
    detections.append({'bbox': bbox, 'score': round(float(score), 5), 'category_id': int(category), 'class_name': name})
  h, w = image.shape[:2]
  return {'image': path, 'output': out_path, 'height': int(h), 'width': int(w), 'detections': detections}


def _main(argv):
  from conret_jax import config_checks
  from conret_jax.train import restore as restore_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _IMAGES.value or not _OUTPUT.value:
    raise app.UsageError('--images and --output are required')
  if flags.FLAGS.config is not None:  # in seconds, before the checkpoint is looked for
    config_checks.validate(flags.FLAGS.config)
  restore_lib.check_weights_available(flags.FLAGS.config, flags.FLAGS.workdir or '', flags.FLAGS.step)
  config, workdir = startup.setup('predict', writes_workdir=False, distributed_init=False)
  startup.check_workdir(_OUTPUT.value, create=True, flag='output')
  paths = list_images(_IMAGES.value)
  if not paths:
    raise app.UsageError(f'--images={_IMAGES.value!r} matches no image files')
  import conret_jax

  predictor = conret_jax.load(workdir, flags.FLAGS.step, config=config)
  entries = run(predictor, paths, _OUTPUT.value, score_threshold=_SCORE.value)
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
