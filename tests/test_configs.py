"""Every config file loads with its documented arguments and passes the start-up checks."""

import importlib.util
import os

import pytest

from conret_jax import config_checks

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _load(relative_path, arg):
  spec = importlib.util.spec_from_file_location(
    os.path.basename(relative_path)[:-3], os.path.join(CONFIGS, relative_path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


@pytest.mark.parametrize(
  'path,arg',
  [
    ('shapes_demo.py', None),
    ('shapes_demo.py', 'consistent=false,steps=10'),
    ('retinanet_torchvision.py', None),
    ('conretinanet_coco.py', 'depth=50,scale=500'),
    ('conretinanet_coco.py', 'depth=101,scale=800,consistent=false'),
    ('conretinanet_coco.py', 'depth=101,scale=800,schedule=1.5x'),
    ('paper/table1_variants.py', 'variant=cascade'),
    ('paper/table1_variants.py', 'variant=gated_cascade'),
    ('paper/table2_thresholds.py', 'pos=0.7,neg=0.6'),
    ('paper/table3_stages.py', 'cls=3,reg=2'),
    ('paper/table3_stages.py', 'cls=2,reg=2,infer=1'),
    ('ssd300_torchvision.py', None),
    ('ssd_shapes_demo.py', None),
    ('ssd_shapes_demo.py', 'consistent=false,steps=10'),
    ('paper/table5_ssd.py', 'backbone=vgg16,consistent=true'),
    ('paper/table5_ssd.py', 'backbone=vgg16,consistent=false,weights=features'),
    ('paper/table5_ssd.py', 'backbone=resnet50,consistent=true'),
    ('paper/table5_ssd.py', 'backbone=resnet50,consistent=false'),
  ],
)
def test_config_loads_and_validates(path, arg):
  _, config = _load(path, arg)
  config_checks.validate(config)


def test_paper_tables_set_what_they_name():
  _, c = _load('paper/table3_stages.py', 'cls=1,reg=1')
  assert not c.consistent.enabled  # (1, 1) is the RetinaNet baseline row
  _, c = _load('paper/table3_stages.py', 'cls=2,reg=2,infer=1')
  assert (c.consistent.num_cls_terms, c.consistent.num_reg_terms, c.consistent.inference_reg_steps) == (2, 2, 1)
  _, c = _load('paper/table2_thresholds.py', 'pos=0.7,neg=0.6')
  assert (c.consistent.pos_iou_thresholds[1], c.consistent.neg_iou_thresholds[1]) == (0.7, 0.6)
  module, c = _load('paper/table1_variants.py', 'variant=baseline')
  assert not c.consistent.enabled and set(module.PAPER) == {'baseline', 'cascade', 'gated_cascade', 'consistent'}
  module, c = _load('conretinanet_coco.py', 'depth=101,scale=800')
  assert (c.model.backbone.depth, c.data.image_size, c.data.max_size) == (101, 800, 1333)
  assert module.TABLE4_AP[(101, 800, True)] == 38.7


def test_ssd_configs_set_what_they_name():
  module, c = _load('paper/table5_ssd.py', 'backbone=resnet50,consistent=false')
  assert (c.model.family, c.model.ssd.backbone, c.model.ssd.image_size, c.data.image_size) == (
    'ssd',
    'resnet50',
    512,
    512,
  )
  assert not c.consistent.enabled and module.PAPER[('resnet50', True)] == (31.9, 51.0, 33.8)
  assert module.PAPER[('vgg16', False)] == (28.9, 47.9, 30.6) and module.PAPER[('vgg16', True)] == (30.5, 49.6, 31.7)
  with pytest.raises(config_checks.ConfigError, match='init_from'):
    config_checks.validate_training(c)
  _, c = _load('paper/table5_ssd.py', 'backbone=vgg16,weights=features')
  assert c.consistent.enabled and c.model.pixel_std == (1.0, 1.0, 1.0) and c.model.ssd.freeze_at == 2
  with pytest.raises(config_checks.ConfigError, match='torchvision_vgg16'):
    config_checks.validate_training(c)
  with pytest.raises(ValueError, match='weights'):
    _load('paper/table5_ssd.py', 'backbone=resnet50,weights=features')
  _, tv = _load('ssd300_torchvision.py', None)
  assert (tv.model.class_layout, tv.model.num_classes, tv.model.ssd.image_size) == ('category_id', 91, 300)
  assert tv.model.pixel_mean == pytest.approx((123.0, 117.0, 104.0), abs=0.01) and tv.model.pixel_std == (1.0,) * 3
  assert (tv.eval.score_threshold, tv.eval.topk_per_class, tv.eval.nms_iou, tv.eval.max_detections) == (
    0.01,
    400,
    0.45,
    200,
  )
  _, demo = _load('ssd_shapes_demo.py', None)
  config_checks.validate_training(demo)  # from scratch: nothing frozen


def test_unknown_argument_is_an_error():
  with pytest.raises(ValueError, match='depht'):
    _load('conretinanet_coco.py', 'depht=50')


def test_a_frozen_backbone_needs_init_from():
  """frozen_bn or freeze_at > 0 without config.init_from would train on random frozen layers: refused, with the
  command that makes the weights; the documented key allows it; from-scratch configs are unaffected."""
  _, config = _load('conretinanet_coco.py', 'depth=101,scale=800')
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate_training(config)
  message = str(e.value)
  assert 'config.init_from' in message and 'conret-import --format=torchvision_resnet' in message
  assert 'resnet101' in message and 'allow_random_frozen' in message
  config.model.backbone.allow_random_frozen = True
  config_checks.validate_training(config)
  config.model.backbone.allow_random_frozen = False
  config.init_from = '/weights/r101'
  config_checks.validate_training(config)
  _, demo = _load('shapes_demo.py', None)  # GroupNorm, freeze_at=0: from scratch
  config_checks.validate_training(demo)
  demo.model.backbone.freeze_at = 1
  with pytest.raises(config_checks.ConfigError, match='freeze_at=1'):
    config_checks.validate_training(demo)


def test_detectron_weights_argument_sets_their_layout():
  from conret_jax import defaults

  _, c = _load('conretinanet_coco.py', 'weights=detectron')
  assert c.model.backbone.stride_in_1x1
  assert (tuple(c.model.pixel_mean), tuple(c.model.pixel_std)) == (defaults.DETECTRON_PIXEL_MEAN_RGB, (1.0,) * 3)
  _, c = _load('conretinanet_coco.py', None)
  assert not c.model.backbone.stride_in_1x1 and tuple(c.model.pixel_mean) == defaults.IMAGENET_PIXEL_MEAN
  assert (c.train.bias_lr_factor, c.train.bias_weight_decay) == (2.0, 0.0)  # Detectron's biases
  _, tv = _load('retinanet_torchvision.py', None)
  assert (tv.train.bias_lr_factor, tv.train.bias_weight_decay) == (1.0, tv.train.weight_decay)
  assert (tv.model.class_layout, tv.model.num_classes) == ('category_id', 91)


def test_settings_that_would_do_nothing_are_errors():
  _, c = _load('conretinanet_coco.py', 'depth=50,scale=500')
  c.train.num_steps, c.train.decay_steps = 40, (60_000, 80_000)
  with pytest.raises(config_checks.ConfigError, match='would never apply'):
    config_checks.validate(c)
  _, c = _load('conretinanet_coco.py', 'depth=50,scale=500')
  c.train.num_steps, c.train.warmup_steps = 40, 500
  with pytest.raises(config_checks.ConfigError, match='warmup_steps=500'):
    config_checks.validate(c)
  _, c = _load('conretinanet_coco.py', 'depth=50,scale=800')
  c.data.scale_jitter = (0.99, 1.0)  # no step of 32 below 800 within 792..800
  with pytest.raises(config_checks.ConfigError, match='would do nothing'):
    config_checks.validate(c)
  c.data.scale_jitter = (0.8, 1.2)
  with pytest.raises(config_checks.ConfigError, match='high <= 1'):
    config_checks.validate(c)
  c.data.scale_jitter = (0.8, 1.0)
  config_checks.validate(c)
  c.model.class_layout = 'by_name'
  with pytest.raises(config_checks.ConfigError, match='class_layout'):
    config_checks.validate(c)


def test_short_side_jitter_that_the_long_side_cap_undoes_is_a_training_error():
  """short_side scales by min(short / short side, max_size / long side): jitter short sides all >= max_size give the
  same scale, so such a jitter does nothing; a training start refuses it, evaluating such a run stays possible."""
  from conret_jax import defaults

  c = defaults.base_config()
  c.model.backbone.allow_random_frozen = True
  c.data.resize, c.data.image_size, c.data.max_size, c.data.scale_jitter = 'short_side', 800, 600, (0.8, 1.0)
  config_checks.validate(c)  # evaluation, analysis: only padding is lost
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate_training(c)
  assert str(e.value) == (
    'config.data.scale_jitter=(0.8, 1.0) would do nothing: its short sides 640-800 are all >= '
    'config.data.max_size=600, whose long-side cap then sets every scale; raise max_size or lower image_size'
  )
  c.data.scale_jitter = (1.0, 1.0)  # no jitter: nothing that would do nothing
  config_checks.validate_training(c)
  c.data.scale_jitter = (0.6, 1.0)  # short sides from 480: those below 600 do scale
  config_checks.validate_training(c)
  for max_size in (800, 1333):
    c.data.max_size, c.data.scale_jitter = max_size, (0.8, 1.0)
    config_checks.validate_training(c)


def test_short_side_jitter_of_table6_is_detectrons_scales():
  from conret_jax.data import sizes

  _, c = _load('conretinanet_coco.py', 'depth=101,scale=800,schedule=1.5x')
  assert sizes.short_side_scales(c.data) == (640, 672, 704, 736, 768, 800)
  assert c.train.num_steps == 135_000
  from conret_jax import defaults

  assert defaults.schedule_steps(c.train) == (500, (90_000, 120_000))


def test_ssd_augmentation_needs_its_resize_and_refuses_settings_it_ignores():
  """augment='ssd' only with resize='stretch' (one line naming both keys); scale_jitter does nothing under
  'stretch', and random_flip would flip twice under 'ssd' (it flips itself); the plain stretch resize is fine."""
  from conret_jax import defaults

  c = defaults.base_config()
  c.data.resize = 'stretch'
  config_checks.validate(c)  # stretch with augment='none': resize only, random_flip as configured
  c.data.augment, c.data.random_flip = 'ssd', False
  config_checks.validate(c)
  for resize in ('square', 'short_side'):
    c.data.resize = resize
    with pytest.raises(config_checks.ConfigError) as e:
      config_checks.validate(c)
    message = str(e.value)
    assert '\n' not in message and "config.data.augment='ssd'" in message
    assert "config.data.resize='stretch'" in message and repr(resize) in message
  c.data.resize = 'stretch'
  c.data.random_flip = True
  with pytest.raises(config_checks.ConfigError, match='random_flip=True with config.data.augment=.ssd. would flip'):
    config_checks.validate(c)
  c.data.random_flip = False
  for augment in ('ssd', 'none'):
    c.data.augment, c.data.scale_jitter = augment, (0.5, 2.0)
    with pytest.raises(config_checks.ConfigError, match=r'scale_jitter=\(0.5, 2.0\) would do nothing with config'):
      config_checks.validate(c)
  c.data.augment, c.data.scale_jitter = 'autoaugment', (1.0, 1.0)
  with pytest.raises(config_checks.ConfigError, match="config.data.augment='autoaugment' must be one of"):
    config_checks.validate(c)
