"""Float32 noise between training runs that differ only in reduction order, and the comparisons that tell that
noise from a real multi-host bug. Used by tests/launch/test_multihost_training.py and tests/train/test_step.py.

Two processes sum gradients over gloo, one process sums them in-process, and CPUs with other vector units (AVX2,
AVX-512) order the same sums differently: the results differ in the last bits. The first step's numbers are then
equal to about 1e-7. Later steps amplify the difference through two features of detection training itself:
  * a refined anchor whose IoU lies within rounding of a threshold (0.6 / 0.5) flips its label, which moves
    cls_loss_1 by about 1/N_pos (8e-3 measured) and num_pos_1 by one anchor;
  * GroupNorm over a near-constant feature map (the zero padding, plain backgrounds) divides rounding noise by
    sqrt(eps): the gradients of those few scales and biases are mostly noise, so the momentum trace of the latest
    gradient wanders while the parameters (lr-weighted sums of many steps) do not.
So the tests compare metrics with tolerances that allow label flips, parameters by their UPDATES since the common
start (parameters themselves move by ~1e-3 of their size in a few steps, which would hide an O(1) gradient error),
and whole collections by one relative L2 norm, so that a few ill-conditioned entries (9% elementwise noise on a
1e-7 entry) cannot decide the verdict while any real bug moves all of them.

Measured with `python tests/float_noise.py --steps=6` (the multi-host tests' tiny model and data on fake CPU
devices; 2-core AMD EPYC, jax 0.10.2, 2026-11-25), first at XLA's default optimization level with FPN P3-P7, before
the tests moved to tests/xla_env.py's settings. Largest relative error against the 1-device run:

  variant                    steps 1-3  step 4     step 5     step 6     state, step 2      state, step 4
  4 devices (other order)    <= 3e-7    gn 3.7e-4  cls1 8e-3  gn 7.9e-2  opt 1e-6 par 3e-6  opt 2.1e-3 par 7.5e-4
  8 devices, 4 reversed      <= 3e-7    <= 3e-7    1.2e-6     1.1e-6     (4 reversed = 4 devices, bit for bit)
  1 ulp on every parameter   <= 3e-7    4e-7       5e-7       2.8e-6     opt 2e-6           opt 2e-6
  lost batch shard (bug)     step 1: num_pos_0 2e-2, gn 9e-3, loss 1e-3  opt 0.58 par 0.54  opt 0.70 par 0.56
  per-device norm. (bug)     step 1: loss 3.0 (x4; the gradient is clipped)  opt 0.62 par 0.56  opt 1.3  par 0.86

(gn = grad_norm, cls1 = cls_loss_1, opt = optimizer state, par = parameter updates.) On an Intel Xeon the 2x2 vs
1x4 runs differed by 1.2e-4 in grad_norm at step 4, inside what the 4-device variant shows here.
Again at the tests' settings (tests/xla_env.py: optimization level 0; tiny_shapes with FPN P3-P5), 19:56 UTC:

  variant                    steps 1-3  step 4     step 5     step 6     state, step 2      state, step 4
  4 devices (= 4 reversed)   <= 2.6e-7  8.7e-7     gn 4.9e-3  cls1 1.8e-2 opt 1e-6 par 3e-6  opt 2.9e-4 par 1.0e-4
  8 devices                  <= 3.1e-7  7.9e-7     gn 4.9e-3  cls1 1.8e-2 opt 2e-5 par 1e-5  opt 2.9e-4 par 1.0e-4
  1 ulp on every parameter   <= 4.6e-7  2.1e-7     gn 4.9e-3  cls1 1.8e-2 opt 2e-6           opt 2.9e-4 par 1.0e-4
  lost batch shard (bug)     step 1: num_pos_0 2e-2, gn 9e-3, loss 1e-3  opt 0.58 par 0.53  opt 0.75 par 0.60
  per-device norm. (bug)     step 1: loss 3.0                            opt 0.62 par 0.56  opt 1.3  par 0.87

Every perturbed run agrees with every other from step 4 on: the 1-device reference alone sits on the other side of
one refined-label flip there. The comparisons stop at step 4 (metrics, parameters) and step 2 (optimizer state).
The tolerances below sit well above the noise and well below the bugs (margins from the first table):

  metric / state                            tolerance   noise margin                  bug margin
  num_pos_0, learning_rate                  exact       a function of the data/step   -
  loss and every cls/box term, num_pos_s>0  3e-2        ~4x a label flip (8e-3)       100x (normalizer)
  grad_norm                                 1e-2        27x (3.7e-4 at step 4)        300x (normalizer)
  parameter updates (any step <= 4)         2e-2        27x (7.5e-4)                  22x (lost shard)
  optimizer state (step 2 only)             2e-2        >1000x (2e-6)                 29x (lost shard)
A lost shard (a quarter of the batch) barely moves the loss, but it changes num_pos_0, which must match exactly,
and every parameter.
The optimizer state is compared after two steps only: from step 5 on its trace of the latest gradient follows the
GroupNorm noise above (6e-2 at step 5 in the 4-device run), which no tolerance could separate from a bug.

Again on 2026-12-02 (same box and settings), after model.conv_lowering='auto' made every 1x1 convolution on CPU a
matrix product; xla_convs is the same run with XLA convolutions, i.e. the summation order of the code before:

  variant                    steps 1-3  step 4     step 5     step 6     state, step 2      state, step 4
  xla_convs                  <= 3.4e-7  1.0e-6     1.1e-6     gn 1.2e-4  opt 1e-6 par 3e-6  opt 2e-6   par 2e-6
  4 devices (= 4 reversed)   <= 4.6e-7  gn 1.1e-5  gn 5.9e-4  gn 1.0e-2  opt 1e-6 par 3e-6  opt 3.4e-5 par 1.2e-5
  8 devices                  <= 4.6e-7  3.2e-7     1.7e-7     gn 1.2e-4  opt 1e-6 par 3e-6  opt 2e-6   par 2e-6
  1 ulp on every parameter   <= 3.4e-7  gn 1.2e-5  gn 6.7e-3  gn 2.2e-2 opt 2e-6           opt 1.2e-3 par 4.4e-4
  lost batch shard (bug)     step 1: num_pos_0 2e-2, gn 9e-3, loss 1e-3  opt 0.58 par 0.53  opt 0.67 par 0.57
  per-device norm. (bug)     step 1: loss 3.0                            opt 0.62 par 0.56  opt 1.3  par 0.87

The same tolerances hold with the same margins (grad_norm at step 4: 800x; parameter updates: 45x the ulp run).

Again on 2026-12-02, 07:53 UTC, after the focal loss got its hand-written gradient (core/losses.py); focal_autodiff is
the same run with autodiff's gradient, i.e. the code before (`--variants=focal_autodiff,xla_convs`):

  variant                    steps 1-3  step 4     step 5     step 6     state, step 2      state, step 4
  focal_autodiff             <= 3.4e-7  6.3e-7     6.7e-7     gn 1.2e-4  opt 1e-6 par 3e-6  opt 1e-6   par 2e-6
  xla_convs                  <= 4.6e-7  gn 2.5e-5  gn 4.0e-3  gn 2.5e-2  opt 1e-6 par 3e-6  opt 1.2e-4 par 4.4e-5

The two gradients differ by float rounding only, less than the two convolution lowerings do.

  python tests/float_noise.py [--steps=6] [--json=OUT.json]

runs these variants: reference (1 device); 4dev and 8dev (the same batches over 4 and 8 devices); 4dev_rev (4 devices
in reverse order); xla_convs (1 device, every convolution an XLA convolution; the reference lowers 1x1 convolutions to
matrix products, as model.conv_lowering='auto' does on CPU); focal_autodiff (1 device, the focal loss's gradient by
autodiff, losses.classification_losses_autodiff, instead of the hand-written one training uses); ulp (1 device, every
float32 parameter moved by about one ulp before step 1); lost_shard (a bug: on 4 devices, the last device's quarter
of every global batch lost and replaced by the first device's); wrong_norm (a bug: the loss divided by one device's
positives instead of the global count, i.e. x4 on 4 devices). It prints, per step, the
largest relative errors of the metrics and of each state collection.
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Tolerances, from the measurements in the module docstring.
METRIC_RTOL = 3e-2  # loss, cls_loss_<s>, box_loss_<s>, num_pos_<s> for s > 0
GRAD_NORM_RTOL = 1e-2
EXACT_METRICS = ('num_pos_0', 'learning_rate')
STATE_RTOL = 2e-2  # parameter updates (any step up to 4) and optimizer state (step 2)


def relative_error(got: float, want: float, floor: float = 1e-12) -> float:
  """|got - want| / max(|want|, floor): the error of one scalar metric relative to its size."""
  return abs(float(got) - float(want)) / max(abs(float(want)), floor)


def metric_mismatches(got: list[dict], want: list[dict]) -> list[str]:
  """What differs beyond noise between two runs' logged metrics (one dict per step, same steps): [] if nothing."""
  problems = []
  if len(got) != len(want):
    return [f'{len(got)} logged steps vs {len(want)}']
  for step, (g, w) in enumerate(zip(got, want), start=1):
    for key in sorted(w):
      if key in ('finite', 'step', 'images_per_s', 'seconds_per_step'):
        continue
      if key not in g:
        problems.append(f'step {step}: {key} missing')
        continue
      rtol = 0.0 if key in EXACT_METRICS else GRAD_NORM_RTOL if key == 'grad_norm' else METRIC_RTOL
      error = relative_error(g[key], w[key])
      if error > rtol:
        problems.append(f'step {step} {key}: {g[key]:.7g} vs {w[key]:.7g} (relative error {error:.1e} > {rtol:g})')
  return problems


