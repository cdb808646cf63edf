"""conret-export end to end: train the tiny shapes config, export it with an eval setting changed, load the SavedModel
in a fresh process that imports neither conret_jax nor jax, and compare both signatures with `predictor.predict` on
the same images (same classes, box IoU >= 0.999, scores within 1e-4), including images of several sizes in one call
and a batch of 3."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import xla_env

from conret_jax.data import decode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ('--config.eval.max_detections=7', '--config.consistent.inference_reg_steps=1')

# Runs in its own process: TensorFlow alone (tensorflow imports jax where it is installed: blocked here, so the model
# is seen to need none of it). Calls each (signature, inputs) of calls.json and saves every output.
LOADER = """
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('conret_jax', 'jax', 'jaxlib', 'flax'):
      raise ImportError(f'{name} is blocked: the SavedModel must run without it')

sys.meta_path.insert(0, Blocked())
import numpy as np
import tensorflow as tf

model_dir, calls_file, arrays_file, out_file = sys.argv[1:]
loaded = tf.saved_model.load(model_dir)
arrays = np.load(arrays_file)
outputs = {}
for i, call in enumerate(json.load(open(calls_file))):
  if call['signature'] == 'serving_bytes':
    inputs = {'image_bytes': tf.constant([open(p, 'rb').read() for p in call['files']])}
  else:
    inputs = {'images': tf.constant(arrays[call['array']])}
  for name, value in loaded.signatures[call['signature']](**inputs).items():
    outputs[f'{i}/{name}'] = value.numpy()
