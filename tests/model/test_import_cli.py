"""conret-import: state-dict file -> orbax checkpoint of the imported variables."""

import errno
import os
import pickle

import jax
import model_reference as ref
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conret_jax import detectors, weights
from conret_jax.cli import import_weights
from conret_jax.train import checkpoint

TINY_CONFIG = """
from conret_jax.defaults import base_config

def get_config(arg=None):
  c = base_config()
  c.model.num_classes = 3
  c.model.backbone.depth = int(arg or 18)
  c.model.backbone.width = 8
  c.model.fpn.channels = c.model.head.channels = 16
  c.model.head.num_convs = 2
  c.model.fpn.p6_from = 'p5'
  c.consistent.enabled = False
  return c
"""


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
  """The user errors here end in exit status 2; CONRET_DEBUG in the caller's environment would re-raise them."""
  monkeypatch.delenv('CONRET_DEBUG', raising=False)


@pytest.fixture()
def config_file(tmp_path):
  path = tmp_path / 'tiny.py'
  path.write_text(TINY_CONFIG)
  return str(path)


@pytest.fixture()
def detectron_config_file(tmp_path):
  """The tiny config as Detectron's layout needs it (stride on the first 1x1); pixel means left at ImageNet's."""
  path = tmp_path / 'tiny_detectron.py'
  path.write_text(TINY_CONFIG.replace('  return c', '  c.model.backbone.stride_in_1x1 = True\n  return c'))
  return str(path)


def test_retinanet_checkpoint_round_trip(tmp_path, config_file):
  sd = ref.retinanet_state_dict(np.random.default_rng(0), ref.tiny_config())
  np.savez(tmp_path / 'tv.npz', **sd)
  out = tmp_path / 'ckpt'
  rc = import_weights.main(
    [
      '--format',
      'torchvision_retinanet',
      '--input',
      str(tmp_path / 'tv.npz'),
      '--output',
      str(out),
      '--config',
      config_file,
    ]
  )
  assert rc == 0
  restored = checkpoint.load_variables(str(out))
  want = weights.from_torchvision_retinanet(sd, ref.tiny_config())
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, restored, want)


def test_resnet_checkpoint_holds_backbone_only(tmp_path, config_file):
  sd, _ = ref.resnet_state_dict(np.random.default_rng(1), depth=34, width=8, with_fc=True)
  np.savez(tmp_path / 'r34.npz', **sd)
  out = tmp_path / 'r34'
  assert (
    import_weights.main(
      [
        '--format',
        'timm_resnet',
        '--input',
        str(tmp_path / 'r34.npz'),
        '--output',
        str(out),
        '--config',
        config_file + ':34',
      ]
    )
    == 0
  )
  restored = checkpoint.load_variables(str(out))
  assert {c: set(t) for c, t in restored.items()} == {'params': {'backbone'}, 'frozen': {'backbone'}}
  np.testing.assert_array_equal(
    restored['params']['backbone']['layer3']['block5']['conv2']['kernel'],
    sd['layer3.5.conv2.weight'].transpose(2, 3, 1, 0),
  )


def test_errors(tmp_path, config_file, capsys):
  sd, _ = ref.resnet_state_dict(np.random.default_rng(2), depth=18, width=8)
  sd['layer9.0.conv1.weight'] = sd['layer1.0.conv1.weight']
  np.savez(tmp_path / 'bad.npz', **sd)
  rc = import_weights.main(
    [
      '--format',
      'torchvision_resnet',
      '--input',
      str(tmp_path / 'bad.npz'),
      '--output',
      str(tmp_path / 'x'),
      '--config',
      config_file,
    ]
  )
  assert rc == 2 and 'layer9.0.conv1.weight' in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()
  (tmp_path / 'exists').mkdir()
  args = ['--format', 'torchvision_resnet', '--input', str(tmp_path / 'bad.npz'), '--output', str(tmp_path / 'exists')]
  assert import_weights.main([*args, '--config', config_file]) == 2
  exists = f'--output {tmp_path / "exists"} already exists; choose a new directory'
  assert capsys.readouterr().err == f'conret-import: error: {exists}\n'  # one line, no usage line