def tree_errors(got: dict, want: dict, base: dict | None = None) -> dict[str, float]:
  """Relative L2 errors ||got - want|| / ||want|| of two flattened states ({path: array}), per collection.

  Returns {'params': e, 'opt_state': e, ...} (keyed by the first component of each path), each over all float
  leaves of the collection together. With `base` (the state both runs started from), parameters are compared by
  their updates (got - base, want - base); other collections as they are. Integer leaves (step, rng) must be
  equal: their error is 0 or inf.
  """
  if sorted(got) != sorted(want):
    raise AssertionError(f'different leaves: {sorted(set(got) ^ set(want))[:8]}')
  sq_diff, sq_norm = {}, {}
  for key, w in want.items():
    g = got[key]
    if g.shape != w.shape or g.dtype != w.dtype:
      raise AssertionError(f'{key}: {g.dtype}{list(g.shape)} vs {w.dtype}{list(w.shape)}')
    collection = key.lstrip('.').split('.')[0].split('[')[0]
    sq_diff.setdefault(collection, 0.0)
    sq_norm.setdefault(collection, 0.0)
    if w.dtype.kind != 'f':
      sq_diff[collection] += 0.0 if np.array_equal(g, w) else float('inf')
      continue
    g, w = g.astype(np.float64), w.astype(np.float64)
    if base is not None and collection == 'params':
      g, w = g - base[key], w - base[key]
    sq_diff[collection] += float(np.sum(np.square(g - w)))
    sq_norm[collection] += float(np.sum(np.square(w)))
  return {c: 0.0 if sq_diff[c] == 0.0 else float(np.sqrt(sq_diff[c] / max(sq_norm[c], 1e-60))) for c in sq_diff}


