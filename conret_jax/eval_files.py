"""What an evaluation leaves in a workdir, and how it is shown.

  WORKDIR/eval/step_N<suffix>/   `Record`: the suffix is '' for an evaluation with the run's own settings, else
                                 '+key=value' for each setting that differs (`override_suffix`), so an override never
                                 writes over the run's record (`record_for`); every folder holds settings.json
    detections.json              COCO results, original image coordinates
    metrics.json                 the summary metrics (fractions) and per-class AP
    detections.png               ground truth beside detections for the first eval images
    settings.json                {"overrides": [...], "config": the config evaluated with}
The console table of an evaluation (`format_metrics`) is AP in percent.
"""

import dataclasses
import hashlib
import json
import os

import ml_collections
import numpy as np

from conret_jax import coco_metrics as metrics_lib
from conret_jax import fileio, run_record

METRIC_NAMES = metrics_lib.METRIC_NAMES


def format_metrics(metrics: dict, per_class: dict | None = None, *, title: str = '') -> str:
  """The console table of an evaluation, AP in percent (COCO's usual presentation; the json files keep fractions):
  the summary metrics in one row, then one row per class if `per_class` is given (-1, undefined, shows as '-')."""
  pct = lambda v, width: f'{100 * v:>{width}.1f}' if v >= 0 else f'{"-":>{width}}'
  names = [n for n in METRIC_NAMES if n in metrics]
  lines = [
    f'{title} (AP in percent)' if title else '(AP in percent)',
    ' '.join(f'{n:>6}' for n in names),
    ' '.join(pct(metrics[n], 6) for n in names),
  ]
  if per_class:
    width = max(8, *(len(n) for n in per_class))
    lines += ['', f'{"class":<{width}} {"id":>5} {"AP":>6} {"AP50":>6} {"AP75":>6}']
    for name, row in per_class.items():
      lines.append(
        f'{name:<{width}} {row["category_id"]:>5} ' + ' '.join(pct(row[k], 6) for k in ('AP', 'AP50', 'AP75'))
      )
  return '\n'.join(lines)


def read_per_class(directory: str) -> dict | None:
  """The per-class AP an evaluation wrote to DIRECTORY/metrics.json (Record.directory), or None if there is none."""
  path = os.path.join(directory, 'metrics.json')
  if not fileio.exists(path):
    return None
  with fileio.open_file(path) as f:
    return json.load(f).get('per_class')


def eval_dir(workdir: str, step: int) -> str:
  """DIR/eval/step_N: where one evaluation's files go."""
  return os.path.join(workdir, 'eval', f'step_{int(step)}')


def write_eval(out_dir: str, results: list[dict], metrics: dict, per_class: dict | None = None) -> None:
  """Writes OUT_DIR/detections.json (COCO results format) and OUT_DIR/metrics.json.

  metrics.json: {name: float} for the summary metrics and, if per_class is given,
  "per_class": {category name: {"category_id": int, "AP": float, "AP50": float, "AP75": float}} (-1.0: undefined).
  """
  fileio.makedirs(out_dir)
  # Each file whole or not at all (fileio.write_text), as the run records: an evaluation cut off leaves no half file.
  fileio.write_text(os.path.join(out_dir, 'detections.json'), json.dumps(results))
  content = {k: float(v) for k, v in metrics.items()}
  if per_class is not None:
    content['per_class'] = per_class
  fileio.write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(content, indent=2, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class Record:
  """Where an evaluation's files go: WORKDIR/eval/step_N<suffix>/. The suffix is '' for an evaluation with the run's
  own settings, else `override_suffix`'s name of what differs, so no override writes over the run's record."""

  workdir: str
  step: int
  suffix: str = ''

  @property
  def directory(self) -> str:
    return eval_dir(self.workdir, self.step) + self.suffix


# Keys that change neither the detections nor the scores: an evaluation differing only in them is the run's own.
_NEUTRAL_KEYS = (
  'train.',
  'checkpoint.',
  'data.train.',
  'eval.every_steps',
  'eval.at_end',
  'eval.visualize',
  'eval.global_batch_size',
  'eval.coco_backend',
  'data.prefetch',
  'data.num_parallel_calls',
  'init_from',
)


def override_suffix(saved_config, config) -> str:
  """'' if `config` evaluates as the run's saved config does, else '+key=value+...' naming each key that differs
  (a hash stands in for a name longer than a folder name should be)."""
  old, new = (run_record.flat_settings(c) for c in (saved_config, config))
  keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not k.startswith(_NEUTRAL_KEYS)]
  suffix = ''.join(f'+{k}={_plain(new.get(k))}' for k in keys)
  if len(suffix) > 120:
    digest = hashlib.sha1(suffix.encode()).hexdigest()[:10]
    suffix = f'+{len(keys)}_overrides_{digest}'
  return suffix


