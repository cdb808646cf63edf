"""Multi-host training on fake CPU devices: 2 processes x 2 devices train like 1 process x 4 devices, and
checkpoints move between topologies (2x2 -> 1x4, 1x1; 1x4 -> 2x2), training included (2x2 -> 1x4).

The runs, shared by all tests of this module:
  A: a real `conret-train` job of 2 processes x 2 devices (launch/local_multiprocess.py), 4 steps
  B: conret-train's loop in the pytest process on 1 x 4 of its 8 fake devices, 4 steps (same global batch of 8)
  C: A's workdir continued in the pytest process on 1 x 4 to step 6 (B's compiled program, run again)
  D: a 2-process job that restores B's step 4 and C's step 6 on 2x2 and dumps them
The pytest process itself (8 fake devices, tests/conftest.py) also restores the checkpoints on 1 and 4 devices.

2x2 and 1x4 sum in different orders (gloo across processes, in-process within one), so they agree to float32
noise, not bit for bit; restoring one checkpoint on another topology IS exact. The noise, the tolerances and why they
still catch real bugs are in tests/float_noise.py; test_the_comparison_catches_real_bugs shows it does.
None of these runs evaluates at the end (multi-process evaluation has its own test in tests/test_evaluation.py).
"""

import importlib.util
import json
import logging as std_logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import float_noise
import jax
import numpy as np
import pytest
import xla_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / 'launch' / 'local_multiprocess.py'
HANG_GUARD_S = 900  # only so that a hung job fails the test instead of hanging it (the box may be shared)
STEPS, MORE_STEPS = 4, 6


# Restores checkpoints on the 2x2 job's mesh (replicated, and with the params sharded over an fsdp axis of 2) and
# writes every leaf of the state, gathered from both processes, to an .npz on process 0.
RESTORE_2X2 = """
import sys
from conret_jax import distributed
distributed.initialize()
import importlib.util
import jax
import numpy as np
from jax.experimental import multihost_utils
import conret_jax
from conret_jax.train import state as state_lib
from conret_jax import mesh as mesh_lib
from conret_jax.train import checkpoint

config_file, config_arg, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location('cfg', config_file)
cfg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cfg)
for name, workdir, step in (('b', sys.argv[4], int(sys.argv[5])), ('c', sys.argv[6], int(sys.argv[7]))):
  for fsdp in (1, 2):
    config = cfg.get_config(config_arg)
    config.train.fsdp_axis_size = fsdp
    mesh = mesh_lib.make_mesh(config)
    abstract = state_lib.abstract_state(conret_jax.build_model(config), config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, every_steps=0, keep=None, config=config, async_save=False)
    state, data = ckpt.restore(step, abstract)
    ckpt.close()
    sharded = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
    host = multihost_utils.process_allgather(state, tiled=True)
    if jax.process_index() == 0:
      leaves = jax.tree_util.tree_leaves_with_path(host)
      np.savez(f'{out_dir}/{name}_fsdp{fsdp}.npz', **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    print(f'restored {name} step {int(host.step)} data {data} on {jax.process_count()}x{jax.local_device_count()}'
          f' mesh {dict(mesh.shape)} sharded leaves {sharded}', flush=True)
"""


def _env(devices: int | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('CONRET_')}
  # XLA's defaults, as in this process (conret-train would add its own CPU flags: tests/xla_env.py's cpu_env).
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', CONRET_XLA_DEFAULTS='0')
  if devices is not None:
    env['XLA_FLAGS'] = xla_env.xla_flags(devices)
  return env


def _start(log: pathlib.Path, command: list, env: dict) -> tuple:
  out = open(log, 'w')  # closed in _stop/_finish
  proc = subprocess.Popen(
    command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=log.parent
  )
  return proc, out, log


def _stop(job) -> None:
  """Ends a job that is still running: SIGTERM (the launcher forwards it to its processes), then SIGKILL."""
  proc, out, _ = job
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  out.close()


