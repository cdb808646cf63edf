"""RetinaNet vs ConRetinaNet train step, side by side: what the consistent loss adds to the step time.

  python bench/step_compare.py --config=configs/conretinanet_coco.py --config.data.resize=square \
      --config.data.image_size=512 --config.train.global_batch_size=2 --config.eval.global_batch_size=2 \
      [--pairs=3] [--steps=5] [--loss_repeats=10] [--json_out=FILE]

The config (same flags as `conret-bench step`) is ConRetinaNet as given; the baseline is the same config with
consistent.enabled=False. Both steps are compiled once in this process and then timed in blocks of --steps steps,
alternating the variants (A B, B A, A B, ...), so a drift in the load of a shared machine falls on both alike. Per
step it records wall time and the process's CPU time (all threads; less sensitive to other jobs than wall time).
The overhead is the ConRetinaNet/RetinaNet ratio of the medians within each pair, summarized over the pairs.

It also times the loss alone under jit: the targets of every stage (`Stages.targets`: matching of the
regular and refined anchors), `ConsistentLoss` forward, and forward+backward to the head outputs (what the step
adds on top of the network), with RetinaNet's (1, 1) terms and the config's terms, on the step's anchors and
random head outputs: that isolates the extra matching of the refined anchors and the extra loss terms, and it is
short enough to repeat many times. Prints a Markdown table and, last, one JSON line.
"""

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported (bench imports it)

import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from conret_jax import consistent, stages
from conret_jax.model import anchor_spec as anchor_ops
from conret_jax.train import bench

config_flags.DEFINE_config_file(
  'config', None, 'ConRetinaNet config; the baseline disables consistent.', lock_config=True
)
_PAIRS = flags.DEFINE_integer('pairs', 3, 'Alternating (RetinaNet, ConRetinaNet) block pairs.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per block.')
_LOSS_REPEATS = flags.DEFINE_integer('loss_repeats', 10, 'Timed calls of each loss function (0: skip).')
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Also write the JSON result to this file.')


def _variants(config):
  base = config.copy_and_resolve_references()
  base.consistent.enabled = False
  return {'retinanet': base, 'conretinanet': config}


