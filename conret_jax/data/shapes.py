"""The synthetic 'shapes' detection dataset: forms of random colour on a plain background, in COCO format.

Classes differ by FORM only (circle, square, triangle, cross, ring; colours are random, so colour is no cue) and
objects of different classes overlap (the paper's Figure 2 case). Category ids are deliberately non-contiguous
(3, 7, 11, 15, 19) so the id <-> class mapping is exercised. Images are JPEGs with sides 160-320 px, objects
24-120 px, 1-6 per image: learnable by a tiny model in minutes at image_size 256. Deterministic by seed.
`ensure_shapes_split` generates a split on first use into a cache folder, atomically (temp dir + rename).
"""

import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ('circle', 'square', 'triangle', 'cross', 'ring')
CATEGORY_IDS = (3, 7, 11, 15, 19)
DEFAULT_NUM_EXAMPLES = {'train': 2000, 'val': 200}
FORMAT_VERSION = 2  # bump when the drawing changes, so old caches are not reused


def _draw_shape(draw, kind, cx, cy, size, colour):
  """Draws one shape of side/diameter `size` centred at (cx, cy); returns (x1, y1, x2, y2, area)."""
  r = size / 2
  box = (cx - r, cy - r, cx + r, cy + r)
  if kind == 'circle':
    draw.ellipse(box, fill=colour)
    return box + (math.pi * r * r,)
  if kind == 'square':
    draw.rectangle(box, fill=colour)
    return box + (size * size,)
  if kind == 'triangle':
    pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    draw.polygon(pts, fill=colour)
    return box + (size * size / 2,)
  if kind == 'cross':
    t = size / 3
    draw.rectangle((cx - r, cy - t / 2, cx + r, cy + t / 2), fill=colour)
    draw.rectangle((cx - t / 2, cy - r, cx + t / 2, cy + r), fill=colour)
    return box + (2 * size * t - t * t,)
  if kind == 'ring':
    inner = r * 0.55
    draw.ellipse(box, outline=colour, width=max(1, round(r - inner)))  # outline only: objects below show through
    return box + (math.pi * (r * r - inner * inner),)
  raise ValueError(kind)


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _covered(a, b):
  """Fraction of box a's area inside box b."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]))


def _random_colour(rng, bg):
  while True:
    c = tuple(int(v) for v in rng.randint(0, 256, 3))
    if np.abs(np.subtract(c, bg)).sum() > 150:
      return c


def make_image(rng: np.random.RandomState):
  """One image: returns (PIL RGB image, [(x1, y1, x2, y2, area, shape_index)])."""
  width, height = (int(v) for v in rng.randint(160, 321, 2))
  bg = tuple(int(v) for v in rng.randint(60, 200, 3))
  image = Image.new('RGB', (width, height), bg)
  draw = ImageDraw.Draw(image)
  objects = []
  for _ in range(rng.randint(1, 7)):
    for _attempt in range(20):
      size = float(rng.uniform(24, min(120, 0.8 * min(width, height))))
      if objects and rng.rand() < 0.5:  # occlude a previous object, half on top of it
        ox1, oy1, ox2, oy2 = objects[rng.randint(len(objects))][:4]
        cx = float(rng.uniform(ox1, ox2)) + rng.choice([-1, 1]) * size * 0.45
        cy = float(rng.uniform(oy1, oy2)) + rng.choice([-1, 1]) * size * 0.45
      else:
        cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
      r = size / 2
      cx, cy = min(max(cx, r), width - r), min(max(cy, r), height - r)
      box = (cx - r, cy - r, cx + r, cy + r)
      # Overlap, but keep every earlier object mostly visible: a later shape may cover at most 30% of an earlier
      # one's box (a detector cannot find what is hidden, and the label would be noise).
      if all(_iou(box, o) < 0.4 and _covered(o, box) < 0.3 for o in objects):
        break
    else:
      continue
    kind = int(rng.randint(len(SHAPE_NAMES)))
    x1, y1, x2, y2, area = _draw_shape(draw, SHAPE_NAMES[kind], cx, cy, size, _random_colour(rng, bg))
    objects.append((x1, y1, x2, y2, area, kind))
  noise = rng.normal(0, 4, (height, width, 3))  # low noise: no flat-colour shortcut, still an easy background
  pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
  return Image.fromarray(pixels), objects


def write_split(output_dir: str, split: str, num_images: int, seed: int) -> str:
  """Writes output_dir/<split>/*.jpg and output_dir/annotations/instances_<split>.json; returns the json path."""
  rng = np.random.RandomState([seed, sum(map(ord, split))])
  image_dir = os.path.join(output_dir, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(output_dir, 'annotations'), exist_ok=True)
  images, annotations = [], []
  for i in range(num_images):
    image, objects = make_image(rng)
    file_name = f'{i:07d}.jpg'
    image.save(os.path.join(image_dir, file_name), quality=92)
    images.append({'id': i + 1, 'file_name': file_name, 'height': image.height, 'width': image.width})
    for x1, y1, x2, y2, area, kind in objects:
      annotations.append(
        {
          'id': len(annotations) + 1,
          'image_id': i + 1,
          'category_id': CATEGORY_IDS[kind],
          'bbox': [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
          'area': round(area, 2),
          'iscrowd': 0,
        }
      )
  categories = [{'id': c, 'name': n, 'supercategory': 'shape'} for c, n in zip(CATEGORY_IDS, SHAPE_NAMES)]
  path = os.path.join(output_dir, 'annotations', f'instances_{split}.json')
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
  return path


def generate(output_dir: str, num_train: int, num_val: int, seed: int = 0) -> dict:
  """Writes both splits; returns {split: annotation json path}."""
  return {split: write_split(output_dir, split, n, seed) for split, n in (('train', num_train), ('val', num_val))}


def ensure_shapes_split(source_config, seed: int = 0):
  """Generates the split on first use; returns (annotation_file, image_dir).

  Folder: <cache_dir or ~/.cache/conret_jax/shapes>/v<version>_<split>_n<N>_seed<seed>. Concurrent processes each
  write a private temp folder and rename it into place; the loser of the race deletes its copy.
  """
  split = source_config.split
  if split not in DEFAULT_NUM_EXAMPLES:
    raise ValueError(f"shapes split must be 'train' or 'val', got {split!r}")
  n = int(source_config.num_examples) or DEFAULT_NUM_EXAMPLES[split]
  root = os.path.expanduser(source_config.cache_dir or '~/.cache/conret_jax/shapes')
  final = os.path.join(root, f'v{FORMAT_VERSION}_{split}_n{n}_seed{seed}')
  annotation_file = os.path.join(final, 'annotations', f'instances_{split}.json')
  if not os.path.isfile(annotation_file):
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp_', dir=root)
    try:
      write_split(tmp, split, n, seed)
      os.rename(tmp, final)
    except OSError:
      if not os.path.isfile(annotation_file):  # not the benign "another process finished first"
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return annotation_file, os.path.join(final, split)
