"""The training loop: a non-finite step is skipped when config.train.skip_nonfinite_steps allows it, and otherwise
stops the run with the step and the term named, keeping the last good checkpoint; the run records itself.

Both runs go through `loop.train_and_evaluate` in one subprocess on one CPU device, with the model, batch and
schedule of tests/cli/test_train.py's runs: the same compiled programs, which the test-wide compilation cache shares.
The data iterator is wrapped there so that the images of one step are NaN (its loss and gradient are then NaN).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import xla_env

from conret_jax import run_record

ROOT = pathlib.Path(__file__).resolve().parents[2]
POISONED_STEP = 3

# Both scripts: the repository root, the shapes cache and a third argument; the test config; the real iterator.
PREAMBLE = """
import importlib.util, os, signal, sys
import jax.numpy as jnp
from conret_jax.train import loop

root, cache, arg = sys.argv[1], sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location('cfg', f'{root}/tests/configs/tiny_shapes.py')
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
real = loop.data_lib.make_train_iterator
"""

SCRIPT = (
  PREAMBLE
  + """
poisoned = int(arg)


class Poisoned:
  def __init__(self, *args, **kwargs):
    self._it = real(*args, **kwargs)

  def __next__(self):
    batch = next(self._it)
    return batch.replace(images=batch.images * jnp.nan) if self._it.step == poisoned else batch

  def state(self):
    return self._it.state()


loop.data_lib.make_train_iterator = Poisoned
for name, skips in (('skips', 1), ('stops', 0)):
  config = module.get_config(f'steps=8,batch=4,train_images=40,eval_images=8,cache={cache}')
  config.eval.at_end, config.train.skip_nonfinite_steps = False, skips
  try:
    loop.train_and_evaluate(config, f'{cache}/../{name}')
    print(f'RESULT {name} finished')
  except loop.NonFiniteLossError as e:
    print(f'RESULT {name} stopped: {e}')
"""
)


def _logged(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_a_skipped_nan_batch_continues_and_without_the_key_the_run_stops(tmp_path):
  script = tmp_path / 'poisoned.py'
  script.write_text(textwrap.dedent(SCRIPT))
  env = xla_env.cpu_env(1, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  proc = subprocess.run(
    [sys.executable, str(script), str(ROOT), str(tmp_path / 'shapes'), str(POISONED_STEP)],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]

  # With skip_nonfinite_steps=1 the NaN step is logged, skipped, and training goes on to the end.
  assert results[0] == 'RESULT skips finished'
  logged = _logged(tmp_path / 'skips')
  assert [r['step'] for r in logged] == list(range(1, 9)) and logged[POISONED_STEP - 1]['finite'] == 0.0
  assert all(r['finite'] == 1.0 for r in logged if r['step'] != POISONED_STEP)
  assert f'step {POISONED_STEP}: non-finite' in proc.stderr and 'update skipped' in proc.stderr
  assert '8' in os.listdir(tmp_path / 'skips' / 'checkpoints')

  # The run recorded itself: its config (the same when loaded back) and the training set's classes.
  saved = run_record.load_config(str(tmp_path / 'skips'))
  assert saved.train.skip_nonfinite_steps == 1 and saved.model.num_classes == 5
  run = run_record.load_run(str(tmp_path / 'skips'))
  assert run['classes']['names'] == ['circle', 'square', 'triangle', 'cross', 'ring']
  assert run['classes']['category_ids'] == [3, 7, 11, 15, 19] and run['starts'][0]['step'] == 0

  # Without the key the run stops at that step, naming it and the term, and writes no checkpoint after it.
  assert results[1].startswith(f'RESULT stops stopped: non-finite training values at step {POISONED_STEP}: ')
  assert 'loss' in results[1] and 'last good checkpoint' in results[1]
  assert sorted(os.listdir(tmp_path / 'stops' / 'checkpoints')) == ['2']


PREEMPTED_SCRIPT = (
  PREAMBLE
  + """
workdir = arg


class SignalledAtStep4:
  def __init__(self, *args, **kwargs):
    self._it = real(*args, **kwargs)
    self.fetched = 0

  def __next__(self):
    self.fetched += 1
    if self._it.step == 3 and self.fetched == 4:  # the first run only: it fetches step 4's batch as its fourth
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._it)

  def state(self):
    return self._it.state()


loop.data_lib.make_train_iterator = SignalledAtStep4
for run in (1, 2):
  config = module.get_config(f'steps=8,batch=4,train_images=40,eval_images=8,cache={cache}')
  config.eval.at_end, config.eval.every_steps = False, 4
  loop.train_and_evaluate(config, workdir)
  newest = max(int(name) for name in os.listdir(f'{workdir}/checkpoints') if name.isdigit())
  evals = sorted(os.listdir(f'{workdir}/eval')) if os.path.isdir(f'{workdir}/eval') else []
  print(f'RESULT run {run} newest checkpoint {newest} evaluations {evals}', flush=True)
"""
)


def test_an_evaluation_step_stopped_before_its_evaluation_is_evaluated_on_resume(tmp_path):
  """A preemption at step 4, where eval.every_steps=4 is due: the checkpoint of step 4 is saved and the run stops
  before evaluating; the resumed run evaluates step 4 first, then trains on."""
  script = tmp_path / 'preempted.py'
  script.write_text(PREEMPTED_SCRIPT)
  env = xla_env.cpu_env(1, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  proc = subprocess.run(
    [sys.executable, str(script), str(ROOT), str(tmp_path / 'shapes'), str(tmp_path / 'run')],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  assert results[0] == 'RESULT run 1 newest checkpoint 4 evaluations []', results
  assert results[1] == "RESULT run 2 newest checkpoint 8 evaluations ['step_4']", results
  assert 'step 4: the evaluation of this step was not written before the run stopped' in proc.stderr
  assert os.path.exists(tmp_path / 'run' / 'eval' / 'step_4' / 'metrics.json')