def _finish(job) -> str:
  """Waits for a job; returns its output, or fails the test with the output's tail."""
  proc, _, log = job
  try:
    proc.wait(timeout=HANG_GUARD_S)
  except subprocess.TimeoutExpired:
    pass
  finally:  # also on KeyboardInterrupt: no job outlives the test
    _stop(job)
  text = log.read_text()
  assert proc.returncode == 0, f'{log.name} failed with {proc.returncode}:\n{text[-6000:]}'
  return text


def _train(config_spec, workdir, *extra) -> list:
  # Three checkpoints kept: A's step 2 must survive C's step 6 (the optimizer state is compared at step 2).
  return [
    sys.executable,
    '-m',
    'conret_jax.cli.train',
    f'--config={config_spec}',
    f'--workdir={workdir}',
    '--config.eval.at_end=false',
    '--config.checkpoint.keep=3',
    *extra,
  ]


def _multiprocess(*command) -> list:
  return [sys.executable, str(LAUNCHER), '--num_processes=2', '--devices_per_process=2', '--', *command]


def _load_config(config_file, arg):
  spec = importlib.util.spec_from_file_location('multihost_cfg', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _train_here(config, workdir) -> str:
  """conret-train's loop in this process, on a 1 x 4 mesh of its 8 fake devices; returns what it logged."""
  from absl import logging

  from conret_jax.train import loop

  config = config.copy_and_resolve_references()
  config.eval.at_end, config.checkpoint.keep = False, 3  # as _train's flags
  lines = []
  handler, verbosity = _ListHandler(lines), logging.get_verbosity()
  logging.get_absl_logger().addHandler(handler)
  logging.set_verbosity(logging.INFO)
  try:
    loop.train_and_evaluate(config, str(workdir), jax.devices()[:4])
  finally:
    logging.get_absl_logger().removeHandler(handler)
    logging.set_verbosity(verbosity)
  return '\n'.join(lines)


class _ListHandler(std_logging.Handler):
  def __init__(self, lines):
    super().__init__(std_logging.INFO)
    self.lines = lines

  def emit(self, record):
    self.lines.append(record.getMessage())


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs A, B, C, D (see the module docstring); returns their paths, logs and A's metrics before C."""
  base = tmp_path_factory.mktemp('multihost')
  config_file = ROOT / 'tests' / 'configs' / 'tiny_shapes.py'
  # Global batch 8 divides over 4 devices, 2 processes and 1 device.
  config_arg = f'steps={STEPS},batch=8,train_images=64,eval_images=8,cache={base / "shapes_cache"}'
  config_spec = f'{config_file}:{config_arg}'
  config = _load_config(config_file, config_arg)
  from conret_jax.data import shapes  # generated once here, not raced by the jobs below

  shapes.ensure_shapes_split(config.data.train)
  shapes.ensure_shapes_split(config.data.eval)
  a, b, dumps = base / 'a_2x2', base / 'b_1x4', base / 'dumps'
  dumps.mkdir()

  # A runs in two subprocesses while B trains here, in the pytest process, on 4 of its 8 devices. C continues A's
  # run here on the same 4 devices: B's compiled program, as is test_the_comparison_catches_real_bugs's.
  job_a = _start(base / 'a.log', _multiprocess(*_train(config_spec, a)), _env())
  try:
    logs = {'b': _train_here(config, b)}
    logs['a'] = _finish(job_a)
  finally:  # never leave A running when B failed
    _stop(job_a)
  metrics_a = _metrics(a)
  more = config.copy_and_resolve_references()
  more.train.num_steps = MORE_STEPS
  logs['c'] = _train_here(more, a)
  script = base / 'restore_2x2.py'
  script.write_text(textwrap.dedent(RESTORE_2X2))
  logs['d'] = _finish(
    _start(
      base / 'd.log',
      _multiprocess(
        sys.executable,
        str(script),
        str(config_file),
        config_arg,
        str(dumps),
        str(b),
        str(STEPS),
        str(a),
        str(MORE_STEPS),
      ),
      _env(),
    )
  )
  return {'config': config, 'a': a, 'b': b, 'dumps': dumps, 'logs': logs, 'metrics_a': metrics_a}


def _restore(config, workdir, step, devices, fsdp=1):
  """The full TrainState of workdir's checkpoint `step`, restored onto a mesh over `devices`, as numpy leaves."""
  import conret_jax
  from conret_jax import mesh as mesh_lib
  from conret_jax.train import checkpoint
  from conret_jax.train import state as state_lib

  config = config.copy_and_resolve_references()
  config.train.fsdp_axis_size = fsdp
  mesh = mesh_lib.make_mesh(config, devices)
  abstract = state_lib.abstract_state(conret_jax.build_model(config), config, mesh)
  ckpt = checkpoint.Checkpointer(str(workdir), every_steps=0, keep=None, config=config, async_save=False)
  try:
    state, data = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  leaves = jax.tree_util.tree_leaves_with_path(state)
  assert all(len(x.sharding.device_set) == len(devices) for _, x in leaves)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}, data


