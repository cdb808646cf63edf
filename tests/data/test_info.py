import numpy as np
import pytest

from conret_jax import defaults
from conret_jax.data import info as info_lib


def test_category_ids_round_trip():
  ids = [90, 3, 7, 11, 1]
  table = info_lib.category_to_class_table(ids)
  assert table == {1: 0, 3: 1, 7: 2, 11: 3, 90: 4}
  classes = np.array([[4, 0], [2, 3]])
  back = info_lib.classes_to_category_ids(classes, ids)
  np.testing.assert_array_equal(back, [[90, 1], [7, 11]])
  np.testing.assert_array_equal(info_lib.category_ids_to_classes(back, ids), classes)
  with pytest.raises(info_lib.DatasetError, match='unknown category ids'):
    info_lib.category_ids_to_classes([2], ids)


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
