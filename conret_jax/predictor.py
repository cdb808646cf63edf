"""A trained detector ready to use on images: `conret_jax.load(workdir)`.

  predictor = conret_jax.load('runs/shapes_demo')              the newest checkpoint that restores (or step=N)
  results = predictor.predict([image1, image2])                uint8 [H, W, 3] RGB images of any sizes
  results[0] = {'boxes': [N, 4] float32 x1y1x2y2 in the image's own pixels, 'scores': [N] float32,
                'category_ids': [N] int64 (the dataset's ids, as in detections.json), 'names': [N] str}

Each image is prepared exactly as the eval pipeline prepares it (`prepare_image`: the same scale rule, TF's bilinear
resize, padding with config.model.pad_pixels' value; 'stretch': the pipeline's own S x S warp), run through
`conret_jax.detect` with its true size (so the padding holds no detection), and its boxes are mapped back to its own
pixels (`evaluation.to_image_coords`, x / sx and y / sy). Class ids and names are those the run was trained on
(run.json). conret-predict and conret-export are built on it.
"""

import dataclasses

import numpy as np

from conret_jax import evaluation
from conret_jax.data.info import ClassLayout


def prepare_image(image: np.ndarray, data_config, pad_value=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray, tuple]:
  """One image as the eval pipeline feeds it: data.preprocess.eval_resize (the pipeline's scale rule and TF bilinear
  resize), padded at the bottom/right ('stretch': warped to S x S, nothing padded). The exported SavedModel runs the
  same function in its graph.

  Args:
    image: uint8 [H, W, 3] RGB.
    pad_value: RGB (0..255) the padding takes (data.sizes.pad_value_of(config.model)).
  Returns:
    (float32 [Hp, Wp, 3] on the 0..255 scale, scale float32 [2] (sy, sx) = resized / original as in Batch.scale,
    (h, w) of the resized image in it).
  """
  import tensorflow as tf

  from conret_jax.data import preprocess

  padded, scale, hw = preprocess.eval_resize(tf.constant(image), data_config, pad_value)
  return padded.numpy(), scale.numpy(), tuple(int(v) for v in hw.numpy())


@dataclasses.dataclass
class Predictor:
  """A model, its variables and its classes, on one device. `predict` is the whole inference of a trained run."""

  config: object
  model: object
  variables: dict
  classes: ClassLayout
  step: int

  def predict(self, images, min_score: float = 0.0) -> list[dict]:
    """Detections of each image (the module docstring's dicts), in the order given.

    Args:
      images: uint8 [H, W, 3] RGB arrays of any sizes (a list, or one [B, H, W, 3] array).
      min_score: keep detections scoring at least this (on top of config.eval.score_threshold).
    """
    import jax

    from conret_jax import detect
    from conret_jax.data.sizes import pad_value_of

    images = [np.asarray(im) for im in images]
    for i, im in enumerate(images):
      if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
        raise ValueError(f'image {i}: expected uint8 [H, W, 3] RGB, got {im.dtype} {im.shape}')
    prepared = [prepare_image(im, self.config.data, pad_value_of(self.config.model)) for im in images]
    results = [None] * len(images)
    for shape in sorted({p[0].shape for p in prepared}):  # one batch per padded shape (short_side has two)
      members = [i for i, p in enumerate(prepared) if p[0].shape == shape]
      batch = np.stack([prepared[i][0] for i in members])
      sizes = np.array([prepared[i][2] for i in members], np.int32)
      dets = jax.tree.map(np.asarray, detect(self.model, self.variables, batch, self.config, image_sizes=sizes))
      for row, i in enumerate(members):
        one = {k: v[row] for k, v in dets.items()}
        results[i] = self._in_image(one, prepared[i][1], images[i].shape[:2], min_score)
    return results

  def _in_image(self, dets: dict, scale: np.ndarray, image_hw, min_score: float) -> dict:
    """One image's detections in its own pixels; scale [2] (sy, sx) from prepare_image."""
    keep = dets['valid'] & (dets['scores'] >= min_score)
    category_of = self.classes.category_of
    keep &= category_of[dets['classes']] >= 0  # classes that are no category (torchvision's background)
    boxes = evaluation.to_image_coords(dets['boxes'][keep], scale, image_hw)
    classes = dets['classes'][keep]
    names = self.classes.class_names
    return {
      'boxes': boxes.astype(np.float32),
      'scores': dets['scores'][keep].astype(np.float32),
      'category_ids': category_of[classes],
      'names': [names[int(c)] for c in classes],
    }


def load(workdir: str, step: int | None = None, config=None) -> Predictor:
  """The run in `workdir` ready to predict, on this process's first device.

  Args:
    step: a checkpoint step (default: the newest that restores; without a checkpoint, config.init_from's weights).
    config: default: the config the run saved (W/config.json).
  """
  import jax

  from conret_jax import run_record
  from conret_jax.train import restore

  config = (config or run_record.load_config(workdir)).copy_and_resolve_references()
  config.train.fsdp_axis_size = 1  # one device: nothing to shard
  model, variables, step, _ = restore.restore_for_inference(config, workdir, step, devices=jax.local_devices()[:1])
  return Predictor(config, model, variables, classes_of(workdir, config), step)


def classes_of(workdir: str, config) -> ClassLayout:
  """The model's classes: as the run recorded them at training time (W/run.json); without a record, the eval
  dataset's categories where reading them generates nothing; else class indices, with a warning."""
  from absl import logging

  from conret_jax.errors import UserError

  recorded = evaluation.run_classes(workdir)
  if recorded is not None:
    return recorded
  try:
    if config.data.eval.source == 'shapes':  # its fixed categories, without generating the dataset
      from conret_jax.data import shapes
      from conret_jax.data.info import DatasetInfo

      return ClassLayout.of(DatasetInfo(list(shapes.CATEGORY_IDS), list(shapes.SHAPE_NAMES), 0), config)
    from conret_jax import data as data_lib

    return ClassLayout.of(data_lib.dataset_info(config.data.eval, config, train=True), config)  # the categories
  except (UserError, OSError, ImportError) as e:
    logging.warning('no class names (%s): %s has no run.json; labelling detections by class index', e, workdir)
    n = int(config.model.num_classes)
    return ClassLayout('category_id', n, tuple(range(n)), tuple(str(i) for i in range(n)))