def _assert_same_tree(got: dict, want: dict):
  """Bit-for-bit equality of two flattened states (a restore is exact whatever the topology)."""
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(scope='module')
def initial_state(runs):
  """The state every run started from (same config and seed) on the host: (pytree, flattened)."""
  import conret_jax
  from conret_jax import mesh as mesh_lib
  from conret_jax.train import state as state_lib

  config = runs['config']
  mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
  state, _ = state_lib.init_state(conret_jax.build_model(config), config, mesh, jax.random.PRNGKey(config.train.seed))
  state = jax.device_get(state)
  return state, float_noise.flatten(state)


def test_two_by_two_logs_the_same_losses_as_one_by_four(runs):
  a, b = runs['metrics_a'], _metrics(runs['b'])
  # One record per step: only process 0 writes.
  assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, STEPS + 1))
  assert {
    'loss',
    'cls_loss_0',
    'cls_loss_1',
    'box_loss_0',
    'box_loss_1',
    'grad_norm',
    'num_pos_0',
    'num_pos_1',
    'learning_rate',
  } <= set(a[0])
  assert float_noise.metric_mismatches(a, b) == []
  assert len({round(r['loss'], 6) for r in a}) > 1  # the model really trained: the loss moves
  assert "mesh {'data': 4, 'fsdp': 1} over 4 devices (2 processes)" in runs['logs']['a']
  assert "mesh {'data': 4, 'fsdp': 1} over 4 devices (1 processes)" in runs['logs']['b']  # B ran here


def test_two_by_two_checkpoint_equals_one_by_four_and_restores_on_4_and_1_devices(runs, initial_state):
  _, start = initial_state
  devices = jax.devices()
  a4, data_a = _restore(runs['config'], runs['a'], STEPS, devices[:4])
  a1, _ = _restore(runs['config'], runs['a'], STEPS, devices[:1])
  a4_fsdp, _ = _restore(runs['config'], runs['a'], STEPS, devices[:4], fsdp=4)
  b1, data_b = _restore(runs['config'], runs['b'], STEPS, devices[:1])
  _assert_same_tree(a1, a4)  # a restore is exact whatever the target topology
  _assert_same_tree(a4_fsdp, a4)
  assert int(a1['.step']) == STEPS and data_a['step'] == data_b['step'] == STEPS
  # Training on 2x2 and on 1x4 gives the same state, to float32 noise: parameter updates after 4 steps, and the
  # whole state after 2 (tests/float_noise.py says why the optimizer state is compared early).
  assert float_noise.state_mismatches(a1, b1, start, collections=('params',)) == []
  a2, _ = _restore(runs['config'], runs['a'], 2, devices[:1])
  b2, _ = _restore(runs['config'], runs['b'], 2, devices[:1])
  assert float_noise.state_mismatches(a2, b2, start) == []