def _timed_calls(fn, args, repeats):
  """(wall s, cpu s) of each of `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return wall, cpu


def loss_only(configs: dict, image_hw, repeats: int) -> dict:
  """Times the jitted ConsistentLoss (forward, and value_and_grad w.r.t. the outputs) per variant, alternating."""
  rng = np.random.default_rng(1)
  any_config = next(iter(configs.values()))
  anchors = anchor_ops.AnchorSpec.from_config(any_config.model).anchors(tuple(image_hw))
  a, k = anchors.shape[0], any_config.model.num_classes
  batch = {
    key: jnp.asarray(v) for key, v in bench.synthetic_batch(any_config, image_hw, rng).items() if key != 'images'
  }
  b = batch['boxes'].shape[0]
  funcs, args = {}, {}
  for name, config in configs.items():
    n_reg = stages.num_terms(config)[1]
    n_logits = 1 if config.model.head.variant == 'consistent' else n_reg  # one classifier per stage otherwise
    outputs = {  # logits near the prior (p ~ 0.01); small offsets so refined anchors stay near their objects
      'cls_logits': tuple(jnp.asarray(rng.normal(-4.6, 1.0, (b, a, k)), jnp.float32) for _ in range(n_logits)),
      'box_deltas': tuple(jnp.asarray(rng.normal(0.0, 0.1, (b, a, 4)), jnp.float32) for _ in range(n_reg)),
    }
    loss = consistent.ConsistentLoss.from_config(config)
    fwd = jax.jit(lambda o, loss=loss: loss(o, anchors, batch)[0])
    grad = jax.jit(jax.value_and_grad(lambda o, loss=loss: loss(o, anchors, batch)[0]))
    tgt = jax.jit(lambda o, loss=loss: loss.stages.targets(anchors, o['box_deltas'], batch))
    funcs[name] = {'targets': tgt, 'forward': fwd, 'forward_backward': grad}
    args[name] = (outputs,)
  times = {name: {kind: ([], []) for kind in funcs[name]} for name in configs}
  names = list(configs)
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      for kind, fn in funcs[name].items():
        wall, cpu = _timed_calls(fn, args[name], 1)
        times[name][kind][0].extend(wall)
        times[name][kind][1].extend(cpu)
  result = {'anchors': a, 'num_classes': k, 'batch': b}
  for name in names:
    n_cls, n_reg = stages.num_terms(configs[name])
    result[name] = {'terms': [n_cls, n_reg]}
    for kind, (wall, cpu) in times[name].items():
      result[name][kind] = {
        'wall_s': statistics.median(wall),
        'cpu_s': statistics.median(cpu),
        'wall_min_s': min(wall),
        'wall_max_s': max(wall),
      }
  return result


def step_pairs(configs: dict, pairs: int, steps: int) -> dict:
  """Compiles both steps, then times alternating blocks. Returns per-variant and per-pair numbers."""
  runners = {name: bench.StepRunner(config) for name, config in configs.items()}
  names = list(configs)
  blocks = []
  for p in range(pairs):
    pair = {}
    for name in names if p % 2 == 0 else names[::-1]:
      load = os.getloadavg()[0]
      wall, cpu = runners[name].run(steps)
      pair[name] = {'wall_s': wall, 'cpu_s': cpu, 'load1': load}
      print(
        f'pair {p} {name:13s} load {load:5.1f}  wall median {statistics.median(wall):7.3f} s  '
        f'cpu median {statistics.median(cpu):7.3f} s',
        flush=True,
      )
    blocks.append(pair)
  result = {'variants': {}, 'pairs': []}
  for name, runner in runners.items():
    wall = [t for pair in blocks for t in pair[name]['wall_s']]
    cpu = [t for pair in blocks for t in pair[name]['cpu_s']]
    result['variants'][name] = {
      'terms': list(stages.num_terms(runner.config)),
      'wall_median_s': statistics.median(wall),
      'wall_min_s': min(wall),
      'wall_max_s': max(wall),
      'cpu_median_s': statistics.median(cpu),
      'cpu_min_s': min(cpu),
      'cpu_max_s': max(cpu),
      'compile_time_s': runner.compile_time_s,
      'step_gflops': runner.flops / 1e9,
      'xla_temp_mb': runner.xla_temp_mb,
      'loss': float(runner.metrics['loss']),
    }
  base, con = names
  for pair in blocks:
    ratio = lambda key, pair=pair: statistics.median(pair[con][key]) / statistics.median(pair[base][key])
    result['pairs'].append(
      {'wall_ratio': ratio('wall_s'), 'cpu_ratio': ratio('cpu_s'), 'load1': [pair[base]['load1'], pair[con]['load1']]}
    )
  for key in ('wall_ratio', 'cpu_ratio'):
    values = [p[key] for p in result['pairs']]
    result[key] = {'median': statistics.median(values), 'min': min(values), 'max': max(values)}
  result['flops_ratio'] = runners[con].flops / runners[base].flops if runners[base].flops else None
  result['image_hw'] = list(runners[base].image_hw)
  return result


def _table(steps: dict, loss: dict | None) -> str:
  lines = [
    '| variant | terms | wall median s (min-max) | CPU median s (min-max) | GFLOPs/step | compile s |',
    '|---|---|---|---|---|---|',
  ]
  for name, v in steps['variants'].items():
    lines.append(
      f'| {name} | {tuple(v["terms"])} | {v["wall_median_s"]:.3f} ({v["wall_min_s"]:.3f}-'
      f'{v["wall_max_s"]:.3f}) | {v["cpu_median_s"]:.3f} ({v["cpu_min_s"]:.3f}-{v["cpu_max_s"]:.3f}) | '
      f'{v["step_gflops"]:.1f} | {v["compile_time_s"]:.0f} |'
    )
  w, c = steps['wall_ratio'], steps['cpu_ratio']
  lines.append(
    f'\nConRetinaNet / RetinaNet, per pair: wall {w["median"]:.3f} (min {w["min"]:.3f}, max '
    f'{w["max"]:.3f}); CPU {c["median"]:.3f} ({c["min"]:.3f}-{c["max"]:.3f}); '
    f'FLOPs {steps["flops_ratio"]:.4f}'
  )
  if loss:
    lines += [
      '',
      '| loss alone (jit), wall / CPU ms | terms | targets (matching) | loss forward | forward+backward |',
      '|---|---|---|---|---|',
    ]
    for name in steps['variants']:
      v = loss[name]
      cells = [
        f'{1e3 * v[kind]["wall_s"]:.1f} / {1e3 * v[kind]["cpu_s"]:.1f}'
        for kind in ('targets', 'forward', 'forward_backward')
      ]
      lines.append(f'| {name} | {tuple(v["terms"])} | {" | ".join(cells)} |')
  return '\n'.join(lines)


def run_environment() -> dict:
  """When the run finished and on what: the fields every benchmark's JSON result carries."""
  return {
    'finished': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
    'machine': platform.processor() or platform.machine(),
    'cpu_count': os.cpu_count(),
    'jax': jax.__version__,
    'device': str(jax.devices()[0]),
  }


def emit(table: str, result: dict, json_out: str | None = None) -> None:
  """Prints the Markdown table, then the result as one JSON line; also writes it to json_out if given (default:
  --json_out; scripts with their own argument parser pass theirs)."""
  print(table, flush=True)
  json_out = _JSON_OUT.value if json_out is None else json_out
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required')
  configs = _variants(config)
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
  steps = step_pairs(configs, _PAIRS.value, _STEPS.value)
  loss = loss_only(configs, steps['image_hw'], _LOSS_REPEATS.value) if _LOSS_REPEATS.value else None
  result = {
    'started': started,
    **run_environment(),
    'device_count': jax.device_count(),
    'batch': config.train.global_batch_size,
    'depth': config.model.backbone.depth,
    'load_avg_end': list(os.getloadavg()),
    'steps_per_block': _STEPS.value,
    'step': steps,
    'loss_only': loss,
  }
  emit(_table(steps, loss), result)


if __name__ == '__main__':
  app.run(main)
