"""conret-predict and the shared restore: eval-identical preprocessing, boxes back in original pixels, outputs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import xla_env
from PIL import Image

for _module in (
  'conret_jax.detectors',
  'conret_jax.inference',
  'conret_jax.train.state',
  'conret_jax.mesh',
  'conret_jax.train.step',
  'conret_jax.data.preprocess',
):
  pytest.importorskip(_module)

from conret_jax.cli import predict  # noqa: E402 (after the importorskip above)
from conret_jax.data.info import ClassLayout  # noqa: E402 (after the importorskip above)
from conret_jax.data.sizes import pad_value_of  # noqa: E402 (after the importorskip above)
from conret_jax.predictor import Predictor, prepare_image  # noqa: E402 (after the importorskip above)
from conret_jax.train import restore  # noqa: E402 (after the importorskip above)


def test_restore_for_inference_on_one_device(trained_workdir, make_tiny_config):
  workdir, saved = trained_workdir
  model, variables, step, mesh = restore.restore_for_inference(make_tiny_config(), workdir, devices=jax.devices()[2:3])
  assert step == 7 and mesh.devices.size == 1
  leaves = jax.tree.leaves(variables)
  assert {d for x in leaves for d in x.sharding.device_set} == {jax.devices()[2]}
  for x, y in zip(leaves, jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(x), y)
  with pytest.raises(FileNotFoundError, match='init_from'):
    restore.restore_for_inference(make_tiny_config(), workdir + '_none')


def test_prepare_image_matches_eval_resize(make_tiny_config):
  config = make_tiny_config()
  rs = np.random.RandomState(0)
  mean = (123.5, 116.25, 103.75)
  small = rs.randint(0, 256, (64, 128, 3)).astype(np.uint8)  # long side already 128: scale 1, pad below
  padded, scale, hw = prepare_image(small, config.data, mean)
  assert scale.tolist() == [1.0, 1.0] and padded.shape == (128, 128, 3) and hw == (64, 128)
  np.testing.assert_allclose(padded[:64], small, atol=1e-4)
  assert np.all(padded[64:] == np.asarray(mean, np.float32))  # the padding takes the given value, exactly

  big = rs.randint(0, 256, (256, 128, 3)).astype(np.uint8)  # scale 0.5: bilinear = mean of 2x2 blocks
  padded, scale, hw = prepare_image(big, config.data)
  assert scale.tolist() == [0.5, 0.5] and hw == (128, 64)
  blocks = big.astype(np.float64).reshape(128, 2, 64, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(padded[:, :64], blocks, atol=1e-3)
  assert not padded[:, 64:].any()

  config.data.resize, config.data.image_size, config.data.max_size = 'short_side', 128, 256
  padded, scale, hw = prepare_image(rs.randint(0, 256, (100, 150, 3)).astype(np.uint8), config.data)
  assert scale == pytest.approx([1.28, 1.28]) and padded.shape == (128, 256, 3) and hw == (128, 192)
  assert padded[:, 192:].max() == 0 and padded[:, 191].max() > 0


def test_prepare_image_stretch_is_the_eval_pipeline_bit_for_bit(tmp_path):
  """resize='stretch': prepare_image gives the eval pipeline's pixels, (sy, sx) scale and input size exactly, for
  landscape, portrait, square and extreme aspects."""
  from conret_jax.data import pipeline
  from tests.data.conftest import small_config, write_rect_dataset

  annotation_file, image_dir, _ = write_rect_dataset(str(tmp_path), [(70, 130), (150, 80), (96, 96), (33, 200)])
  config = small_config(annotation_file, image_dir, image_size=96, eval_batch=4)
  config.data.resize = 'stretch'
  (batch,) = list(pipeline.host_batches(config, train=False))
  assert batch['example_valid'].all()
  for b, image_id in enumerate(batch['image_id']):
    image = np.asarray(Image.open(os.path.join(image_dir, f'im{image_id - 100:03d}.png')))
    prepared, scale, hw = prepare_image(image, config.data, pad_value_of(config.model))
    np.testing.assert_array_equal(prepared, batch['images'][b])
    assert scale.dtype == np.float32 and hw == (96, 96)
    np.testing.assert_array_equal(scale, batch['scale'][b])
    np.testing.assert_array_equal(hw, batch['input_hw'][b])


def test_in_image_divides_each_axis_by_its_scale(make_tiny_config):
  """Predictor._in_image maps a stretched image's detections back with x / sx and y / sy, clipped to the image."""
  layout = ClassLayout('contiguous', 2, (3, 5), ('a', 'b'))
  predictor = Predictor(make_tiny_config(), None, None, layout, 0)
  dets = {
    'boxes': np.array([[10, 20, 50, 90], [0, 0, 96, 96], [1, 1, 2, 2]], np.float32),
    'scores': np.array([0.9, 0.8, 0.1], np.float32),
    'classes': np.array([1, 0, 1], np.int32),
    'valid': np.array([True, True, False]),
  }
  scale = np.float32(96) / np.array([120, 300], np.float32)  # (sy, sx) of a 120 x 300 image
  got = predictor._in_image(dets, scale, (120, 300), min_score=0.0)
  want = np.clip(dets['boxes'][:2] / np.tile(scale[::-1], 2), 0, [300, 120, 300, 120])
  np.testing.assert_allclose(got['boxes'], want, rtol=1e-6)
  np.testing.assert_allclose(got['boxes'][1], [0, 0, 300, 120], rtol=1e-6)
  assert got['category_ids'].tolist() == [5, 3] and got['names'] == ['b', 'a']


