"""A stop signal that reaches one process of a multi-process job: every process stops at the same step boundary,
with one checkpoint of that step, instead of the signalled one leaving the others waiting in the next step's
collectives (conret_jax/train/loop.py, `_StopAgreement`); the resumed job runs the evaluation the stop cut off.
2 processes x 2 fake CPU devices (launch/local_multiprocess.py).
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

from conret_jax.data import shapes

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / 'launch' / 'local_multiprocess.py'
HANG_GUARD_S = 600  # a hang (the bug) fails the test instead of hanging it

# Process 1 alone gets SIGTERM while it fetches the batch of step 3 (its host preempted, the other not).
CHILD = """
import importlib.util, os, signal, sys
from conret_jax import distributed
distributed.initialize()
import jax
from absl import logging
from conret_jax.train import loop

logging.set_verbosity(logging.INFO)
spec = importlib.util.spec_from_file_location('cfg', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config(sys.argv[2])
config.eval.at_end, config.eval.every_steps = False, 4
make_iterator = loop.data_lib.make_train_iterator
fetched = [0]


class OneHostSignalled:
  def __init__(self, *args, **kwargs):
    self.it = make_iterator(*args, **kwargs)

  def __next__(self):
    fetched[0] += 1
    if jax.process_index() == 1 and fetched[0] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)

  def state(self):
    return self.it.state()


loop.data_lib.make_train_iterator = OneHostSignalled
for run in (1, 2):  # the second resumes: it evaluates the step the stop cut off, then trains to the end
  loop.train_and_evaluate(config, sys.argv[3])
  print(f'process {jax.process_index()} returned from run {run}', flush=True)
"""


def test_a_signal_to_one_process_stops_all_at_one_step(tmp_path):
  config_file = ROOT / 'tests' / 'configs' / 'tiny_shapes.py'
  config_arg = f'steps=8,batch=8,train_images=64,eval_images=8,cache={tmp_path / "cache"}'
  spec = importlib.util.spec_from_file_location('stop_cfg', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  shapes.ensure_shapes_split(module.get_config(config_arg).data.train)  # generated once, not raced by the two
  child = tmp_path / 'child.py'
  child.write_text(CHILD)
  workdir = tmp_path / 'run'
  env = {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3', 'CONRET_XLA_DEFAULTS': '0'}
  command = [sys.executable, str(LAUNCHER), '--num_processes=2', '--devices_per_process=2', '--']
  command += [sys.executable, str(child), str(config_file), config_arg, str(workdir)]
  proc = subprocess.run(
    command,
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
    env={**{k: v for k, v in os.environ.items() if not k.startswith('CONRET_')}, **env},
    cwd=tmp_path,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  stopped = {int(p): int(s) for p, s in re.findall(r'\[p(\d)\].*stopped at step (\d+)', out)}
  assert sorted(stopped) == [0, 1], out[-6000:]
  assert stopped[0] == stopped[1] == 4, stopped  # the same boundary: one step after the signal's (step 3)
  assert out.count('returned from run 1') == 2 and out.count('returned from run 2') == 2
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 8, steps  # (step 4's checkpoint may be rotated out by then)
  # Step 4 was due an evaluation that the stop cut off: the resumed job ran it, on both processes.
  assert (workdir / 'eval' / 'step_4' / 'metrics.json').exists()
  assert 'step 4: the evaluation of this step was not written before the run stopped' in out
