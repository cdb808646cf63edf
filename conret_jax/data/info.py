"""Dataset metadata shared by every source: DatasetInfo, the model's ClassLayout over it, and DatasetError.

Class index i <-> category_ids[i] with category_ids sorted ascending, so a dataset with non-contiguous COCO ids
(1..90 with gaps) trains on contiguous indices 0..K-1 and its detections are written back with the dataset's ids.
"""

import dataclasses

import numpy as np

from conret_jax.errors import DatasetError, DatasetFileNotFoundError  # noqa: F401 (their home for data code)

# COCO's 80 category ids (1..90 with gaps), in the order of tfds' `objects/label` (0..79). tfds builds its label
# names from the sorted COCO categories, so tfds label i is COCO category COCO_CATEGORY_IDS[i].
COCO_CATEGORY_IDS = (
  1,
  2,
  3,
  4,
  5,
  6,
  7,
  8,
  9,
  10,
  11,
  13,
  14,
  15,
  16,
  17,
  18,
  19,
  20,
  21,
  22,
  23,
  24,
  25,
  27,
  28,
  31,
  32,
  33,
  34,
  35,
  36,
  37,
  38,
  39,
  40,
  41,
  42,
  43,
  44,
  46,
  47,
  48,
  49,
  50,
  51,
  52,
  53,
  54,
  55,
  56,
  57,
  58,
  59,
  60,
  61,
  62,
  63,
  64,
  65,
  67,
  70,
  72,
  73,
  74,
  75,
  76,
  77,
  78,
  79,
  80,
  81,
  82,
  84,
  85,
  86,
  87,
  88,
  89,
  90,
)


# COCO's names for those ids (used where a tfds install lacks its label file, e.g. under tfds mocking).
COCO_CLASS_NAMES = (
  'person',
  'bicycle',
  'car',
  'motorcycle',
  'airplane',
  'bus',
  'train',
  'truck',
  'boat',
  'traffic light',
  'fire hydrant',
  'stop sign',
  'parking meter',
  'bench',
  'bird',
  'cat',
  'dog',
  'horse',
  'sheep',
  'cow',
  'elephant',
  'bear',
  'zebra',
  'giraffe',
  'backpack',
  'umbrella',
  'handbag',
  'tie',
  'suitcase',
  'frisbee',
  'skis',
  'snowboard',
  'sports ball',
  'kite',
  'baseball bat',
  'baseball glove',
  'skateboard',
  'surfboard',
  'tennis racket',
  'bottle',
  'wine glass',
  'cup',
  'fork',
  'knife',
  'spoon',
  'bowl',
  'banana',
  'apple',
  'sandwich',
  'orange',
  'broccoli',
  'carrot',
  'hot dog',
  'pizza',
  'donut',
  'cake',
  'chair',
  'couch',
  'potted plant',
  'bed',
  'dining table',
  'toilet',
  'tv',
  'laptop',
  'mouse',
  'remote',
  'keyboard',
  'cell phone',
  'microwave',
  'oven',
  'toaster',
  'sink',
  'refrigerator',
  'book',
  'clock',
  'vase',
  'scissors',
  'teddy bear',
  'hair drier',
  'toothbrush',
)


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


