"""Dataset metadata shared by every source: DatasetInfo, the category <-> class mapping, and DatasetError.

Class index i <-> category_ids[i] with category_ids sorted ascending, so a dataset with non-contiguous COCO ids
(1..90 with gaps) trains on contiguous indices 0..K-1 and its detections are written back with the dataset's ids.
"""

import dataclasses

import numpy as np

# COCO's 80 category ids (1..90 with gaps), in the order of tfds' `objects/label` (0..79). tfds builds its label
# names from the sorted COCO categories, so tfds label i is COCO category COCO_CATEGORY_IDS[i].
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


# COCO's names for those ids (used where a tfds install lacks its label file, e.g. under tfds mocking).
COCO_CLASS_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')


class DatasetError(ValueError):
  """A dataset that cannot be used at all (malformed json, no images, wrong class count): stops at start-up."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
  """A file the dataset needs (annotation json, TFRecord shards, tfds data_dir) does not exist."""


@dataclasses.dataclass
class DatasetInfo:
  """category_ids: sorted dataset ids; class_names[i] names category_ids[i]; coco_gt: COCO-format ground truth
  (images, annotations, categories with the dataset's ids) for evaluation, or None where not built (train)."""
  category_ids: list
  class_names: list
  num_examples: int
  coco_gt: dict | None = None

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)


def category_to_class_table(category_ids) -> dict:
  """{category_id: class index} for sorted category ids."""
  ids = sorted(int(c) for c in category_ids)
  if len(set(ids)) != len(ids):
    raise DatasetError(f'duplicate category ids: {ids}')
  return {c: i for i, c in enumerate(ids)}


def classes_to_category_ids(classes, category_ids) -> np.ndarray:
  """classes: int array of class indices 0..K-1 -> the dataset's category ids (same shape)."""
  table = np.asarray(sorted(category_ids), np.int64)
  return table[np.asarray(classes, np.int64)]


def category_ids_to_classes(ids, category_ids) -> np.ndarray:
  """Inverse of classes_to_category_ids; raises DatasetError on an id the dataset does not have."""
  table = np.asarray(sorted(category_ids), np.int64)
  ids = np.asarray(ids, np.int64)
  idx = np.searchsorted(table, ids)
  ok = (idx < len(table)) & (table[np.minimum(idx, len(table) - 1)] == ids)
  if not np.all(ok):
    raise DatasetError(f'unknown category ids {sorted(set(ids[~ok].tolist()))}; dataset has {table.tolist()}')
  return idx.astype(np.int32)


def check_num_classes(info: DatasetInfo, config) -> None:
  """Stops at start-up when config.model.num_classes disagrees with the dataset's number of categories."""
  want = int(config.model.num_classes)
  if want != info.num_classes:
    raise DatasetError(
        f'config.model.num_classes={want} but the dataset has {info.num_classes} categories '
        f'(ids {info.category_ids[:10]}{"..." if info.num_classes > 10 else ""}); '
        f'set --config.model.num_classes={info.num_classes}')
