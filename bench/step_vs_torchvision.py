"""Our train step against torchvision's RetinaNet train step, side by side in one run, on the same machine.

  python bench/step_vs_torchvision.py [--size=512] [--batch=2] [--pairs=3] [--steps=3] [--json_out=FILE]
      [--also_lowering=xla]
  XLA_FLAGS=--xla_cpu_use_onednn=true python bench/step_vs_torchvision.py ...   # an XLA:CPU variant

Needs torch and torchvision (a separate venv with this package installed, as for the parity test). Both sides train
R50-FPN RetinaNet for 91 classes on `--batch` random `--size` x `--size` images with 1-20 random boxes each:
  torchvision  the fine-tuning setup torchvision builds from ImageNet weights: FrozenBatchNorm2d, stem and res2
               frozen (trainable_backbone_layers=3), P6/P7 from P5; SGD(momentum 0.9, weight decay 1e-4); input
               already at the size, so its transform only normalizes
  ours         configs/retinanet_torchvision.py at square `--size`: the same network, anchors, matching and L1 box
               loss, frozen BN with freeze_at=2; RetinaNet (consistent.enabled=False), and ConRetinaNet as a third
               column (the same with the consistent loss)
Each is timed in blocks of --steps steps, alternating (torchvision, ours, ConRetinaNet, then again), after warm-up
steps, so a drift of the machine's load falls on all alike; per step the wall time and the process CPU time (all
threads) are recorded. Prints a table and, last, one JSON line.

torchvision runs in a child process of the same Python (this script with --torch_worker), which runs a block of
steps when asked and then waits on its stdin; this process never imports torch. With both in one process, torch's
OpenMP threads and XLA's thread pool slowed each other on the 2-core dev box (2026-12-02: our step 2.94 s there
against 2.59 s alone in the same hour, 2.76 s with OMP_WAIT_POLICY=PASSIVE; torchvision's: 2.57 s there, 2.36 s in its
own process seven minutes later): each side now runs as its users run it.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import child_steps  # noqa: E402  (bench/child_steps.py, next to this file)
import jax  # noqa: E402
import numpy as np  # noqa: E402


def torchvision_step(size, batch, rng):
  """A closure running one torchvision training step (forward, loss, backward, SGD update)."""
  import torch
  import torchvision
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import misc
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7

  torch.manual_seed(0)
  resnet = torchvision.models.resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
  backbone = _resnet_fpn_extractor(resnet, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
  model = torchvision.models.detection.RetinaNet(backbone, 91, min_size=size, max_size=size).train()
  optimizer = torch.optim.SGD(
    [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4
  )
  images = [torch.from_numpy(rng.uniform(0, 1, (3, size, size)).astype(np.float32)) for _ in range(batch)]
  targets = []
  for _ in range(batch):
    n = int(rng.integers(1, 21))
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(16, size * 0.5, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, size)], 1).astype(np.float32)
    targets.append({'boxes': torch.from_numpy(boxes), 'labels': torch.from_numpy(rng.integers(1, 91, n))})

  def step():
    losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return step


def our_runner(size, batch, consistent, lowering='auto'):
  from conret_jax.train import bench

  spec = importlib.util.spec_from_file_location('tv_cfg', os.path.join(ROOT, 'configs', 'retinanet_torchvision.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.resize, config.data.image_size = 'square', size
  config.train.global_batch_size = config.eval.global_batch_size = batch
  config.consistent.enabled = consistent
  config.model.conv_lowering = lowering
  config.model.backbone.allow_random_frozen = True  # random weights are all a timing needs
  return bench.StepRunner(config, (size, size), jax.devices()[:1])


def jax_conv_lowering():
  """What model.conv_lowering='auto' (the 'retinanet' and 'conretinanet' columns) resolves to here."""
  from conret_jax.model import conv_lowering

  return conv_lowering.resolve('auto')


def torch_worker(size, batch):
  """The child process (bench/child_steps.py): torchvision's step at this size and batch."""
  import torch

  step = torchvision_step(size, batch, np.random.default_rng(0))
  child_steps.serve(step, {'torch': torch.__version__, 'torch_threads': torch.get_num_threads()})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--pairs', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--json_out', default='')
  parser.add_argument(
    '--also_lowering',
    default='',
    help="also time RetinaNet with this model.conv_lowering (e.g. 'xla': the lowering before 'auto' existed)",
  )
  parser.add_argument('--torch_worker', action='store_true', help='(internal) be the torchvision child process')
  args = parser.parse_args(argv)
  if args.torch_worker:
    return torch_worker(args.size, args.batch)

  tv = child_steps.StepProcess(__file__, [f'--size={args.size}', f'--batch={args.batch}'])
  ours = {name: our_runner(args.size, args.batch, name == 'conretinanet') for name in ('retinanet', 'conretinanet')}
  if args.also_lowering:
    ours[f'retinanet/{args.also_lowering}'] = our_runner(args.size, args.batch, False, args.also_lowering)
  runners = {'torchvision': tv.run, **{k: r.run for k, r in ours.items()}}  # ours ran one step after compiling
  times = {k: ([], []) for k in runners}
  for _ in range(args.pairs):
    for name, run in runners.items():
      wall, cpu = run(args.steps)
      times[name][0].extend(wall)
      times[name][1].extend(cpu)
  tv.close()
  result = {
    name: {'wall_median_s': statistics.median(w), 'wall_min_s': min(w), 'cpu_median_s': statistics.median(c)}
    for name, (w, c) in times.items()
  }
  result['ratio_ours_to_torchvision_wall'] = (
    result['retinanet']['wall_median_s'] / result['torchvision']['wall_median_s']
  )
  result['ratio_consistent_to_torchvision_wall'] = (
    result['conretinanet']['wall_median_s'] / result['torchvision']['wall_median_s']
  )
  result['ratio_consistent_to_retinanet_wall'] = (
    result['conretinanet']['wall_median_s'] / result['retinanet']['wall_median_s']
  )
  result.update(
    size=args.size,
    batch=args.batch,
    steps_per_variant=args.pairs * args.steps,
    machine=platform.processor() or platform.machine(),
    torch=tv.info['torch'],
    torch_threads=tv.info['torch_threads'],
    torch_in_own_process=True,
    jax=jax.__version__,
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    conv_lowering=jax_conv_lowering(),
    step_tflops=ours['retinanet'].flops / 1e12,
  )
  print('| variant | wall median s (min) | CPU median s |\n|---|---|---|')
  for name in runners:
    r = result[name]
    print(f'| {name} | {r["wall_median_s"]:.3f} ({r["wall_min_s"]:.3f}) | {r["cpu_median_s"]:.3f} |')
  line = json.dumps(result)
  print(line)
  if args.json_out:
    with open(args.json_out, 'w', encoding='utf-8') as f:
      f.write(line + '\n')


if __name__ == '__main__':
  main()
