"""Drawing detections: boxes with class names and scores on images, and a PNG grid of several images.

Used after each evaluation (DIR/eval/step_N/detections.png: ground truth beside detections) and by `conret-predict`.
PIL only, default font.
"""

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours; class i uses PALETTE[i % len(PALETTE)].
PALETTE = (
  (230, 25, 75),
  (60, 180, 75),
  (255, 225, 25),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (250, 190, 212),
  (0, 128, 128),
  (170, 110, 40),
)


def to_pil(image) -> Image.Image:
  """[H, W, 3] array (float 0..255 or uint8) or PIL image -> RGB PIL image."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  array = np.clip(np.asarray(image, np.float32), 0, 255).round().astype(np.uint8)
  return Image.fromarray(array, 'RGB')


def draw_detections(
  image,
  boxes: np.ndarray,
  scores: np.ndarray,
  classes: np.ndarray,
  class_names: Sequence[str],
  *,
  valid: np.ndarray | None = None,
  score_threshold: float = 0.0,
  line_width: int = 2,
  with_scores: bool = True,
) -> Image.Image:
  """Draws boxes labelled 'name score' on a copy of `image`.

  Args:
    image: [H, W, 3] array or PIL image; boxes are in its pixels.
    boxes: [D, 4] x1y1x2y2; scores: [D]; classes: [D] contiguous class index into class_names.
    valid: [D] bool, False rows are skipped; rows scoring below score_threshold are skipped too.
  Returns:
    A new RGB PIL image.
  """
  out = to_pil(image).copy()
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  classes = np.asarray(classes).reshape(-1).astype(int)
  keep = scores >= score_threshold
  if valid is not None:
    keep &= np.asarray(valid, bool).reshape(-1)
  # Lowest score first, so the most confident boxes and labels end up on top.
  for d in sorted(np.flatnonzero(keep), key=lambda i: scores[i]):
    colour = PALETTE[classes[d] % len(PALETTE)]
    x1, y1, x2, y2 = (float(v) for v in boxes[d])
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
    name = class_names[classes[d]] if 0 <= classes[d] < len(class_names) else str(classes[d])
    label = f'{name} {scores[d]:.2f}' if with_scores else name
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    text_w, text_h = right - left, bottom - top
    ty = y1 - text_h - 2 if y1 - text_h - 2 >= 0 else y1  # above the box, or inside it at the image top
    draw.rectangle([x1, ty, x1 + text_w + 2, ty + text_h + 2], fill=colour)
    draw.text((x1 + 1 - left, ty + 1 - top), label, fill=(0, 0, 0), font=font)
  return out


def draw_ground_truth(
  image,
  boxes: np.ndarray,
  classes: np.ndarray,
  class_names: Sequence[str],
  *,
  valid: np.ndarray | None = None,
  line_width: int = 2,
) -> Image.Image:
  """Ground-truth boxes labelled with their class name only (no score), in the class colours."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return draw_detections(
    image,
    boxes,
    np.ones(len(boxes), np.float32),
    classes,
    class_names,
    valid=valid,
    line_width=line_width,
    with_scores=False,
  )


def _caption(tile: Image.Image, text: str) -> Image.Image:
  """`tile` with a one-line caption strip above it."""
  font = ImageFont.load_default()
  left, top, right, bottom = ImageDraw.Draw(tile).textbbox((0, 0), text, font=font)
  strip = bottom - top + 6
  out = Image.new('RGB', (max(tile.width, right - left + 6), tile.height + strip), (255, 255, 255))
  ImageDraw.Draw(out).text((3 - left, 3 - top), text, fill=(0, 0, 0), font=font)
  out.paste(tile, (0, strip))
  return out


def _side_by_side(*tiles: Image.Image) -> Image.Image:
  out = Image.new(
    'RGB', (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)), (255, 255, 255)
  )
  x = 0
  for tile in tiles:
    out.paste(tile, (x, 0))
    x += tile.width + 4
  return out


def _threshold_caption(scores: np.ndarray, valid: np.ndarray | None, score_threshold: float) -> str:
  """Caption for one image's detections: [D] scores (valid [D] bool or None) -> how many reach the threshold.

  When none does, it gives the best score there was, so an undertrained model's near misses are visible.
  """
  scores = np.asarray(scores, np.float32)
  scores = scores[np.asarray(valid, bool)] if valid is not None else scores
  shown = int((scores >= score_threshold).sum())
  if shown or not len(scores):
    return f'detections >= {score_threshold:.2f}: {shown}'
  return f'none >= {score_threshold:.2f} (best {scores.max():.3f})'


def _cell(images, i: int, detections: dict, class_names, score_threshold: float, ground_truth: dict | None):
  """Cell i of the grid: images[i] with its detections, or with ground_truth the captioned ground truth beside them."""
  valid = detections['valid'][i] if 'valid' in detections else None
  tile = draw_detections(
    images[i],
    detections['boxes'][i],
    detections['scores'][i],
    detections['classes'][i],
    class_names,
    valid=valid,
    score_threshold=score_threshold,
  )
  if ground_truth is None:
    return tile
  gt = draw_ground_truth(
    images[i], ground_truth['boxes'][i], ground_truth['classes'][i], class_names, valid=ground_truth['valid'][i]
  )
  caption = _threshold_caption(detections['scores'][i], valid, score_threshold)
  return _side_by_side(_caption(gt, 'ground truth'), _caption(tile, caption))


def _tile_grid(tiles: Sequence[Image.Image]) -> Image.Image:
  """Equal-size tiles in a near-square grid (ceil(sqrt(n)) columns, row by row), empty cells white."""
  cols = math.ceil(math.sqrt(len(tiles)))
  rows = math.ceil(len(tiles) / cols)
  tile_w, tile_h = tiles[0].size
  grid = Image.new('RGB', (cols * tile_w, rows * tile_h), (255, 255, 255))
  for i, tile in enumerate(tiles):
    grid.paste(tile, ((i % cols) * tile_w, (i // cols) * tile_h))
  return grid


def save_grid(
  images,
  detections: dict,
  class_names: Sequence[str],
  path,
  max_images: int = 8,
  score_threshold: float = 0.3,
  ground_truth: dict | None = None,
  title: str = '',
) -> Image.Image:
  """Draws each image's detections and writes them as one PNG grid (near-square layout).

  Args:
    images: [N, H, W, 3] (float 0..255 or uint8), all the same size.
    detections: numpy dict boxes [N, D, 4], scores [N, D], classes [N, D], optional valid [N, D].
    path: the .png to write, or a binary file object open for writing (a gs:// file: conret_jax/fileio.py).
    score_threshold: detections below it are not drawn.
    ground_truth: optional numpy dict boxes [N, M, 4], classes [N, M], valid [N, M]: each cell then shows the
      ground truth (left) beside the detections (right), both captioned, the right one with the threshold and,
      when nothing reaches it, the best score there was.
    title: optional line above the grid (e.g. the run and step).
  Returns:
    The grid image.
  """
  n = min(len(images), max_images)
  if n == 0:
    raise ValueError('save_grid needs at least one image')
  tiles = [_cell(images, i, detections, class_names, score_threshold, ground_truth) for i in range(n)]
  grid = _tile_grid(tiles)
  if title:
    grid = _caption(grid, title)
  grid.save(path, format='PNG')
  return grid
