"""The SSD family's config: defaults.ssd_config's values agree with multibox.SSD_STAGES and the default-box presets;
each key out of range is named; a key of another family set on this one (and back) is refused; frozen layers need
init_from."""

import pytest
from test_ssd import ssd_config

from conret_jax import config_checks, defaults, detectors, multibox
from conret_jax.core import default_boxes
from conret_jax.errors import ConfigError
from conret_jax.model import ssd
from conret_jax.stages import Stages


@pytest.mark.parametrize('size,preset', [(300, default_boxes.SSD300), (512, default_boxes.SSD512)])
def test_ssd_config_is_ssds(size, preset):
  config = defaults.ssd_config(size)
  config_checks.validate(config)
  assert ssd.default_box_spec(config.model.ssd) == preset
  stages = Stages.from_config(config)
  want = multibox.SSD_STAGES
  assert (stages.pos_iou, stages.neg_iou, stages.box_weights) == (want.pos_iou, want.neg_iou, want.box_weights)
  loss = detectors.from_config(config).loss
  assert (loss.neg_pos_ratio, loss.min_negatives, loss.smooth_l1_beta) == (3.0, 0, 1.0)
  e = config.eval
  assert (e.score_threshold, e.topk_per_class, e.nms_iou, e.max_detections) == (0.01, 400, 0.45, 200)
  with pytest.raises(ValueError, match='300 or 512'):
    defaults.ssd_config(320)


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('model.ssd.backbone', 'vgg19', 'backbone'),
    ('model.ssd.image_size', 320, 'image_size'),
    ('model.ssd.width_divisor', 3, 'width_divisor'),
    ('model.ssd.norm', 'bn', "norm='bn'"),
    ('model.ssd.extra_norm', 'frozen_bn', 'extra_norm'),
    ('model.ssd.freeze_at', 6, 'freeze_at'),
    ('model.ssd.aspect_ratios', ((2,),) * 5, 'aspect_ratios has 5'),
    ('model.ssd.steps', (8, 16, 32, 64, 100, 300, 512), 'steps has 7'),
    ('model.ssd.steps', (8, 16, 0, 64, 100, 300), 'steps'),
    ('model.ssd.aspect_ratios', ((2,), (), (2, 3), (2, 3), (2,), (2,)), 'aspect_ratios'),
    ('model.ssd.min_ratio', 95, 'min_ratio'),
    ('loss.neg_pos_ratio', 0.0, 'neg_pos_ratio'),
    ('loss.min_negatives', -1, 'min_negatives'),
    ('loss.refined_negatives', 'all', 'refined_negatives'),
    ('loss.smooth_l1_beta', -1.0, 'smooth_l1_beta'),
  ],
)
def test_invalid_keys_are_named(key, value, match):
  config = ssd_config(**{key: value})
  with pytest.raises(ConfigError, match=match):
    config_checks.validate(config)


def test_resnet_norms_and_freezing():
  config = ssd_config(backbone='resnet50', **{'model.ssd.freeze_at': 4})
  config_checks.validate(config)
  config.model.ssd.freeze_at = 5  # the trunk ends at res4
  with pytest.raises(ConfigError, match=r'freeze_at=5 must be in \[0, 4\]'):
    config_checks.validate(config)
  config.model.ssd.freeze_at, config.model.ssd.norm = 0, ''
  with pytest.raises(ConfigError, match='norm'):
    config_checks.validate(config)


def test_keys_of_another_family_are_refused():
  config = ssd_config(**{'model.fpn.channels': 64})
  with pytest.raises(ConfigError, match="config.model.fpn.channels=64 does nothing for config.model.family='ssd'"):
    config_checks.validate(config)
  config = ssd_config(**{'loss.focal_gamma': 1.5})
  with pytest.raises(ConfigError, match='config.loss.focal_gamma'):
    config_checks.validate(config)
  retinanet = defaults.base_config()
  retinanet.model.ssd.backbone = 'resnet50'
  with pytest.raises(
    ConfigError, match="config.model.ssd.backbone='resnet50' does nothing for config.model.family='retinanet'"
  ):
    config_checks.validate(retinanet)
  retinanet = defaults.base_config()
  retinanet.loss.neg_pos_ratio = 2.0
  with pytest.raises(ConfigError, match='neg_pos_ratio'):
    config_checks.validate(retinanet)
  retinanet = defaults.base_config()
  retinanet.loss.smooth_l1_beta = 1.0  # both families read it
  retinanet.model.ssd.aspect_ratios = [list(r) for r in retinanet.model.ssd.aspect_ratios]  # a json round trip's
  config_checks.validate(retinanet)


def test_frozen_layers_need_init_from():
  config = ssd_config(**{'model.ssd.freeze_at': 2})
  with pytest.raises(ConfigError, match='conret-import --format=torchvision_vgg16') as e:
    config_checks.validate_training(config)
  assert 'freeze_at=2' in str(e.value) and 'allow_random_frozen' in str(e.value)
  config.init_from = '/weights/vgg16_ssd'
  config_checks.validate_training(config)
  config = ssd_config(backbone='resnet50')  # frozen batch norm
  with pytest.raises(ConfigError, match="norm='frozen_bn'.*--format=torchvision_resnet"):
    config_checks.validate_training(config)
  config.model.ssd.allow_random_frozen = True
  config_checks.validate_training(config)
  config_checks.validate_training(ssd_config())  # nothing frozen: from scratch is allowed
