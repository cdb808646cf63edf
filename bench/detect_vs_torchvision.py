"""`conret_jax.detect` against torchvision's RetinaNet inference, side by side in one run, on the same machine.

  python bench/detect_vs_torchvision.py [--size=640] [--batch=16] [--dtype=bfloat16] [--steps=20] [--json_out=FILE]

Needs torch and torchvision (on the GPU machine its own Python: bench/gpu_standing.sh). Both sides run R50-FPN
RetinaNet for 91 classes, freshly initialized, on --batch random --size x --size images:
  ours         `conret-bench detect` (conret_jax/detect_bench.py) on configs/retinanet_torchvision.py at square
               --size: the forward, post-processing and `conret_jax.detect` each timed alone; images_per_s is
               detect's, end to end
  torchvision  retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91) in eval mode,
               min_size = max_size = --size: model(images) (its transform, forward and post-processing), under
               torch.no_grad, ending with a synchronization on a GPU
Both post-process the same way (top 1000 pairs per level, class-aware NMS at 0.5, 300 detections) at score
threshold 0: a fresh detector scores everything near its prior of 0.01, below the usual 0.05, which would leave
post-processing nothing to do; at 0 every level's top-k is full and NMS gets the most candidates it can, on both
sides. --dtype=bfloat16: ours with model.compute_dtype='bfloat16', torchvision under torch.autocast(bfloat16).
The issue-14 goal on one H100: ours >= 1,000 images/s at bfloat16, 640^2, batch 16.

torchvision runs in a child process (this script with --torch_worker, bench/child_steps.py): a block of --steps
calls before ours and one after, both reported; this process never imports torch. On a GPU JAX takes at most half
of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 unless set), leaving the rest to the child. Prints a table and,
last, one JSON line.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import child_steps  # noqa: E402  (bench/child_steps.py, next to this file)
import numpy as np  # noqa: E402


def torchvision_detect(size, batch, dtype, device):
  """(a closure running one torchvision inference call on the batch, info about it)."""
  import torch
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(
    weights=None, weights_backbone=None, num_classes=91, min_size=size, max_size=size
  )
  model.score_thresh = 0.0  # the worst case, as ours (module docstring)
  model.to(device).eval()
  rng = np.random.default_rng(0)
  images = [torch.from_numpy(rng.uniform(0, 1, (3, size, size)).astype(np.float32)).to(device) for _ in range(batch)]
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  detections = []

  def call():
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      detections[:] = model(images)
    sync()

  call()
  return call, {
    **child_steps.torch_info(device),
    'autocast_bfloat16': dtype == 'bfloat16',
    'detections_per_image': float(np.mean([len(d['boxes']) for d in detections])),
  }


def our_config(size, batch, dtype):
  config = child_steps.repo_config('retinanet_torchvision.py')
  config.data.resize, config.data.image_size = 'square', size
  config.eval.global_batch_size = config.train.global_batch_size = batch
  config.model.compute_dtype = dtype
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=640)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=20, help='timed calls per block (medians reported)')
  parser.add_argument('--json_out', default='')
  parser.add_argument('--torch_worker', action='store_true', help='(internal) be the torchvision child process')
  parser.add_argument('--torch_device', default='cpu', help='(internal) the torchvision worker device')
  args = parser.parse_args(argv)
  if args.torch_worker:
    return child_steps.serve(*torchvision_detect(args.size, args.batch, args.dtype, args.torch_device))

  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')  # read when JAX's backend starts, below
  from conret_jax.cli import xla_flags

  xla_flags.apply()  # the flags conret-train gives its own process (the user's XLA_FLAGS win)
  import jax
  import step_compare  # bench/step_compare.py, next to this file

  from conret_jax import detect_bench

  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
  device = jax.devices()[0]
  flags = [f'--size={args.size}', f'--batch={args.batch}', f'--dtype={args.dtype}']
  tv = child_steps.StepProcess(__file__, [*flags, f'--torch_device={child_steps.torch_device(device.platform)}'])
  tv_before, _ = tv.run(args.steps)
  ours = detect_bench.run_detect_bench(our_config(args.size, args.batch, args.dtype), args.steps)
  tv_after, _ = tv.run(args.steps)
  tv.close()
  tv_s = statistics.median(tv_before + tv_after)
  torchvision = {
    'total_s': tv_s,
    'total_s_before_ours': statistics.median(tv_before),
    'total_s_after_ours': statistics.median(tv_after),
    'images_per_s': args.batch / tv_s,
    **tv.info,
  }
  result = {
    'started': started,
    **step_compare.run_environment(),
    'device_kind': getattr(device, 'device_kind', device.platform),
    'size': args.size,
    'batch': args.batch,
    'dtype': args.dtype,
    'steps': args.steps,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'ours': ours,
    'torchvision': torchvision,
    'ours_over_torchvision_images_per_s': ours['images_per_s'] / torchvision['images_per_s'],
  }
  table = '\n'.join(
    [
      '| variant | img/s | detect s | forward s | post-processing s | detections per image |',
      '|---|---|---|---|---|---|',
      f'| ours | {ours["images_per_s"]:.1f} | {ours["total_s"]:.4f} | {ours["forward_s"]:.4f} | '
      f'{ours["postprocess_s"]:.4f} | {ours["detections_per_image"]:.1f} |',
      f'| torchvision | {torchvision["images_per_s"]:.1f} | {tv_s:.4f} (before ours '
      f'{torchvision["total_s_before_ours"]:.4f}, after {torchvision["total_s_after_ours"]:.4f}) | - | - | '
      f'{torchvision["detections_per_image"]:.1f} |',
      f'\nours / torchvision images/s: {result["ours_over_torchvision_images_per_s"]:.2f}',
    ]
  )
  step_compare.emit(table, result, json_out=args.json_out)


if __name__ == '__main__':
  main()