def _write_images(folder):
  rs = np.random.RandomState(5)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name, hw in (('wide', (96, 128)), ('tall', (200, 150))):
    path = os.path.join(folder, f'{name}.png')
    Image.fromarray(rs.randint(0, 256, hw + (3,)).astype(np.uint8)).save(path)
    paths.append(path)
  return paths


def test_predict_run_maps_boxes_to_original_pixels(trained_workdir, tmp_path, make_tiny_config):
  import conret_jax

  workdir, saved = trained_workdir
  config = make_tiny_config()
  paths = _write_images(str(tmp_path / 'in'))
  out = str(tmp_path / 'out')
  layout = ClassLayout('contiguous', 5, (3, 5, 9, 12, 20), ('a', 'b', 'c', 'd', 'e'))
  predictor = conret_jax.load(workdir, config=config)
  predictor.classes = layout
  entries = predict.run(predictor, paths, out, score_threshold=0.0)
  assert json.load(open(os.path.join(out, 'detections.json'))) == json.loads(json.dumps(entries))

  model = conret_jax.build_model(config)
  for path, entry in zip(paths, entries):
    image = np.asarray(Image.open(path))
    h, w = image.shape[:2]
    assert (entry['height'], entry['width']) == (h, w)
    drawn = np.asarray(Image.open(entry['output']))
    assert drawn.shape == image.shape and (drawn != image).any()
    # Reference: detect on the padded input with the image's size, then divide by the scale and clip to the image.
    padded, scale, hw = prepare_image(image, config.data, pad_value_of(config.model))
    ref = jax.tree.map(np.asarray, conret_jax.detect(model, saved, padded[None], config, image_sizes=np.array([hw])))
    keep = ref['valid'][0]
    assert 1 <= len(entry['detections']) == keep.sum() <= 5
    ref_boxes = np.clip(ref['boxes'][0][keep] / np.tile(scale[::-1], 2), 0, [w, h, w, h])  # x / sx, y / sy
    got = np.array([d['bbox'] for d in entry['detections']])
    np.testing.assert_allclose(got[:, :2], ref_boxes[:, :2], atol=0.011)
    np.testing.assert_allclose(got[:, 2:], ref_boxes[:, 2:] - ref_boxes[:, :2], atol=0.021)
    np.testing.assert_allclose([d['score'] for d in entry['detections']], ref['scores'][0][keep], atol=1e-5)
    classes = ref['classes'][0][keep]
    assert [d['category_id'] for d in entry['detections']] == [layout.category_ids[c] for c in classes]
    assert [d['class_name'] for d in entry['detections']] == [layout.names[c] for c in classes]


def test_predict_command_line(trained_workdir, tmp_path, tiny_overrides):
  """The console script's flags: --config file with overrides, --images glob, --score-threshold alias."""
  workdir, _ = trained_workdir
  config_file = tmp_path / 'tiny.py'
  overrides = '\n'.join(f'  config.{k} = {v!r}' for k, v in tiny_overrides.items())
  config_file.write_text(
    f'from conret_jax import defaults\n\ndef get_config():\n'
    f'  config = defaults.base_config()\n{overrides}\n  return config\n'
  )
  _write_images(str(tmp_path / 'in'))
  out = tmp_path / 'out'
  env = xla_env.cpu_env(1)
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'conret_jax.cli.predict',
      f'--config={config_file}',
      f'--workdir={workdir}',
      f'--images={tmp_path / "in"}/*.png',
      f'--output={out}',
      '--score-threshold=0.0',
      '--config.eval.max_detections=3',
      '--config.data.eval.source=coco_json',
      '--config.data.eval.annotation_file=/nonexistent.json',
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '6 detections on 2 images' in proc.stdout
  entries = json.load(open(out / 'detections.json'))
  assert sorted(os.path.basename(e['output']) for e in entries) == ['tall.png', 'wide.png']
  assert all(d['class_name'] == str(d['category_id']) for e in entries for d in e['detections'])