labels = loaded.labels()
outputs['labels/category_ids'] = labels['category_ids'].numpy()
outputs['labels/names'] = labels['names'].numpy().astype(str)
np.savez(out_file, **outputs)
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'conret_jax', 'jax', 'jaxlib', 'flax'})))
"""


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir of the tiny shapes config trained 6 steps by conret-train, and its training images."""
  root = tmp_path_factory.mktemp('export_e2e')
  workdir = str(root / 'run')
  config = os.path.join(REPO, 'tests', 'configs', f'tiny_shapes.py:steps=6,batch=4,cache={root / "shapes"}')
  # The test-wide compilation cache (tests/conftest.py): tests/cli/test_train.py compiles the same train step.
  cache = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  env = xla_env.cpu_env(1, **cache)
  cmd = [sys.executable, '-m', 'conret_jax.cli.train', f'--config={config}', f'--workdir={workdir}']
  proc = subprocess.run([*cmd, '--config.eval.at_end=false'], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root, workdir, sorted(glob.glob(str(root / 'shapes' / '*' / 'train' / '*.jpg')))


@pytest.fixture(scope='module')
def exported(run):
  root, workdir, _ = run
  output = str(root / 'saved_model')
  cmd = [sys.executable, '-m', 'conret_jax.cli.export', f'--workdir={workdir}', f'--output={output}', *OVERRIDES]
  proc = subprocess.run(cmd, env=xla_env.cpu_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'exported step 6 of {workdir} -> {output}' in proc.stdout
  assert not [p for p in os.listdir(root) if '.export-' in p]  # the staging folder was moved into place
  return output


def _images(files, folder) -> dict:
  """Three training JPEGs of different sizes, one re-encoded as PNG, and three same-size crops (a batch of 3)."""
  sizes = {}
  for path in files:  # the first three sizes found
    image = decode.decode_image(tf.constant(open(path, 'rb').read())).numpy()
    sizes.setdefault(image.shape, (path, image))
  (jpegs, images) = zip(*list(sizes.values())[:3])
  png = os.path.join(folder, 'again.png')
  with open(png, 'wb') as f:
    f.write(tf.io.encode_png(images[0]).numpy())
  h, w = min(i.shape[0] for i in images), min(i.shape[1] for i in images)
  crops = np.stack([image[:h, :w] for image in images])
  return {'files': [*jpegs, png], 'decoded': [*images, images[0]], 'crops': crops}


@pytest.fixture(scope='module')
def served(run, exported):
  """The SavedModel's outputs in a fresh TensorFlow-only process: serving_bytes on four images of three sizes,
  serving_default on each image alone and on a batch of three crops."""
  root, _, files = run
  images = _images(files, str(root))
  calls = [{'signature': 'serving_bytes', 'files': images['files']}]
  calls += [{'signature': 'serving_default', 'array': f'image{i}'} for i in range(len(images['decoded']))]
  calls += [{'signature': 'serving_default', 'array': 'crops'}]
  arrays = {f'image{i}': image[None] for i, image in enumerate(images['decoded'])}
  np.savez(root / 'arrays.npz', crops=images['crops'], **arrays)
  (root / 'calls.json').write_text(json.dumps(calls))
  (root / 'loader.py').write_text(LOADER)
  args = [str(p) for p in (root / 'loader.py', exported, root / 'calls.json', root / 'arrays.npz', root / 'out.npz')]
  proc = subprocess.run([sys.executable, *args], env=xla_env.cpu_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # no conret_jax, jax or flax in that process
  out = dict(np.load(root / 'out.npz'))
  return images, {k: {n: out[f'{k}/{n}'] for n in ('boxes', 'scores', 'classes', 'num_detections')} for k in range(6)}


@pytest.fixture(scope='module')
def predictor(run):
  """conret_jax.load of the run with the overrides conret-export was given."""
  import conret_jax
  from conret_jax import run_record

  config = run_record.load_config(run[1])
  config.eval.max_detections, config.consistent.inference_reg_steps = 7, 1
  return conret_jax.load(run[1], config=config)


def _iou(a, b):
  """Row-wise IoU of boxes [N, 4] x1y1x2y2."""
  lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)
  return inter / (area(a) + area(b) - inter)


def assert_same(out: dict, row: int, want: dict) -> None:
  """Row `row` of a signature's outputs against one `Predictor.predict` result."""
  n = int(out['num_detections'][row])
  assert n == len(want['scores']) >= 1
  assert out['boxes'].shape[1] == 7  # the --config.eval.max_detections override
  np.testing.assert_array_equal(out['classes'][row, :n], want['category_ids'])
  assert _iou(out['boxes'][row, :n], want['boxes']).min() >= 0.999
  np.testing.assert_allclose(out['scores'][row, :n], want['scores'], atol=1e-4, rtol=0)
  assert not out['scores'][row, n:].any() and (out['classes'][row, n:] == -1).all()


def test_both_signatures_match_predict_in_a_process_without_conret_jax(served, predictor):
  images, outputs = served
  want = predictor.predict(images['decoded'])  # four images of three sizes in one call
  for i, result in enumerate(want):
    assert_same(outputs[1 + i], 0, result)  # serving_default, one image per call
    assert_same(outputs[0], i, result)  # serving_bytes, all four in one call (JPEG and PNG)
  assert len({im.shape for im in images['decoded']}) == 3
  # The boxes are in each image's own pixels.
  for image, result in zip(images['decoded'], want):
    h, w = image.shape[:2]
    assert (result['boxes'] >= 0).all() and (result['boxes'][:, [0, 2]] <= w).all()
    assert (result['boxes'][:, [1, 3]] <= h).all()


def test_a_batch_of_three_and_sizes_mixed_in_one_predict_call(served, predictor):
  images, outputs = served
  mixed = predictor.predict([images['crops'][0], images['decoded'][1], images['crops'][2]])
  alone = [predictor.predict([image])[0] for image in (images['crops'][0], images['decoded'][1], images['crops'][2])]
  for got, want in zip(mixed, alone):  # a mixed call gives each image what it gets alone
    np.testing.assert_array_equal(got['category_ids'], want['category_ids'])
    np.testing.assert_allclose(got['boxes'], want['boxes'], atol=1e-4)
  for row, result in enumerate(predictor.predict(images['crops'])):  # serving_default's batch of 3
    assert_same(outputs[5], row, result)


def test_the_override_reached_the_model_and_names_are_inside(served, run, predictor):
  """The exported model matches a predictor with inference_reg_steps=1, which the run's own settings do not."""
  import conret_jax

  images, outputs = served
  default = conret_jax.load(run[1]).predict(images['decoded'][:1])[0]  # 10 detections: their first 7 differ
  assert not np.allclose(default['boxes'][:7], outputs[1]['boxes'][0])
  recorded = json.load(open(os.path.join(run[1], 'run.json')))['classes']
  root = run[0]
  labels = np.load(root / 'out.npz')
  assert labels['labels/category_ids'].tolist() == recorded['category_ids'] == [3, 7, 11, 15, 19]
  assert labels['labels/names'].tolist() == recorded['names']
  assert set(np.concatenate([o['classes'].ravel() for o in outputs.values()])) <= {-1, 3, 7, 11, 15, 19}
  metadata = json.load(open(os.path.join(root, 'saved_model', 'assets.extra', 'conret_jax.json')))
  assert metadata['step'] == 6 and metadata['inference_reg_steps'] == 1 and metadata['eval']['max_detections'] == 7
