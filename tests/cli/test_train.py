"""conret-train end to end on the synthetic dataset with a tiny model: train, checkpoint, SIGTERM mid-run, resume
to the same losses as an uninterrupted run, evaluate with conret-eval, and fail clearly on bad configs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('train_e2e')
  config = os.path.join(REPO, 'tests', 'configs', f'tiny_shapes.py:steps=8,batch=4,cache={root / "shapes"}')
  env = xla_env.cpu_env(
    1,
    # The test-wide compilation cache (tests/conftest.py): the runs here, tests/train/test_loop.py and
    # tests/cli/test_analyze.py compile the same one-device programs.
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    PYTHONUNBUFFERED='1',
  )
  return root, config, env


def _cmd(tool, config, workdir, *extra):
  return [sys.executable, '-m', f'conret_jax.cli.{tool}', f'--config={config}', f'--workdir={workdir}', *extra]


def _eval_cmd(workdir, *extra):
  """conret-eval of a workdir alone: the config it reads is the one the run saved."""
  return [sys.executable, '-m', 'conret_jax.cli.eval', f'--workdir={workdir}', *extra]


def _run(cmd, env, timeout=600):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


@pytest.fixture(scope='module')
def uninterrupted(setup):
  root, config, env = setup
  workdir = str(root / 'straight')
  proc = _run(_cmd('train', config, workdir), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_uninterrupted_run_writes_everything(uninterrupted):
  workdir, proc = uninterrupted
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int)[-1] == '8'
  metrics = json.load(open(os.path.join(workdir, 'eval', 'step_8', 'metrics.json')))
  for key in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AP60', 'AP70', 'AP80', 'AP90', 'AR1', 'AR10', 'AR100'):
    assert key in metrics
  detections = json.load(open(os.path.join(workdir, 'eval', 'step_8', 'detections.json')))
  assert len(detections) > 0 and {'image_id', 'category_id', 'bbox', 'score'} <= set(detections[0])
  assert metrics['AP'] >= 0.0  # scored: COCO reports -1 when there is nothing to score
  assert os.path.exists(os.path.join(workdir, 'eval', 'step_8', 'detections.png'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert 'step 8/8' in proc.stderr  # the console progress line


def test_sigterm_then_resume_gives_the_same_losses(setup, uninterrupted):
  root, config, env = setup
  workdir = str(root / 'interrupted')
  proc = subprocess.Popen(
    _cmd('train', config, workdir, '--config.eval.at_end=false'),
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_path) and len(open(metrics_path).read().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, 'the run ended before it could be interrupted'
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'rerun the same command to resume' in out
  stopped_at = max(_losses(workdir))
  assert 3 <= stopped_at < 8
  assert str(stopped_at) in os.listdir(os.path.join(workdir, 'checkpoints'))

  resumed = _run(_cmd('train', config, workdir, '--config.eval.at_end=false'), env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from' in resumed.stderr and f'at step {stopped_at}' in resumed.stderr
  want = _losses(uninterrupted[0])
  got = _losses(workdir)
  assert sorted(got) == sorted(want)
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_conret_eval_of_the_workdir_alone_matches_the_trainers_evaluation(setup, uninterrupted):
  """Without --config, conret-eval takes the run's saved config.json; both tools print the same table."""
  _, _, env = setup
  workdir, train_proc = uninterrupted
  trained = json.load(open(os.path.join(workdir, 'eval', 'step_8', 'metrics.json')))
  os.remove(os.path.join(workdir, 'eval', 'step_8', 'metrics.json'))
  proc = _run(_eval_cmd(workdir), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.load(open(os.path.join(workdir, 'eval', 'step_8', 'metrics.json')))
  per_class = again.pop('per_class')
  assert per_class.keys() == trained['per_class'].keys()
  for name, values in trained.pop('per_class').items():
    assert per_class[name] == pytest.approx(values), name
  assert again == pytest.approx(trained)
  for out in (proc.stdout, train_proc.stdout):  # AP in percent, then one row per class
    assert f'{workdir}, step 8 (AP in percent)' in out and '\nring ' in out, out
  # The run recorded its command line and its classes.
  run = json.load(open(os.path.join(workdir, 'run.json')))
  assert run['starts'][0]['argv'][1].startswith('--config=') and run['classes']['names'][0] == 'circle'


@pytest.mark.parametrize(
  'flag,message',
  [
    ('--config.train.global_batch_sise=4', 'global_batch_sise'),
    ('--config.data.image_size=200', 'config.data.image_size=200'),
    ('--config.consistent.num_cls_terms=4', 'num_cls_terms'),
  ],
)
def test_bad_config_fails_before_compilation(setup, tmp_path, flag, message):
  _, config, env = setup
  proc = _run(_cmd('train', config, str(tmp_path / 'bad'), flag), env, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not os.path.exists(tmp_path / 'bad' / 'checkpoints')


def test_checkpoint_of_a_different_model_fails_clearly(setup, uninterrupted):
  _, config, env = setup
  proc = _run(_cmd('train', config, uninterrupted[0], '--config.model.fpn.channels=32'), env, timeout=300)
  assert proc.returncode != 0
  assert 'different model' in proc.stderr


def _copy_run(source, target):
  import shutil

  shutil.copytree(source, target)
  return str(target)


def test_damaged_newest_checkpoint_resumes_from_an_older_one(setup, uninterrupted, tmp_path):
  """The newest checkpoint's state files are damaged after the run (a failing disk, a partial copy): the rerun names
  it in one line, keeps it (moved to <step>.damaged), resumes from the older one, and retrains to the losses of the
  uninterrupted run."""
  _, config, env = setup
  workdir = _copy_run(uninterrupted[0], tmp_path / 'damaged')
  os.remove(os.path.join(workdir, 'checkpoints', '8', '_CHECKPOINT_METADATA'))
  state_dir = os.path.join(workdir, 'checkpoints', '8', 'state')
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:  # every state file cut to half its bytes
        f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
  with open(os.path.join(workdir, 'checkpoints', '8', 'meta', 'metadata'), 'w') as f:
    f.write('{"config": ')  # and the fingerprint's json cut short
  proc = _run(_cmd('train', config, workdir, '--config.eval.at_end=false'), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'checkpoint 8 in' in proc.stderr and 'is damaged' in proc.stderr and 'resumed from' in proc.stderr
  assert 'at step 6' in proc.stderr
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '8.damaged'))  # kept, never deleted
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '8'))  # written again
  want, got = _losses(uninterrupted[0]), _losses(workdir)
  for step in (7, 8):
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
  # conret-eval asked for a damaged step says so in one line.
  damaged = _copy_run(workdir, tmp_path / 'damaged_eval')
  os.rename(os.path.join(damaged, 'checkpoints', '8.damaged'), os.path.join(damaged, 'checkpoints', '4'))
  proc = _run(_eval_cmd(damaged, '--step=4'), env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('conret-eval: error: checkpoint 4 in') and 'damaged' in lines[-1], lines[-1]
  assert 'Traceback' not in proc.stderr


def test_resume_with_changed_training_settings(setup, uninterrupted, tmp_path):
  """Resuming with another learning rate or a longer schedule is refused in one line naming each change (and, for
  the schedule, where it moves); --accept_config_changes goes on and records them in run.json; an inference-only
  key stays free."""
  _, config, env = setup
  workdir = _copy_run(uninterrupted[0], tmp_path / 'changed')
  run = lambda *extra: _run(_cmd('train', config, workdir, '--config.eval.at_end=false', *extra), env)
  refused = run('--config.train.learning_rate=0.5')
  assert refused.returncode == 2 and 'Traceback' not in refused.stderr
  line = refused.stderr.strip().splitlines()[-1]
  assert 'train.learning_rate: 0.02 -> 0.5' in line and '--accept_config_changes' in line, line
  longer = run('--config.train.num_steps=12')
  line = longer.stderr.strip().splitlines()[-1]
  assert longer.returncode == 2 and 'train.num_steps: 8 -> 12' in line and 'decays at' in line, line
  assert 'learning rate at step 8 goes from' in line and '--config.train.decay_steps=' in line
  free = run('--config.consistent.inference_reg_steps=1')
  assert free.returncode == 0, free.stderr[-3000:]  # nothing left to train, nothing refused
  accepted = run('--config.train.num_steps=10', '--accept_config_changes')
  assert accepted.returncode == 0, accepted.stderr[-3000:]
  assert sorted(_losses(workdir))[-1] == 10
  starts = json.load(open(os.path.join(workdir, 'run.json')))['starts']
  assert starts[-1]['config_changes'] == {'train.num_steps': [8, 10]}
  assert 'config_changes' not in starts[-2]


def test_an_evaluation_with_other_settings_never_overwrites_the_runs_record(setup, uninterrupted, tmp_path):
  """conret-eval with an override (Table 3's "2*" here) writes next to the run's evaluation, under a name that says
  what differs; a negative image count is a config error."""
  _, _, env = setup
  workdir = _copy_run(uninterrupted[0], tmp_path / 'override')
  record = os.path.join(workdir, 'eval', 'step_8', 'metrics.json')
  before = open(record).read()
  proc = _run(_eval_cmd(workdir, '--config.consistent.inference_reg_steps=1'), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert open(record).read() == before
  out = os.path.join(workdir, 'eval', 'step_8+consistent.inference_reg_steps=1')
  assert sorted(os.listdir(out)) == ['detections.json', 'detections.png', 'metrics.json', 'settings.json']
  assert json.load(open(os.path.join(out, 'settings.json')))['overrides'] == ['consistent.inference_reg_steps=1']
  assert 'step 8+consistent.inference_reg_steps=1 (AP in percent)' in proc.stdout
  negative = _run(_eval_cmd(workdir, '--config.eval.num_images=-1'), env, timeout=300)
  assert negative.returncode == 2 and 'config.eval.num_images=-1 must be >= 0' in negative.stderr
  assert open(record).read() == before
