"""The CPU lowering's max-pool gradient (model/pooling.py) against lax's select_and_scatter, in one process.

  python bench/max_pool_gradient.py [--config=configs/ssd300_torchvision.py[:arg]] [--batch=2] [--rounds=4] [--steps=3]

The network of the config (default: torchvision's SSD300 VGG-16, whose five max pools go through Compute.max_pool)
is differentiated twice under jit, forward + backward to every parameter with a cotangent of ones, at the config's
input size: once as the package builds it, once with every max pool replaced by nn.max_pool (lax's gradient). Blocks
of --steps calls alternate between the two, --rounds times (reversed order every other round), after one warm-up
call each. Prints the largest gradient difference and, last, one JSON line of medians and minima in seconds. The
config's conv_lowering decides whether the custom gradient is used at all ('auto' takes it on CPU only).
"""

import argparse
import json
import statistics
import time

from conret_jax.cli import xla_flags


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/ssd300_torchvision.py', help='path/to/config.py[:arg]')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  xla_flags.apply()  # conret-train's flags, before JAX starts a backend
  import jax
  import jax.numpy as jnp
  import numpy as np

  from conret_jax import detectors
  from conret_jax.cli.import_weights import load_config
  from conret_jax.model import conv_lowering, pooling

  config = load_config(args.config)
  detector = detectors.from_config(config)
  size = detectors.input_size(config)
  hw = (size.fixed[0],) * 2 if size.fixed else (config.data.image_size,) * 2
  variables = detectors.init_variables(detector.module, jax.random.PRNGKey(0), hw, args.batch)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (args.batch, *hw, 3)).astype(np.float32))

  def gradient_fn():
    def fn(v):
      out, vjp = jax.vjp(lambda p: detector.module.apply({**v, 'params': p}, images, train=True), v['params'])
      return vjp(jax.tree_util.tree_map(jnp.ones_like, out))

    return jax.jit(fn)

  fns = {'pooling_py': gradient_fn()}
  jax.block_until_ready(fns['pooling_py'](variables))  # traced now, with the package's max pool
  package_max_pool = pooling.max_pool_function
  pooling.max_pool_function = lambda lowering: package_max_pool('xla')  # nn.max_pool
  try:
    fns['select_and_scatter'] = gradient_fn()
    jax.block_until_ready(fns['select_and_scatter'](variables))
  finally:
    pooling.max_pool_function = package_max_pool
  grads = [jax.tree_util.tree_leaves(fn(variables)) for fn in fns.values()]
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*grads))
  scale = max(float(jnp.max(jnp.abs(b))) for b in grads[1])
  print(f'largest gradient difference {diff:.3g} (largest gradient {scale:.3g})', flush=True)
  times = {name: [] for name in fns}
  for r in range(args.rounds):
    for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
      for _ in range(args.steps):
        t = time.perf_counter()
        jax.block_until_ready(fns[name](variables))
        times[name].append(time.perf_counter() - t)
  result = {
    'finished_utc': time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime()),
    'config': args.config,
    'batch': args.batch,
    'image_hw': hw,
    'lowering': conv_lowering.resolve(config.model.conv_lowering),
    'median_s': {k: statistics.median(v) for k, v in times.items()},
    'min_s': {k: min(v) for k, v in times.items()},
    'max_gradient_difference': diff,
  }
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
