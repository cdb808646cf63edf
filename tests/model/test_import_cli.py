"""conret-import: state-dict file -> orbax checkpoint of the imported variables."""

import jax
import numpy as np
import pytest

from conret_jax import weights
from conret_jax.cli import import_weights
from conret_jax.train import checkpoint
import model_reference as ref

TINY_CONFIG = '''
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
'''


@pytest.fixture()
def config_file(tmp_path):
  path = tmp_path / 'tiny.py'
  path.write_text(TINY_CONFIG)
  return str(path)


def test_retinanet_checkpoint_round_trip(tmp_path, config_file):
  sd = ref.retinanet_state_dict(np.random.default_rng(0), ref.tiny_config())
  np.savez(tmp_path / 'tv.npz', **sd)
  out = tmp_path / 'ckpt'
  rc = import_weights.main(['--format', 'torchvision_retinanet', '--input', str(tmp_path / 'tv.npz'),
                            '--output', str(out), '--config', config_file])
  assert rc == 0
  restored = checkpoint.load_variables(str(out))
  want = weights.from_torchvision_retinanet(sd, ref.tiny_config())
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, restored, want)


def test_resnet_checkpoint_holds_backbone_only(tmp_path, config_file):
  sd, _ = ref.resnet_state_dict(np.random.default_rng(1), depth=34, width=8, with_fc=True)
  np.savez(tmp_path / 'r34.npz', **sd)
  out = tmp_path / 'r34'
  assert import_weights.main(['--format', 'timm_resnet', '--input', str(tmp_path / 'r34.npz'),
                              '--output', str(out), '--config', config_file + ':34']) == 0
  restored = checkpoint.load_variables(str(out))
  assert {c: set(t) for c, t in restored.items()} == {'params': {'backbone'}, 'frozen': {'backbone'}}
  np.testing.assert_array_equal(restored['params']['backbone']['layer3']['block5']['conv2']['kernel'],
                                sd['layer3.5.conv2.weight'].transpose(2, 3, 1, 0))


def test_errors(tmp_path, config_file, capsys):
  sd, _ = ref.resnet_state_dict(np.random.default_rng(2), depth=18, width=8)
  sd['layer9.0.conv1.weight'] = sd['layer1.0.conv1.weight']
  np.savez(tmp_path / 'bad.npz', **sd)
  rc = import_weights.main(['--format', 'torchvision_resnet', '--input', str(tmp_path / 'bad.npz'),
                            '--output', str(tmp_path / 'x'), '--config', config_file])
  assert rc == 1 and 'layer9.0.conv1.weight' in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()
  (tmp_path / 'exists').mkdir()
  with pytest.raises(SystemExit):
    import_weights.main(['--format', 'torchvision_resnet', '--input', str(tmp_path / 'bad.npz'),
                         '--output', str(tmp_path / 'exists'), '--config', config_file])
