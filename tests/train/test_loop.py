"""The training loop in-process: a non-finite step is skipped when config.train.skip_nonfinite_steps allows it, and
otherwise stops the run with the step and the term named, keeping the last good checkpoint; the run records itself."""

import importlib.util
import json
import os
import pathlib

import jax.numpy as jnp
import pytest

from conret_jax import run_record
from conret_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
POISONED_STEP = 3


def _config(cache, **train):
  spec = importlib.util.spec_from_file_location('loop_cfg', ROOT / 'tests' / 'configs' / 'tiny_shapes.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'steps=5,batch=8,train_images=40,eval_images=8,cache={cache}')
  config.eval.at_end = False
  for key, value in train.items():
    config.train[key] = value
  return config


@pytest.fixture(name='poisoned_data')
def fixture_poisoned_data(monkeypatch):
  """Training batches whose images are NaN at step POISONED_STEP (the loss and gradient of that step are NaN)."""
  real = loop.data_lib.make_train_iterator

  class Poisoned:
    def __init__(self, *args, **kwargs):
      self._it = real(*args, **kwargs)

    def __next__(self):
      batch = next(self._it)
      if self._it.step == POISONED_STEP:
        batch = dict(batch, images=batch['images'] * jnp.nan)
      return batch

    def state(self):
      return self._it.state()

  monkeypatch.setattr(loop.data_lib, 'make_train_iterator', Poisoned)


def _logged(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_a_skipped_nan_batch_continues_and_without_the_key_the_run_stops(poisoned_data, tmp_path, caplog):
  workdir = str(tmp_path / 'skips')
  loop.train_and_evaluate(_config(tmp_path / 'shapes', skip_nonfinite_steps=1), workdir)
  logged = _logged(workdir)
  assert [r['step'] for r in logged] == [1, 2, 3, 4, 5] and logged[POISONED_STEP - 1]['finite'] == 0.0
  assert all(r['finite'] == 1.0 for r in logged if r['step'] != POISONED_STEP)
  assert f'step {POISONED_STEP}: non-finite' in caplog.text and 'update skipped' in caplog.text
  assert '5' in os.listdir(os.path.join(workdir, 'checkpoints'))

  # The run recorded itself: its config (the same when loaded back) and the training set's classes.
  saved = run_record.load_config(workdir)
  assert saved.train.skip_nonfinite_steps == 1 and saved.model.to_dict() == _config('').model.to_dict()
  run = run_record.load_run(workdir)
  assert run['classes']['names'] == ['circle', 'square', 'triangle', 'cross', 'ring']
  assert run['classes']['category_ids'] == [3, 7, 11, 15, 19] and run['starts'][0]['step'] == 0

  stopped = str(tmp_path / 'stops')
  with pytest.raises(loop.NonFiniteLossError, match=rf'at step {POISONED_STEP}: .*loss') as e:
    loop.train_and_evaluate(_config(tmp_path / 'shapes'), stopped)
  assert 'last good checkpoint' in str(e.value)
  assert sorted(os.listdir(os.path.join(stopped, 'checkpoints'))) == ['2']  # nothing written after the NaN step
