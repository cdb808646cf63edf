"""Input pipeline benchmark (`conret-bench input`): host-side batches only, no device.

Writes 200 COCO-like JPEGs (640x480, blocks of colour plus sensor-like noise, ~100-150 KB each, 1-8 boxes) as a
coco_json dataset in a temp dir, then times the training pipeline (square resize to config.data.image_size, flips
on) after a warm-up. To show where time goes it also times the same files through decode only and decode + resize.
CPU time per image (time.process_time over all threads) is reported next to wall-clock rates: on a shared machine
it is the number that says what one core can do (images_per_cpu_second ~ images/s per fully used core).
"""

import copy
import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from conret_jax.data import decode, pipeline


def write_coco_like(root: str, num_images: int = 200, height: int = 480, width: int = 640, seed: int = 0):
  """Returns (annotation_file, image_dir)."""
  rng = np.random.RandomState(seed)
  image_dir = os.path.join(root, 'images')
  os.makedirs(image_dir, exist_ok=True)
  images, annotations = [], []
  for i in range(num_images):
    small = rng.randint(0, 256, (height // 32, width // 32, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), np.float32)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    name = f'{i:06d}.jpg'
    Image.fromarray(pixels).save(os.path.join(image_dir, name), quality=90)
    images.append({'id': i + 1, 'file_name': name, 'height': height, 'width': width})
    for _ in range(rng.randint(1, 9)):
      w, h = rng.uniform(20, 300, 2)
      x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
      annotations.append(
        {
          'id': len(annotations) + 1,
          'image_id': i + 1,
          'category_id': int(rng.randint(1, 4)),
          'bbox': [x, y, w, h],
          'area': w * h,
          'iscrowd': 0,
        }
      )
  annotation_file = os.path.join(root, 'instances.json')
  with open(annotation_file, 'w') as f:
    json.dump(
      {'images': images, 'annotations': annotations, 'categories': [{'id': c, 'name': f'c{c}'} for c in (1, 2, 3)]}, f
    )
  return annotation_file, image_dir


def _rate(ds, num_images: int) -> tuple:
  """(images per wall second, CPU ms per image) of a dataset of single images, after one warm-up element."""
  it = iter(ds.repeat())
  next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_images):
    next(it)
  return num_images / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / num_images


def run_input_bench(config, num_batches: int, *, num_images: int = 200, image_hw=(480, 640)) -> dict:
  """Times config's training pipeline on generated COCO-like JPEGs; returns rates in images/s and cpu_cores."""
  config = copy.deepcopy(config)
  with tempfile.TemporaryDirectory() as root:
    annotation_file, image_dir = write_coco_like(root, num_images, *image_hw)
    for section in (config.data.train, config.data.eval):
      section.source, section.annotation_file, section.image_dir = 'coco_json', annotation_file, image_dir
    config.model.num_classes = 3
    batch = int(config.train.global_batch_size)
    it = pipeline.host_batches(config, 0, 1, train=True)
    for _ in range(2):  # warm-up: tracing, thread pools, page cache
      next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      next(it)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    images_per_s = num_batches * batch / seconds

    files = tf.data.Dataset.list_files(os.path.join(image_dir, '*.jpg'), shuffle=False)
    size = int(config.data.image_size)
    calls = tf.data.AUTOTUNE
    decoded = files.map(lambda p: decode.decode_image(tf.io.read_file(p)), num_parallel_calls=calls)
    resize_hw = [size * image_hw[0] // max(image_hw), size * image_hw[1] // max(image_hw)]
    resized = decoded.map(lambda im: tf.image.resize(im, resize_hw), num_parallel_calls=calls)
    n = min(400, num_batches * batch)
    (decode_rate, decode_ms), (resize_rate, resize_ms) = _rate(decoded.prefetch(8), n), _rate(resized.prefetch(8), n)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return {
    'images_per_s': images_per_s,
    'cpu_cores': cores,
    'images_per_s_per_core': images_per_s / cores,
    # CPU time (all threads of this process) per image: independent of other load on a shared machine.
    'cpu_ms_per_image': 1e3 * cpu_seconds / (num_batches * batch),
    'images_per_cpu_second': num_batches * batch / cpu_seconds,
    'decode_cpu_ms_per_image': decode_ms,
    'decode_resize_cpu_ms_per_image': resize_ms,
    'decode_only_images_per_s': decode_rate,
    'decode_resize_images_per_s': resize_rate,
    'batch_size': batch,
    'image_size': size,
    'num_batches': num_batches,
    'source_image_hw': list(image_hw),
    'seconds': seconds,
  }


def main():
  from conret_jax import defaults

  config = defaults.base_config()
  config.data.image_size = 640
  config.data.resize = 'square'
  config.data.random_flip = True
  print(json.dumps(run_input_bench(config, num_batches=int(os.environ.get('BENCH_BATCHES', '20'))), indent=1))


if __name__ == '__main__':
  main()
