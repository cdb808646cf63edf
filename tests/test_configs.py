"""Every config file loads with its documented arguments and passes the start-up checks."""

import importlib.util
import os

import pytest

from conret_jax import config_checks

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _load(relative_path, arg):
  spec = importlib.util.spec_from_file_location(os.path.basename(relative_path)[:-3],
                                                os.path.join(CONFIGS, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


@pytest.mark.parametrize('path,arg', [
    ('shapes_demo.py', None), ('shapes_demo.py', 'consistent=false,steps=10'),
    ('retinanet_torchvision.py', None),
    ('conretinanet_coco.py', 'depth=50,scale=500'), ('conretinanet_coco.py', 'depth=101,scale=800,consistent=false'),
    ('conretinanet_coco.py', 'depth=101,scale=800,schedule=1.5x'),
    ('paper/table1_variants.py', 'variant=cascade'), ('paper/table1_variants.py', 'variant=gated_cascade'),
    ('paper/table2_thresholds.py', 'pos=0.7,neg=0.6'), ('paper/table3_stages.py', 'cls=3,reg=2'),
    ('paper/table3_stages.py', 'cls=2,reg=2,infer=1'),
])
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


def test_unknown_argument_is_an_error():
  with pytest.raises(ValueError, match='depht'):
    _load('conretinanet_coco.py', 'depht=50')
