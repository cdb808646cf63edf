"""Our train step against torchvision's RetinaNet train step, side by side in one run, on the same machine.

  python bench/step_vs_torchvision.py [--size=512] [--batch=B] [--dtype=float32|bfloat16] [--paper_scale]
      [--variants=torchvision,retinanet,conretinanet] [--pairs=3] [--steps=3] [--json_out=FILE] [--also_lowering=xla]
  XLA_FLAGS=--xla_cpu_use_onednn=true python bench/step_vs_torchvision.py ...   # an XLA:CPU variant

Needs torch and torchvision (a separate venv with this package installed, as for the parity test; on the GPU machine
its own Python, bench/gpu_standing.sh). Both sides train R50-FPN RetinaNet for 91 classes on --batch random images
(default: 2 on CPU, 16 elsewhere) with 1-20 random boxes each:
  torchvision  the fine-tuning setup torchvision builds from ImageNet weights: FrozenBatchNorm2d, stem and res2
               frozen (trainable_backbone_layers=3), P6/P7 from P5; SGD(momentum 0.9, weight decay 1e-4); input
               already at the size, so its transform only normalizes (and pads to a multiple of 32)
  retinanet    configs/retinanet_torchvision.py: the same network, anchors, matching and L1 box loss, frozen BN
               with freeze_at=2, consistent.enabled=False
  conretinanet the same with the consistent loss
Input: square --size x --size on both sides, or with --paper_scale the COCO recipe's scale: torchvision gets
800 x 1333 images (short side 800, long side at its 1333 cap), ours the padded bucket its pipeline feeds for that
scale (896 x 1408: sides padded to multiples of 128), so ours computes on 18% more pixels.
--dtype=bfloat16: ours with model.compute_dtype='bfloat16', torchvision's step under torch.autocast(bfloat16) (how
each trains in mixed precision); float32 convolves in TF32 on a GPU on both sides (torch's cudnn default; our
matmul_precision='default').
On a GPU (JAX's default backend) torchvision runs on CUDA and each of its steps ends with a synchronization; JAX
then takes at most half of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 unless set), leaving the rest to the
child. Ours gets the XLA flags conret-train gives its own process (conret_jax/cli/xla_flags.py; the user's
XLA_FLAGS win, CONRET_XLA_DEFAULTS=0 keeps XLA's defaults).
Each is timed in blocks of --steps steps, alternating (reversed order every other round), after warm-up steps, so a
drift of the machine's load falls on all alike; per step the wall time and the process CPU time (all threads) are
recorded. Model-FLOPs utilization: our step's FLOPs (conret_jax/flops.py, the same count as `conret-bench step`) over
its median time and the chip's bf16 peak (conret_jax/train/bench.py), for ours; torchvision's column gets
`mfu_at_retinanet_flops`, RetinaNet's count over its own time (the same network; at --paper_scale on fewer pixels,
so that figure is high by up to the 18%). Prints a table and, last, one JSON line.

torchvision runs in a child process of the same Python (this script with --torch_worker), which runs a block of
steps when asked and then waits on its stdin; this process never imports torch. With both in one process, torch's
OpenMP threads and XLA's thread pool slowed each other on the 2-core dev box (bench/RESULTS.md, "Measuring
torchvision in one process with us was unfair to both"): each side now runs as its users run it.
"""

import argparse
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import child_steps  # noqa: E402  (bench/child_steps.py, next to this file)
import numpy as np  # noqa: E402

VARIANTS = ('torchvision', 'retinanet', 'conretinanet')
PAPER_HW_TORCHVISION = (800, 1333)  # short side 800, long side at torchvision's (and Detectron's) 1333 cap