def test_detectron_pickle_to_init_from(tmp_path, detectron_config_file, capsys):
  blobs = ref.detectron_blobs(ref.affine_resnet_state_dict(np.random.default_rng(3), depth=50, width=8))
  momentum = {k + '_momentum': np.zeros_like(v) for k, v in blobs.items()}
  (tmp_path / 'R-50.pkl').write_bytes(pickle.dumps({'blobs': {**blobs, **momentum}}, protocol=2))
  out = tmp_path / 'r50'
  assert (
    import_weights.main(
      [
        '--format',
        'detectron_resnet',
        '--input',
        str(tmp_path / 'R-50.pkl'),
        '--output',
        str(out),
        '--config',
        detectron_config_file + ':50',
      ]
    )
    == 0
  )
  assert 'Detectron weights expect model.pixel_mean=(122.7717, 115.9465, 102.9801)' in capsys.readouterr().err
  config = import_weights.load_config(detectron_config_file + ':50')
  restored = checkpoint.load_variables(str(out))  # what config.init_from reads
  want = weights.from_detectron_resnet(blobs, config)
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, restored, want)
  model = detectors.build_model(config)
  fresh = ref.random_like(jax.eval_shape(lambda: detectors.init_variables(model, jax.random.key(0), (128, 128))))
  merged = checkpoint.merge_init(fresh['frozen'], restored['frozen'])
  jax.tree.map(np.testing.assert_array_equal, merged['backbone'], want['frozen']['backbone'])


def test_detectron_default_config_puts_the_stride_on_the_1x1():
  assert import_weights.default_config('detectron_resnet').model.backbone.stride_in_1x1
  assert not import_weights.default_config('timm_resnet').model.backbone.stride_in_1x1


def test_a_failed_write_leaves_nothing_behind(tmp_path, config_file, capsys, monkeypatch):
  """orbax fails halfway through the checkpoint (a full disk): one line, exit 2, no --output, no partial folder."""
  sd, _ = ref.resnet_state_dict(np.random.default_rng(4), depth=18, width=8)
  np.savez(tmp_path / 'r18.npz', **sd)

  def save(self, path, *args, **kwargs):
    os.makedirs(path)
    open(os.path.join(path, 'half_written'), 'w').close()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ocp.Checkpointer, 'save', save)
  out = str(tmp_path / 'weights' / 'r18')
  args = ['--format', 'torchvision_resnet', '--input', str(tmp_path / 'r18.npz'), '--output', out]
  assert import_weights.main([*args, '--config', config_file]) == 2
  assert capsys.readouterr().err == f'conret-import: error: cannot write {out}: {os.strerror(errno.ENOSPC)}\n'
  assert sorted(os.listdir(tmp_path)) == ['r18.npz', 'tiny.py']


@pytest.mark.parametrize('fmt, name', [('detectron_resnet', 'R-50.pkl'), ('torchvision_resnet', 'r50.npz')])
def test_missing_input_is_one_line(tmp_path, config_file, capsys, fmt, name):
  path = str(tmp_path / name)
  assert (
    import_weights.main(['--format', fmt, '--input', path, '--output', str(tmp_path / 'x'), '--config', config_file])
    == 2
  )
  assert capsys.readouterr().err == f'conret-import: error: {path}: no such file\n'
  assert not (tmp_path / 'x').exists()


def test_code_in_a_pickle_is_refused(tmp_path, config_file, capsys):
  (tmp_path / 'evil.pkl').write_bytes(pickle.dumps({'conv1_w': print}, protocol=2))
  assert (
    import_weights.main(
      [
        '--format',
        'detectron_resnet',
        '--input',
        str(tmp_path / 'evil.pkl'),
        '--output',
        str(tmp_path / 'x'),
        '--config',
        config_file,
      ]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert 'refused global __builtin__.print' in err and err.count('\n') == 1