def test_the_comparison_catches_real_bugs(runs, initial_state):
  """The tolerances above are loose enough for float noise: are they still tight enough for real bugs? A broken
  variant of B's first two steps, run here on 4 devices (one device's share of each batch lost), and a wrong restore
  must fail the comparisons that A passes; the correct variant of the same run passes them. (A per-device loss
  normalizer, the third bug of tests/float_noise.py, fails them by far more: 3.0 in the loss.)"""
  import conret_jax
  from conret_jax import mesh as mesh_lib
  from conret_jax.data import pipeline
  from conret_jax.train import state as state_lib
  from conret_jax.train import step as step_lib

  config = runs['config']
  initial_tree, start = initial_state
  mesh = mesh_lib.make_mesh(config, jax.devices()[:4])
  model = conret_jax.build_model(config)
  shardings = state_lib.shardings_of(state_lib.abstract_state(model, config, mesh))
  batches = [b for _, b in zip(range(2), pipeline.host_batches(config, train=True))]
  want_metrics = _metrics(runs['b'])[:2]
  want_state, _ = _restore(config, runs['b'], 2, jax.devices()[:1])

  train_step = step_lib.make_train_step(model, config, mesh, shardings)  # one compile for both variants

  def run(lose_shard=False):
    state = jax.device_put(initial_tree, shardings)
    logged = []
    for batch in batches:
      if lose_shard:
        batch = float_noise.lose_last_shard(batch, 4)
      state, metrics = train_step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
      logged.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return logged, float_noise.flatten(state)

  good_metrics, good_state = run()
  assert float_noise.metric_mismatches(good_metrics, want_metrics) == []
  assert float_noise.state_mismatches(good_state, want_state, start) == []

  lost_metrics, lost_state = run(lose_shard=True)
  # Two of eight images replaced move the loss by only 1e-3 and grad_norm by 1e-2, but not the positive count.
  assert any(p.startswith('step 1 num_pos_0') for p in float_noise.metric_mismatches(lost_metrics, want_metrics))
  assert len(float_noise.state_mismatches(lost_state, want_state, start)) == 2  # params and optimizer state

  # A restore that returned another step (a stale or mislabelled checkpoint) is caught too.
  stale, _ = _restore(config, runs['a'], STEPS, jax.devices()[:1])
  assert float_noise.state_mismatches(stale, want_state, start)


def test_one_by_four_and_one_by_one_checkpoints_restore_on_two_by_two(runs):
  lines = runs['logs']['d'].splitlines()
  for name, step in (('b', STEPS), ('c', MORE_STEPS)):
    for mesh in ("{'data': 4, 'fsdp': 1}", "{'data': 2, 'fsdp': 2}"):
      for p in (0, 1):
        assert any(
          line.startswith(f'[p{p}] restored {name} step {step} ') and f'on 2x2 mesh {mesh}' in line for line in lines
        ), (name, mesh, p)
  # With fsdp=2 some leaves really are split across devices (the restore is not just a replicated copy).
  assert all('sharded leaves 0' not in line for line in lines if "'fsdp': 2" in line)
  devices = jax.devices()
  for name, workdir, step in (('b', runs['b'], STEPS), ('c', runs['a'], MORE_STEPS)):
    want, _ = _restore(runs['config'], workdir, step, devices[:1])
    for fsdp in (1, 2):
      with np.load(runs['dumps'] / f'{name}_fsdp{fsdp}.npz') as f:
        _assert_same_tree(dict(f), want)


def test_two_by_two_checkpoint_resumes_training_in_one_process(runs):
  log = runs['logs']['c']
  assert re.search(rf'resumed from \S+ at step {STEPS}\b', log)
  assert 'over 4 devices (1 processes)' in log
  metrics = _metrics(runs['a'])
  assert [r['step'] for r in metrics] == list(range(1, MORE_STEPS + 1))
  assert metrics[:STEPS] == runs['metrics_a']  # the resumed run appended, it did not retrain steps 1-4
  assert all(np.isfinite(r['loss']) for r in metrics[STEPS:])
  devices = jax.devices()
  before, _ = _restore(runs['config'], runs['a'], STEPS, devices[:1])
  after, data = _restore(runs['config'], runs['a'], MORE_STEPS, devices[:1])
  assert int(after['.step']) == MORE_STEPS and data['step'] == MORE_STEPS
  moved = [k for k in before if k.startswith('.params') and not np.array_equal(before[k], after[k])]
  assert moved  # the two extra steps updated the parameters
