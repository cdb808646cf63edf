"""Small on-disk datasets made by the tests (no downloads)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conret_jax import defaults

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def write_rect_dataset(root, sizes, *, category_ids=(5, 9, 2), fmt='PNG', seed=0):
  """Images of filled rectangles of distinct colours on black; boxes are exactly the rectangles.

  sizes: [(height, width)] per image. Returns (annotation_file, image_dir, {image_id: [(x1, y1, x2, y2, colour)]})."""
  rng = np.random.RandomState(seed)
  image_dir = os.path.join(root, 'images')
  os.makedirs(image_dir, exist_ok=True)
  images, annotations, truth = [], [], {}
  for i, (h, w) in enumerate(sizes):
    image_id = 100 + i
    pixels = np.zeros((h, w, 3), np.uint8)
    truth[image_id] = []
    for k in range(rng.randint(1, 4)):
      bw, bh = rng.randint(w // 5, w // 3), rng.randint(h // 5, h // 3)
      x1, y1 = (k * w) // 3 + rng.randint(0, w // 3 - bw + 1), rng.randint(0, h - bh)
      colour = COLOURS[(i + k) % len(COLOURS)]
      pixels[y1 : y1 + bh, x1 : x1 + bw] = colour
      truth[image_id].append((x1, y1, x1 + bw, y1 + bh, colour))
      annotations.append(
        {
          'id': len(annotations) + 1,
          'image_id': image_id,
          'category_id': category_ids[(i + k) % len(category_ids)],
          'bbox': [x1, y1, bw, bh],
          'area': bw * bh,
          'iscrowd': 0,
        }
      )
    name = f'im{i:03d}.{"png" if fmt == "PNG" else "jpg"}'
    Image.fromarray(pixels).save(os.path.join(image_dir, name), fmt)
    images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
  categories = [{'id': c, 'name': f'cat{c}'} for c in category_ids]
  annotation_file = os.path.join(root, 'instances.json')
  with open(annotation_file, 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
  return annotation_file, image_dir, truth


def small_config(annotation_file, image_dir, *, image_size=128, batch=4, eval_batch=4):
  config = defaults.base_config()
  for section in (config.data.train, config.data.eval):
    section.source = 'coco_json'
    section.annotation_file = annotation_file
    section.image_dir = image_dir
  config.data.image_size = image_size
  config.data.max_boxes = 8
  config.train.global_batch_size = batch
  config.eval.global_batch_size = eval_batch
  config.data.num_parallel_calls = 2
  return config


@pytest.fixture(scope='session')
def rect_dataset(tmp_path_factory):
  """12 images, landscape and portrait, 1-3 rectangles each."""
  rng = np.random.RandomState(1)
  sizes = [
    (int(rng.randint(60, 100)), int(rng.randint(100, 160)))
    if i % 3
    else (int(rng.randint(100, 160)), int(rng.randint(60, 100)))
    for i in range(12)
  ]
  return write_rect_dataset(str(tmp_path_factory.mktemp('rects')), sizes)