def torchvision_step(hw, batch, dtype, device, rng):
  """(a closure running one torchvision training step: forward, loss, backward, SGD update; info about it)."""
  import torch
  import torchvision
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import misc
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7

  torch.manual_seed(0)
  h, w = hw
  resnet = torchvision.models.resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
  backbone = _resnet_fpn_extractor(resnet, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
  model = torchvision.models.detection.RetinaNet(backbone, 91, min_size=min(hw), max_size=max(hw))
  model.to(device).train()
  optimizer = torch.optim.SGD(
    [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4
  )
  images = [torch.from_numpy(rng.uniform(0, 1, (3, h, w)).astype(np.float32)).to(device) for _ in range(batch)]
  targets = []
  for _ in range(batch):
    n = int(rng.integers(1, 21))
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
    wh = rng.uniform(16, [w * 0.5, h * 0.5], (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
    labels = rng.integers(1, 91, n)
    targets.append({'boxes': torch.from_numpy(boxes).to(device), 'labels': torch.from_numpy(labels).to(device)})
  autocast = dtype == 'bfloat16'
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      losses = model(images, targets)
      loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync()

  return step, {**child_steps.torch_info(device), 'autocast_bfloat16': autocast, 'image_hw': [h, w]}


def torch_worker(args):
  """The child process (bench/child_steps.py): torchvision's step at the parent's input, batch, dtype and device."""
  hw = tuple(int(v) for v in args.hw.split(','))
  child_steps.serve(*torchvision_step(hw, args.batch, args.dtype, args.torch_device, np.random.default_rng(0)))


def our_config(args, batch, consistent, lowering='auto'):
  """configs/retinanet_torchvision.py at the run's input, batch and dtype."""
  config = child_steps.repo_config('retinanet_torchvision.py')
  if not args.paper_scale:  # else the config's own short side 800, long side 1333
    config.data.resize, config.data.image_size = 'square', args.size
  config.train.global_batch_size = config.eval.global_batch_size = batch
  config.consistent.enabled = consistent
  config.model.conv_lowering = lowering
  config.model.compute_dtype = args.dtype
  config.model.backbone.allow_random_frozen = True  # random weights are all a timing needs
  return config


def _mfu_cell(v) -> str:
  mfu = v.get('mfu', v.get('mfu_at_retinanet_flops'))
  return '-' if mfu is None else f'{mfu:.3f}'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=512, help='square input side (unless --paper_scale)')
  parser.add_argument('--paper_scale', action='store_true', help='the COCO recipe scale (module docstring)')
  parser.add_argument('--batch', type=int, default=0, help='images per step (0: 2 on CPU, 16 elsewhere)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated, of {VARIANTS}')
  parser.add_argument('--pairs', type=int, default=3, help='rounds of blocks over the columns')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per block')
  parser.add_argument('--json_out', default='')
  parser.add_argument(
    '--also_lowering',
    default='',
    help="also time RetinaNet with this model.conv_lowering (e.g. 'xla': the lowering before 'auto' existed)",
  )
  parser.add_argument('--torch_worker', action='store_true', help='(internal) be the torchvision child process')
  parser.add_argument('--hw', default='', help='(internal) the torchvision worker input, H,W')
  parser.add_argument('--torch_device', default='cpu', help='(internal) the torchvision worker device')
  args = parser.parse_args(argv)
  if args.torch_worker:
    return torch_worker(args)
  variants = tuple(v for v in args.variants.split(',') if v)
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    parser.error(f'--variants={args.variants!r}: name some of {VARIANTS}')

  if 'torchvision' in variants:
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')  # read when JAX's backend starts, below
  from conret_jax.cli import xla_flags

  xla_flags.apply()  # conret-train's flags, before JAX starts a backend (module docstring)
  import jax
  import step_compare  # bench/step_compare.py, next to this file

  from conret_jax.model import conv_lowering
  from conret_jax.train import bench

  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
  device = jax.devices()[0]
  batch = args.batch or (2 if device.platform == 'cpu' else 16)
  configs = {name: our_config(args, batch, name == 'conretinanet') for name in variants if name != 'torchvision'}
  if args.also_lowering:
    configs[f'retinanet/{args.also_lowering}'] = our_config(args, batch, False, args.also_lowering)
  square = (args.size, args.size)
  ours = {
    name: bench.StepRunner(config, None if args.paper_scale else square, [device]) for name, config in configs.items()
  }
  runners, tv = {}, None
  if 'torchvision' in variants:
    tv_hw = PAPER_HW_TORCHVISION if args.paper_scale else square
    flags = [
      f'--hw={tv_hw[0]},{tv_hw[1]}',
      f'--batch={batch}',
      f'--dtype={args.dtype}',
      f'--torch_device={child_steps.torch_device(device.platform)}',
    ]
    tv = child_steps.StepProcess(__file__, flags)
    runners['torchvision'] = tv.run
  runners.update({name: runner.run for name, runner in ours.items()})  # ours ran one step after compiling
  times = child_steps.alternate(runners, args.pairs, args.steps)
  if tv:
    tv.close()

  peak = bench.peak_tflops(device)
  result_variants = {name: child_steps.summary(*times[name], batch) for name in runners}
  for name, runner in ours.items():
    v = result_variants[name]
    v.update(
      image_hw=list(runner.image_hw),
      compile_time_s=runner.compile_time_s,
      step_gflops=runner.flops / 1e9,
      loss=float(runner.metrics['loss']),
    )
    if peak:
      v['mfu'] = runner.flops / v['wall_median_s'] / (peak * 1e12)
  if tv:
    result_variants['torchvision']['image_hw'] = tv.info['image_hw']
    if peak and 'retinanet' in ours:
      t = result_variants['torchvision']['wall_median_s']
      result_variants['torchvision']['mfu_at_retinanet_flops'] = ours['retinanet'].flops / t / (peak * 1e12)
  pairs = [('conretinanet', 'retinanet')] if 'retinanet' in ours and 'conretinanet' in ours else []
  if tv:
    pairs += [(name, 'torchvision') for name in ours]
  ratios = child_steps.ratios(result_variants, pairs)
  result = {
    'started': started,
    **step_compare.run_environment(),
    'device_kind': getattr(device, 'device_kind', device.platform),
    'peak_bf16_tflops': peak,
    'paper_scale': args.paper_scale,
    'size': None if args.paper_scale else args.size,
    'batch': batch,
    'dtype': args.dtype,
    'conv_lowering': conv_lowering.resolve('auto'),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'steps_per_block': args.steps,
    'rounds': args.pairs,
    'load_avg_end': list(os.getloadavg()),
    'torchvision_info': tv.info if tv else None,
    'variants': result_variants,
    'ratios': ratios,
  }
  table = child_steps.table(result_variants, ratios, {'MFU': _mfu_cell})
  step_compare.emit(table, result, json_out=args.json_out)


if __name__ == '__main__':
  main()