def state_mismatches(got: dict, want: dict, base: dict, collections=('params', 'opt_state')) -> list[str]:
  """What differs beyond noise between two flattened states that started from the flattened state `base`."""
  errors = tree_errors(got, want, base)
  return [f'{c}: relative error {errors[c]:.1e} > {STATE_RTOL:g}' for c in collections if errors[c] > STATE_RTOL] + [
    f'{c}: differs' for c in ('step', 'rng') if errors.get(c, 0.0) != 0.0
  ]


def lose_last_shard(batch: dict, num_devices: int) -> dict:
  """The bug of a lost batch shard: the last device's examples never arrive, the first device's are read twice."""
  per_device = len(batch['images']) // num_devices
  return {k: np.concatenate([v[:-per_device], v[:per_device]]) for k, v in batch.items()}


def scaled_loss(loss_call, factor: float):
  """`ConsistentLoss.__call__` with the bug of a per-device normalizer: each device divides by its own positives,
  about 1/factor of the global count, so the loss and every term come out `factor` times too large."""

  def broken(self, outputs, anchors, batch):
    total, metrics = loss_call(self, outputs, anchors, batch)
    scaled = {k: v * factor if k == 'loss' or k.startswith(('cls_loss', 'box_loss')) else v for k, v in metrics.items()}
    return total * factor, scaled

  return broken


