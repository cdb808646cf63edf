"""The batch: what the input pipeline produces, the train step consumes and evaluation reads, defined once.

A Batch is a flax.struct.dataclass (a pytree, so it is sharded, donated and traced like a dict), with a leading
global-batch axis B on every field; M = config.data.max_boxes:

  images         float32 [B, H, W, 3]  RGB in [0, 255], resized and padded at the bottom/right ('stretch': no padding)
  boxes          float32 [B, M, 4]     x1y1x2y2 in the resized image's pixels
  classes        int32   [B, M]        the model's class index (config.model.class_layout; 0 on padding rows)
  valid          bool    [B, M]        real annotation rows (crowd rows are valid too)
  crowd          bool    [B, M]        iscrowd rows: never matched as positives
  image_id       int32   [B]           the dataset's image id (-1 for padding examples)
  orig_hw        int32   [B, 2]        original image height, width
  scale          float32 [B, 2]        (sy, sx): resized / original height and width; 'square' and 'short_side'
                                       keep the aspect and repeat one factor, 'stretch' warps to S x S
  input_hw       int32   [B, 2]        the resized image's height, width in `images`; the rest is padding
  example_valid  bool    [B]           False for the examples that pad the last eval batch

The training fields are the first five; the rest only evaluation needs (`train_view` drops them). Fields may be
None (a synthetic training batch has no image ids). It also reads like a mapping (`batch['images']`, `keys()`,
`items()`), which is how tf.data hands it over and how tests build one.
"""

from collections.abc import Mapping
from typing import Any

import flax

TRAIN_FIELDS = ('images', 'boxes', 'classes', 'valid', 'crowd')
EVAL_FIELDS = ('image_id', 'orig_hw', 'scale', 'input_hw', 'example_valid')
FIELDS = TRAIN_FIELDS + EVAL_FIELDS


@flax.struct.dataclass
class Batch:
  images: Any = None
  boxes: Any = None
  classes: Any = None
  valid: Any = None
  crowd: Any = None
  image_id: Any = None
  orig_hw: Any = None
  scale: Any = None
  input_hw: Any = None
  example_valid: Any = None

  @classmethod
  def of(cls, batch) -> 'Batch':
    """A Batch from a Batch or a mapping of (some of) its fields; any other key is an error."""
    if isinstance(batch, Batch):
      return batch
    unknown = sorted(set(batch) - set(FIELDS))
    if unknown:
      raise KeyError(f'not batch fields: {unknown} (fields: {FIELDS})')
    return cls(**dict(batch))

  def train_view(self) -> 'Batch':
    """The training fields only (the step never transfers or traces the evaluation ones)."""
    return Batch(**{k: getattr(self, k) for k in TRAIN_FIELDS})

  def keys(self) -> list[str]:
    return [k for k in FIELDS if getattr(self, k) is not None]

  def items(self):
    return [(k, getattr(self, k)) for k in self.keys()]

  def __getitem__(self, key: str):
    if key not in FIELDS or getattr(self, key) is None:
      raise KeyError(key)
    return getattr(self, key)

  def __contains__(self, key) -> bool:
    return key in self.keys()

  def __iter__(self):
    return iter(self.keys())

  def __len__(self) -> int:
    return len(self.keys())


Mapping.register(Batch)  # dict(batch), {**batch} and isinstance(batch, Mapping) work as for the dicts it replaces
