"""Where training metrics go: a console progress line, DIR/metrics.jsonl, and TensorBoard event files.

Only process 0 writes. A resumed run appends to metrics.jsonl, after dropping any lines past the step it resumed
from (a run killed between a log line and its next checkpoint would otherwise leave duplicate steps).
"""

import json
import os
import time

from absl import logging


def _fmt(value: float) -> str:
  return f'{value:.4g}'


class MetricsWriter:
  """Writes one record per logged step. `enabled=False` (processes other than 0) makes every call a no-op."""

  def __init__(self, workdir: str, *, start_step: int, num_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.num_steps = num_steps
    self._tb = None
    self._last = (time.monotonic(), start_step)
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    _truncate_after(self.path, start_step)
    self._file = open(self.path, 'a', encoding='utf-8')
    try:
      import tensorflow as tf

      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
    except Exception as e:  # TensorBoard is a convenience; its absence must not stop training.
      logging.warning('TensorBoard events disabled: %s', e)

  def write(self, step: int, metrics: dict, *, images_per_step: int) -> None:
    """step: the number of completed steps; metrics: scalars (already on the host)."""
    now = time.monotonic()
    last_time, last_step = self._last
    self._last = (now, step)
    if not self.enabled:
      return
    steps = max(step - last_step, 1)
    dt = max(now - last_time, 1e-9)
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    record['images_per_s'] = images_per_step * steps / dt
    record['seconds_per_step'] = dt / steps
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      import tensorflow as tf

      with self._tb.as_default(step=int(step)):
        for k, v in record.items():
          if k != 'step':
            tf.summary.scalar(k, v)
      self._tb.flush()
    eta = (self.num_steps - step) * record['seconds_per_step']
    terms = ' '.join(
      f'{k}={_fmt(v)}' for k, v in sorted(metrics.items()) if k.startswith(('cls_loss', 'box_loss', 'num_pos'))
    )
    logging.info(
      'step %d/%d  loss=%s  %s  lr=%s  grad_norm=%s  %.1f img/s  eta %s',
      step,
      self.num_steps,
      _fmt(record['loss']),
      terms,
      _fmt(record.get('learning_rate', 0.0)),
      _fmt(record.get('grad_norm', 0.0)),
      record['images_per_s'],
      _hms(eta),
    )

  def write_eval(self, step: int, metrics: dict) -> None:
    if not self.enabled or self._tb is None:
      return
    import tensorflow as tf

    with self._tb.as_default(step=int(step)):
      for k, v in metrics.items():
        tf.summary.scalar(f'eval/{k}', float(v))
    self._tb.flush()

  def reset_clock(self, step: int) -> None:
    """Excludes pauses (compilation, evaluation, checkpointing) from the next images/s."""
    self._last = (time.monotonic(), step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError):
      continue  # a line cut short by a kill mid-write
  if len(kept) != len(lines):
    with open(path, 'w', encoding='utf-8') as f:
      f.writelines(kept)