def _config(base: pathlib.Path, steps: int):
  import importlib.util

  spec = importlib.util.spec_from_file_location('noise_cfg', ROOT / 'tests' / 'configs' / 'tiny_shapes.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f'steps={steps},batch=8,train_images=64,eval_images=8,cache={base}')


def flatten(tree) -> dict:
  """{keystr(path): numpy array} of every leaf (the form the comparisons take)."""
  import jax

  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def run_variants(steps: int, cache_dir: pathlib.Path, only=()) -> dict:
  """Trains every variant of the module docstring for `steps` steps; returns their metrics and final states."""
  import jax

  import conret_jax
  from conret_jax import consistent
  from conret_jax import mesh as mesh_lib
  from conret_jax.core import losses
  from conret_jax.data import pipeline
  from conret_jax.train import state as state_lib
  from conret_jax.train import step as step_lib

  config = _config(cache_dir, steps)
  batches = [b for _, b in zip(range(steps), pipeline.host_batches(config, train=True))]
  model = conret_jax.build_model(config)
  one = mesh_lib.make_mesh(config, jax.devices()[:1])
  init, _ = state_lib.init_state(model, config, one, jax.random.PRNGKey(config.train.seed))
  init = jax.device_get(init)

  def ulp(x):
    if x.dtype != np.float32:
      return x
    sign = np.sign(np.random.RandomState(x.size).standard_normal(x.shape)).astype(np.float32)
    return (x * (1 + sign * np.float32(2.0**-24))).astype(np.float32)

  real_loss = consistent.ConsistentLoss.__call__
  hand_focal = losses.classification_losses
  wrong_norm_loss = scaled_loss(real_loss, 4.0)

  # The reference runs the model as config.model.conv_lowering='auto' builds it on CPU (1x1 convs as products);
  # 'xla_convs' runs the same parameters with every conv an XLA convolution: another summation order.
  xla_config = config.copy_and_resolve_references()
  xla_config.model.conv_lowering = 'xla'
  xla_model = conret_jax.build_model(xla_config)
  variants = {  # name: (devices, starting state, what differs: a bug, the conv lowering or the focal gradient)
    'reference': (jax.devices()[:1], init, None),
    'xla_convs': (jax.devices()[:1], init, 'xla_convs'),
    'focal_autodiff': (jax.devices()[:1], init, 'focal_autodiff'),
    '4dev': (jax.devices()[:4], init, None),
    '8dev': (jax.devices()[:8], init, None),
    '4dev_rev': (jax.devices()[:4][::-1], init, None),
    'ulp': (jax.devices()[:1], init.replace(params=jax.tree.map(ulp, init.params)), None),
    'lost_shard': (jax.devices()[:4], init, 'lost_shard'),
    'wrong_norm': (jax.devices()[:4], init, 'wrong_norm'),
  }
  out = {}
  for name, (devices, start, change) in variants.items():
    if only and name not in only and name != 'reference':
      continue
    mesh = mesh_lib.make_mesh(config, devices)
    run_model = xla_model if change == 'xla_convs' else model
    shardings = state_lib.shardings_of(state_lib.abstract_state(run_model, config, mesh))
    consistent.ConsistentLoss.__call__ = wrong_norm_loss if change == 'wrong_norm' else real_loss
    if change == 'focal_autodiff':
      losses.classification_losses = losses.classification_losses_autodiff
    try:
      train_step = step_lib.make_train_step(run_model, config, mesh, shardings)
      state = jax.device_put(start, shardings)
      metrics, states = [], []
      for batch in batches:
        batch = dict(batch)
        if change == 'lost_shard':
          batch = lose_last_shard(batch, len(devices))
        state, m = train_step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        states.append(flatten(state))
    finally:
      consistent.ConsistentLoss.__call__ = real_loss
      losses.classification_losses = hand_focal
    out[name] = {'metrics': metrics, 'states': states, 'init': flatten(start)}
  return out


def _update(state: dict, start: dict) -> dict:
  """Parameters as their change since `start`; every other leaf as it is."""
  return {k: v - start[k] if k.startswith('.params') else v for k, v in state.items()}


def summarize(runs: dict) -> dict:
  """Per step and variant: the relative error against the reference of every logged metric and of each state
  collection (parameters by their updates from the run's own start)."""
  ref = runs['reference']
  summary = {}
  for name, run in runs.items():
    if name == 'reference':
      continue
    steps = []
    for got_m, want_m, got_s, want_s in zip(run['metrics'], ref['metrics'], run['states'], ref['states']):
      metrics = {k: relative_error(got_m[k], want_m[k]) for k in want_m if k not in ('finite', 'learning_rate')}
      # Each run's parameters as their update from its own start (the ulp run starts elsewhere).
      steps.append(
        {'metrics': metrics, 'state': tree_errors(_update(got_s, run['init']), _update(want_s, ref['init']))}
      )
    summary[name] = steps
  return summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--cache', default='/tmp/conret_float_noise_shapes')
  parser.add_argument('--json', default='')
  parser.add_argument('--variants', default='', help='comma-separated subset (default: all)')
  args = parser.parse_args(argv)
  import xla_env  # the tests' XLA settings (tests/xla_env.py): the noise the tolerances must cover

  os.environ.setdefault('XLA_FLAGS', xla_env.xla_flags(8))
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  summary = summarize(run_variants(args.steps, pathlib.Path(args.cache), [v for v in args.variants.split(',') if v]))
  for name, steps in summary.items():
    print(f'{name}:')
    for i, s in enumerate(steps):
      worst = max(s['metrics'], key=s['metrics'].get)
      state = ' '.join(f'{k}={v:.1e}' for k, v in sorted(s['state'].items()) if k not in ('step', 'rng'))
      print(
        f'  step {i + 1}: loss {s["metrics"]["loss"]:.1e}  grad_norm {s["metrics"]["grad_norm"]:.1e}  '
        f'worst metric {worst} {s["metrics"][worst]:.1e}  state: {state}'
      )
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1)


if __name__ == '__main__':
  sys.path.insert(0, str(ROOT))
  main()
