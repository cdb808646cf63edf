"""Writing a SavedModel whole or not at all: `export(predictor, output)`.

The model is saved into a staging folder beside `output` (.<name>.export-XXXX, the same file system, so the final
move is a rename), loaded back with tf.saved_model.load and called once through each signature (every padded shape
included), and only then moved to `output`. Any failure removes the staging folder (and a parent folder this export
created); an existing `output` is replaced only with overwrite=True, and only once the new model is ready.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from conret_jax.errors import ExportError, OutputExistsError

METADATA = os.path.join('assets.extra', 'conret_jax.json')  # beside the SavedModel's files; TF ignores it


def check_output(output: str, overwrite: bool) -> str:
  """The absolute --output path; OutputExistsError if it holds files (unless overwrite), ExportError if it is a
  file or a remote path. Called before anything heavy."""
  if not output:
    raise ExportError('--output is required: the folder to write the SavedModel to')
  if '://' in output:
    raise ExportError(f'--output={output}: write the SavedModel to a local folder, then copy it (gsutil cp -r)')
  path = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ExportError(f'--output={output} is a file, not a folder')
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise OutputExistsError(f'--output={output} exists and is not empty; pass --overwrite to replace it')
  return path


def _test_inputs(data_config) -> list[tuple[str, dict]]:
  """One call per signature that, together, run every padded shape's function: serving_bytes with an image of
  each padded shape (landscape and portrait), serving_default with one image."""
  import tensorflow as tf

  from conret_jax.data import sizes

  images = [np.full((h, w, 3), 127, np.uint8) for h, w in sizes.padded_shapes(data_config).values()]
  encoded = tf.stack([tf.io.encode_png(image) for image in images])
  return [('serving_bytes', {'image_bytes': encoded}), ('serving_default', {'images': tf.constant(images[0][None])})]


def verify(path: str, data_config) -> None:
  """Loads the SavedModel at `path` and calls each signature; ExportError naming the first failure."""
  import tensorflow as tf

  from conret_jax.export.module import OUTPUTS

  loaded = tf.saved_model.load(path)
  for name, inputs in _test_inputs(data_config):
    try:
      outputs = loaded.signatures[name](**inputs)
    except Exception as e:  # TensorFlow raises a dozen kinds here
      first = next((line.strip() for line in str(e).splitlines() if 'error' in line.lower()), str(e).strip())
      raise ExportError(f'the exported model does not run ({name}): {type(e).__name__}: {first[:400]}') from e
    if sorted(outputs) != sorted(OUTPUTS):
      raise ExportError(f'the exported model returns {sorted(outputs)}, not {sorted(OUTPUTS)}')


def _metadata(predictor, platforms) -> dict:
  import jax
  import tensorflow as tf

  from conret_jax.data import sizes
  from conret_jax.export import stablehlo

  config = predictor.config
  return {
    'step': int(predictor.step),
    'padded_shapes': {k: list(v) for k, v in sizes.padded_shapes(config.data).items()},
    'eval': config.eval.to_dict(),
    'inference_reg_steps': config.consistent.inference_reg_steps,
    'category_ids': [int(c) for c in predictor.classes.category_of if c >= 0],
    'names': [n for n, c in zip(predictor.classes.class_names, predictor.classes.category_of) if c >= 0],
    'platforms': list(platforms or [jax.default_backend()]),
    'versions': {'jax': jax.__version__, 'tensorflow': tf.__version__, 'stablehlo': stablehlo.target_version()},
  }


def _new_parents(path: str) -> str | None:
  """The topmost missing folder above `path` (created by the export; removed again if it fails), or None."""
  top, parent = None, os.path.dirname(path)
  while parent and not os.path.exists(parent):
    top, parent = parent, os.path.dirname(parent)
  return top


def _replace(staging: str, path: str) -> None:
  """Moves the finished `staging` folder to `path`, replacing what is there (already allowed by check_output)."""
  if not os.path.exists(path):
    os.rename(staging, path)
    return
  old = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.old-', dir=os.path.dirname(path))
  os.rename(path, os.path.join(old, 'model'))
  os.rename(staging, path)
  shutil.rmtree(old, ignore_errors=True)


def _write(predictor, staging: str, platforms) -> None:
  """The SavedModel and its metadata, into the (empty) folder `staging`."""
  import tensorflow as tf

  from conret_jax.export import module as module_lib
  from conret_jax.export import stablehlo

  with stablehlo.portable_serialization():
    module = module_lib.build(predictor, platforms)
    tf.saved_model.save(module, staging, signatures=module_lib.signatures(module))
  os.makedirs(os.path.join(staging, 'assets.extra'), exist_ok=True)
  with open(os.path.join(staging, METADATA), 'w', encoding='utf-8') as f:
    json.dump(_metadata(predictor, platforms), f, indent=1)


def export(predictor, output: str, *, overwrite: bool = False, platforms=None) -> str:
  """Writes `predictor` (conret_jax.load) as a SavedModel to `output` (conret_jax/export/module.py for its
  signatures); returns the absolute path. platforms: jax2tf's serialization platforms, e.g. ('cpu', 'cuda');
  they must include this process's backend, on which the model is verified."""
  import jax

  path = check_output(output, overwrite)
  if platforms and jax.default_backend() not in platforms:
    raise ExportError(f'platforms {tuple(platforms)} must include {jax.default_backend()!r}, to verify the model here')
  created = _new_parents(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.export-', dir=os.path.dirname(path))
  try:
    _write(predictor, staging, platforms)
    verify(staging, predictor.config.data)
    _replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created:
      shutil.rmtree(created, ignore_errors=True)
    raise
  return path