@dataclasses.dataclass(frozen=True)
class ClassLayout:
  """How the model's class indices stand for a dataset's categories (config.model.class_layout).

    'contiguous'   class k is the k-th smallest category id: K = the number of categories (the default)
    'category_id'  class k IS category id k (torchvision's COCO head: 91 classes for ids 1..90, 0 and the unused ids
                   never occur in the data); K must exceed the largest id
  The data sources number categories contiguously (DatasetInfo); `model_class` turns those numbers into the model's
  classes for training, `category_of` turns predicted classes back into category ids for evaluation.
  """

  kind: str
  num_classes: int
  category_ids: tuple  # the dataset's, ascending
  names: tuple  # names[i] of category_ids[i]

  @classmethod
  def of(cls, info: DatasetInfo, config) -> 'ClassLayout':
    return cls(
      str(config.model.class_layout),
      int(config.model.num_classes),
      tuple(int(c) for c in info.category_ids),
      tuple(str(n) for n in info.class_names),
    )

  @property
  def model_class(self) -> np.ndarray:
    """[num categories] int32: the model's class of each contiguous category number."""
    ids = np.asarray(self.category_ids, np.int32)
    return ids if self.kind == 'category_id' else np.arange(len(ids), dtype=np.int32)

  @property
  def category_of(self) -> np.ndarray:
    """[num_classes] int64: the category id each model class stands for, -1 for classes the dataset has not."""
    table = np.full(self.num_classes, -1, np.int64)
    fits = self.model_class < self.num_classes  # with too few classes, the others cannot be predicted (`check`)
    table[self.model_class[fits]] = np.asarray(self.category_ids)[fits]
    return table

  @property
  def class_names(self) -> list[str]:
    """[num_classes] names for drawing; a class the dataset has not is named by its number."""
    names = [str(k) for k in range(self.num_classes)]
    for k, name in zip(self.model_class, self.names):
      if k < self.num_classes:
        names[int(k)] = name
    return names

  def check(self) -> None:
    """DatasetError unless config.model.num_classes fits the dataset under this layout."""
    n, k = len(self.category_ids), self.num_classes
    if self.kind == 'category_id':
      if k <= max(self.category_ids):
        raise DatasetError(
          f'config.model.num_classes={k} with class_layout=category_id must exceed the largest category id '
          f'{max(self.category_ids)}; set --config.model.num_classes={max(self.category_ids) + 1}'
        )
    elif k != n:
      raise DatasetError(
        f'config.model.num_classes={k} but the dataset has {n} categories '
        f'(ids {list(self.category_ids[:10])}{"..." if n > 10 else ""}); set --config.model.num_classes={n}'
        f'{" (or class_layout=category_id, whose class k is category id k)" if k > max(self.category_ids) else ""}'
      )


@dataclasses.dataclass(frozen=True)
class EvalClasses:
  """How an evaluation names classes: the run's classes (what the model predicts, `ClassLayout.category_of`),
  extended by the eval set's categories that the run never learned, each with an index of its own past the model's
  (their ground truth keeps its category id and name, and no detection can match it).

  category_of: [K + U] int64 class index -> category id (-1: a model class that stands for no category).
  names: [K + U] class names.
  gt_table: {eval batch class (the eval pipeline's numbering, ClassLayout.of(eval info)) -> class index here}.
  unlearned: eval category ids the run never learned; missing: learned category ids the eval set lacks.
  """

  category_of: np.ndarray
  names: tuple
  gt_table: dict
  unlearned: tuple
  missing: tuple

  @classmethod
  def of(cls, run: ClassLayout, eval_info: DatasetInfo, config) -> 'EvalClasses':
    evaluated = ClassLayout.of(eval_info, config)
    learned = {int(c): k for k, c in enumerate(run.category_of) if c >= 0}
    category_of, names = list(run.category_of), list(run.class_names)
    gt_table, unlearned = {}, []
    for batch_class, cat_id, name in zip(evaluated.model_class, evaluated.category_ids, evaluated.names):
      if cat_id not in learned:
        learned[cat_id] = len(category_of)
        category_of.append(cat_id)
        names.append(name)
        unlearned.append(cat_id)
      gt_table[int(batch_class)] = learned[cat_id]
    missing = tuple(c for c in run.category_ids if c not in set(evaluated.category_ids))
    return cls(np.asarray(category_of, np.int64), tuple(names), gt_table, tuple(unlearned), missing)

  @property
  def gt_lookup(self) -> np.ndarray:
    """[max eval batch class + 1] int32: `gt_table` as an array, for a gather (on the host or the device)."""
    table = np.zeros(max(self.gt_table) + 1 if self.gt_table else 1, np.int32)
    table[list(self.gt_table)] = list(self.gt_table.values())
    return table

  def gt_classes(self, classes) -> np.ndarray:
    """Eval batch classes (any shape, the eval pipeline's numbering) -> class indices here."""
    table = self.gt_lookup
    return table[np.clip(np.asarray(classes), 0, len(table) - 1)]

  def report(self) -> list[str]:
    """One line for the eval categories the run never learned, one for the learned ones the eval set lacks."""
    lines = []
    if self.unlearned:
      lines.append(
        f'{len(self.unlearned)} eval categories were never learned by this run (their ground truth counts, '
        f'no detection can match it): ids {list(self.unlearned)[:20]}'
      )
    if self.missing:
      lines.append(
        f'{len(self.missing)} categories the run learned are not in the eval set (their AP is undefined): '
        f'ids {list(self.missing)[:20]}'
      )
    return lines


def check_num_classes(info: DatasetInfo, config) -> None:
  """Stops at start-up when config.model.num_classes does not fit the dataset's categories (see ClassLayout)."""
  ClassLayout.of(info, config).check()
