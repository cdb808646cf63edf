"""SSD's hard negative mining as the package does it (a radix select) against a stable sort, inside the MultiBox loss.

  python bench/hard_negative_mining.py [--config=configs/ssd_shapes_demo.py[:consistent=false]] [--rounds=4] [--steps=5]

The loss of the config's detector (default: the SSD shapes demo, ConSSD, batch 16 of the config) is differentiated
with respect to the network's outputs under jit, twice: with core/hard_negatives.py as it is, and with the mining it
replaced (per image a stable argsort of the negated eligible losses, then its inverse permutation as each anchor's
rank; mined when the rank is below k). Both see the same outputs (the initialized network's on random images) and
batch (train.bench's synthetic one). Blocks of --steps calls alternate, --rounds times (reversed order every other
round), after a warm-up call each. Checks that both give the same loss and the same numbers of mined negatives
(the masks themselves are compared in tests/core/test_hard_negatives.py), then prints one JSON line of medians and
minima in seconds.
"""

import argparse
import json
import statistics
import time

from conret_jax.cli import xla_flags


def sorted_mining(neg_losses, positive, eligible, *, neg_pos_ratio: float = 3.0, min_negatives: int = 0):
  """The sort formulation: the same mask as core/hard_negatives.py, from two argsorts per image."""
  import jax
  import jax.numpy as jnp

  losses = jax.lax.stop_gradient(jnp.asarray(neg_losses, jnp.float32))
  num_pos = jnp.sum(positive, axis=1, dtype=jnp.float32)
  k = jnp.maximum(neg_pos_ratio * num_pos, float(min_negatives))[:, None]
  order = jnp.argsort(jnp.where(eligible, -losses, jnp.inf), axis=1, stable=True)
  return eligible & (jnp.argsort(order, axis=1) < k)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/ssd_shapes_demo.py', help='path/to/config.py[:arg]')
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  xla_flags.apply()  # conret-train's flags, before JAX starts a backend
  import jax
  import jax.numpy as jnp
  import numpy as np

  from conret_jax import detectors, multibox
  from conret_jax.batch import Batch
  from conret_jax.cli.import_weights import load_config
  from conret_jax.train import bench

  config = load_config(args.config)
  detector = detectors.from_config(config)
  if not isinstance(detector.loss, multibox.MultiBoxLoss):
    raise SystemExit(f'{args.config}: its loss is {type(detector.loss).__name__}; this times the MultiBox loss')
  hw = bench.default_image_hw(config)
  batch = Batch.of({k: jnp.asarray(v) for k, v in bench.synthetic_batch(config, hw, np.random.default_rng(0)).items()})
  variables = detectors.init_variables(detector.module, jax.random.PRNGKey(0), hw, 2)
  outputs = jax.jit(lambda v, x: detector.module.apply(v, x, train=False))(variables, batch.images)
  anchors = detector.anchors(hw)

  def loss_and_grad(mine):
    multibox.mine_hard_negatives = mine  # read when the loss is traced, below

    def fn(out):
      (loss, metrics), grads = jax.value_and_grad(lambda o: detector.loss(o, anchors, batch), has_aux=True)(out)
      return loss, metrics, grads

    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(outputs))  # traced and compiled now, with `mine`
    return jitted

  package_mining = multibox.mine_hard_negatives
  fns = {'radix_select': loss_and_grad(package_mining), 'sort': loss_and_grad(sorted_mining)}
  multibox.mine_hard_negatives = package_mining
  results = {name: fn(outputs) for name, fn in fns.items()}
  (loss_a, metrics_a, _), (loss_b, metrics_b, _) = results['radix_select'], results['sort']
  counts = {k: (float(metrics_a[k]), float(metrics_b[k])) for k in metrics_a if k.startswith('num_neg_')}
  if any(a != b for a, b in counts.values()) or float(loss_a) != float(loss_b):
    raise SystemExit(f'the two minings differ: loss {float(loss_a)} vs {float(loss_b)}, negatives {counts}')

  times = {name: [] for name in fns}
  for r in range(args.rounds):
    for name in fns if r % 2 == 0 else list(fns)[::-1]:
      for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(fns[name](outputs))
        times[name].append(time.perf_counter() - start)
  medians = {name: statistics.median(t) for name, t in times.items()}
  print(
    json.dumps(
      {
        'config': args.config,
        'batch': int(config.train.global_batch_size),
        'anchors': int(anchors.shape[0]),
        'negatives_mined': {k: a for k, (a, _) in counts.items()},
        'loss_and_grad_median_s': medians,
        'loss_and_grad_min_s': {name: min(t) for name, t in times.items()},
        'sort_over_radix_select': medians['sort'] / medians['radix_select'],
      }
    )
  )


if __name__ == '__main__':
  main()
