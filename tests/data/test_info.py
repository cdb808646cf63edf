import numpy as np
import pytest

from conret_jax import defaults
from conret_jax.data import info as info_lib


def test_category_table_sorts_ids():
  assert info_lib.category_to_class_table([90, 3, 7, 11, 1]) == {1: 0, 3: 1, 7: 2, 11: 3, 90: 4}
  with pytest.raises(info_lib.DatasetError, match='duplicate'):
    info_lib.category_to_class_table([3, 3])


def _info():
  return info_lib.DatasetInfo(category_ids=[1, 3, 90], class_names=['person', 'car', 'toothbrush'], num_examples=5)


def test_contiguous_layout_numbers_categories_in_order():
  layout = info_lib.ClassLayout('contiguous', 3, (1, 3, 90), ('person', 'car', 'toothbrush'))
  np.testing.assert_array_equal(layout.model_class, [0, 1, 2])
  np.testing.assert_array_equal(layout.category_of, [1, 3, 90])
  assert layout.class_names == ['person', 'car', 'toothbrush']


def test_category_id_layout_uses_the_ids_themselves():
  """torchvision's 91-way COCO head: class 1 is person (COCO id 1), class 0 and unused ids are no category."""
  config = defaults.base_config()
  config.model.num_classes, config.model.class_layout = 91, 'category_id'
  layout = info_lib.ClassLayout.of(_info(), config)
  np.testing.assert_array_equal(layout.model_class, [1, 3, 90])
  assert layout.category_of[1] == 1 and layout.category_of[90] == 90
  assert layout.category_of[0] == -1 and layout.category_of[2] == -1 and len(layout.category_of) == 91
  assert layout.class_names[1] == 'person' and layout.class_names[0] == '0'
  layout.check()
  config.model.num_classes = 90  # id 90 needs 91 classes
  with pytest.raises(info_lib.DatasetError, match='must exceed the largest category id 90'):
    info_lib.ClassLayout.of(_info(), config).check()


def test_coco_table_has_80_sorted_ids():
  ids = info_lib.COCO_CATEGORY_IDS
  assert len(ids) == 80 and list(ids) == sorted(ids) and ids[-1] == 90
  assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)


def test_check_num_classes():
  info = info_lib.DatasetInfo(category_ids=[3, 7, 11], class_names=['a', 'b', 'c'], num_examples=5)
  config = defaults.base_config()
  config.model.num_classes = 3
  info_lib.check_num_classes(info, config)
  config.model.num_classes = 80
  with pytest.raises(info_lib.DatasetError, match='num_classes=80 but the dataset has 3'):
    info_lib.check_num_classes(info, config)