def _plain(value) -> str:
  text = ','.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
  return ''.join(ch if ch.isalnum() or ch in '._,-=' else '_' for ch in text)


def save_picture(collected, class_names, path: str, *, threshold: float, title: str) -> None:
  """detections.png: the pictured images, ground truth beside detections. short_side batches come in up to two
  padded shapes; the grid takes those of the first image's shape."""
  from conret_jax import visualize

  rows = [r for r in collected.pictured if r[0].shape == collected.pictured[0][0].shape]
  stack = lambda i: {k: np.stack([r[i][k] for r in rows]) for k in rows[0][i]}
  with fileio.open_file(path, 'wb') as f:  # PIL writes to the file object: a gs:// path is no local file name
    visualize.save_grid(
      np.stack([r[0] for r in rows]),
      stack(1),
      class_names,
      f,
      max_images=len(rows),
      score_threshold=threshold,
      ground_truth=stack(2),
      title=title,
    )


def recorded_config(directory: str):
  """The config an evaluation folder was written with (its settings.json), or None (none, or written before every
  folder had one)."""
  path = os.path.join(directory, 'settings.json')
  if not fileio.exists(path):
    return None
  try:
    with fileio.open_file(path) as f:
      return ml_collections.ConfigDict(json.load(f)['config'])
  except (ValueError, KeyError, TypeError):  # damaged: treated as unknown settings, as a folder without the file
    return None


def record_for(workdir: str, step: int, run_config, config) -> Record:
  """Where an evaluation of `step` with `config` goes: suffix '' when it evaluates as the run's config
  (`run_config`, its config.json) does, else `override_suffix`. A run resumed with other evaluation settings changes
  its config.json, so a folder of that name may hold an evaluation with other settings (its settings.json says):
  the evaluation then goes to that name plus what differs from those settings, never over them."""
  suffix = override_suffix(run_config, config) if run_config is not None else ''
  for _ in range(8):  # each round adds a difference to the name; a chain of resumes longer than this is not expected
    earlier = recorded_config(eval_dir(workdir, step) + suffix)
    differs = override_suffix(earlier, config) if earlier is not None else ''
    if not differs:
      break
    suffix += differs
  return Record(workdir, step, suffix)


def write_record(record: Record, collected, scores, class_names, config) -> None:
  """The files of one evaluation (see the module docstring); `collected`: evaluation's pass."""
  out_dir = record.directory
  write_eval(out_dir, collected.results, scores.summary, scores.per_class)
  settings = {'overrides': record.suffix.split('+')[1:], 'config': config.to_dict()}
  fileio.write_text(os.path.join(out_dir, 'settings.json'), json.dumps(settings, indent=1, default=str))
  if collected.pictured:
    threshold = float(config.eval.visualize_score_threshold)
    title = f'{record.workdir}, step {record.step}{record.suffix}: ground truth | detections scoring >= {threshold:.2f}'
    save_picture(
      collected, list(class_names), os.path.join(out_dir, 'detections.png'), threshold=threshold, title=title
    )
