"""Our SSD300 VGG-16 train step against torchvision's ssd300_vgg16 train step, side by side in one run.

  python bench/ssd_step_vs_torchvision.py [--size=300] [--batch=B] [--pairs=3] [--steps=3] [--freeze_at=K]
      [--dtype=float32|bfloat16] [--backbone=vgg16] [--width_divisor=1] [--json_out=FILE]

Run it with a Python that has both jax and torch/torchvision (e.g. /work/torchvenv). The flags are the same on every
machine: ours runs on JAX's default device, and when that is a GPU torchvision runs on CUDA (each step then ends
with a synchronization). Batch: --batch, else 2 on CPU and 32 elsewhere. Three columns, in --dtype (float32, or
bfloat16: ours with model.compute_dtype='bfloat16', torchvision's step under torch.autocast(bfloat16)):
  torchvision  ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91) in train mode: model(images,
               targets) (its transform, matching, MultiBox loss with hard negatives), backward, SGD step
  ssd          configs/ssd300_torchvision.py (torchvision's network, default boxes, matching, coding and loss: see
               tests/model/test_ssd_torchvision_parity.py) with consistent.enabled=False, via StepRunner: the step
               conret-train runs (with its schedule, non-finite check and metrics)
  conssd       the same with consistent optimization (ConSSD)
Blocks of --steps steps alternate over the columns, --pairs rounds (reversed order every other round), after
warm-up steps, so a drift of the machine's load falls on all alike; per step: wall time and process CPU time (all
threads). Prints a table and, last, one JSON line (bench/step_compare.py's run_environment and emit). Goals: on CPU
ssd/torchvision <= 1.0; conssd/ssd <= 1.05 (on GPU too).

Made equal: the batch itself (StepRunner's synthetic batch is passed to torchvision: the same images, given as
x / 255 as torchvision expects, and the same 1..20 boxes per image; a class 0, which no COCO category has and which
is torchvision's background, is given as label 1); images already at 300 x 300, so torchvision's fixed 300 x 300
bilinear resize changes nothing (it still runs, as in every torchvision step); SGD with momentum 0.9 and weight decay
5e-4 on every trained parameter (torchvision's recipe; the rate does not matter to a timing); the frozen prefix:
--freeze_at (default: the config's model.ssd.freeze_at = 1, conv1) on both sides. torchvision freezes
nothing with weights_backbone=None (trainable_backbone_layers only applies with pretrained weights; with them its
default of 4 freezes conv1 alone), so the worker sets requires_grad=False on its first convs by hand: neither side
then computes their gradients nor backpropagates through them. --freeze_at=1 is torchvision's own ImageNet setting,
--freeze_at=2 (conv1 and conv2) Caffe SSD's.
On GPU both convolve float32 in TF32 (torch's cudnn default; our matmul_precision='default').
XLA flags: ours runs with the flags conret-train adds to its own process (conret_jax/cli/xla_flags.py: on CPU,
XLA:CPU's YNNPACK fusions off), so the step timed is the one training runs; the user's XLA_FLAGS win, and
CONRET_XLA_DEFAULTS=0 times XLA's defaults instead (on this project's 2-core CPU box the ratio read 1.92x under them,
1.01-1.02x with the flags and the max-pool gradient: bench/RESULTS.md, "SSD300 VGG-16 train step against
torchvision's"). The JSON's xla_flags field says what ran.
What differs: the implementations (torchvision: eager per-image matching and hard-negative mining in Python,
its transform's normalization, resize and batching copies; ours: one compiled XLA program); our classifier has 92
outputs per default box (class 0 kept by class_layout='category_id') against torchvision's 91: 35,515,328 trained
parameters against 35,381,666 (+0.4%, that column alone; 260,160 frozen on each side at freeze_at=2).

torchvision runs in a child process of the same Python (this script with --torch_worker), which reads the batch
from an .npz file, runs a block of steps when asked and waits on its stdin; this process never imports torch, and
the child never imports jax (bench/step_vs_torchvision.py: sharing a process, torch's OpenMP threads and XLA's pool
slowed each other on the 2-core box). With a torchvision column JAX takes at most half of a GPU's memory
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 unless set), leaving the rest to the child.

--size=512 (SSD512) or a ResNet --backbone (frozen BN trunk, NVIDIA's BN extras) has no torchvision model to compare
with (ssd300_vgg16 warps every input to 300 x 300), so those runs time ssd and conssd only: img/s and conssd/ssd.
--width_divisor > 1 narrows ours only: a quick check that the script runs, not a comparison with torchvision.
"""

import argparse
import os
import sys
import tempfile
import time

import child_steps  # bench/child_steps.py, next to this file
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)  # conv1 .. conv5


def torchvision_step(batch_file: str, freeze_at: int, device: str, dtype: str = 'float32'):
  """(a closure running one torchvision SSD300 training step, a dict about the model) on the batch in batch_file."""
  import torch
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
  convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]  # conv1_1, conv1_2, conv2_1, ...
  for conv in convs[: sum(VGG16_CONVS_PER_BLOCK[:freeze_at])]:
    conv.requires_grad_(False)
  model.to(device).train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
  data = np.load(batch_file)
  images = [torch.from_numpy(im / np.float32(255)).permute(2, 0, 1).contiguous().to(device) for im in data['images']]
  targets = [
    {
      'boxes': torch.from_numpy(boxes[valid]).to(device),
      'labels': torch.from_numpy(np.maximum(classes[valid], 1).astype(np.int64)).to(device),
    }
    for boxes, classes, valid in zip(data['boxes'], data['classes'], data['valid'])
  ]
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      losses = model(images, targets)
      loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync()

  info = {
    **child_steps.torch_info(device),
    'autocast_bfloat16': dtype == 'bfloat16',
    'trainable_params': sum(p.numel() for p in params),
    'frozen_convs': sum(not c.weight.requires_grad for c in convs),
    'boxes_per_image': [len(t['boxes']) for t in targets],
  }
  return step, info


def torch_worker(batch_file: str, freeze_at: int, device: str, dtype: str):
  """The child process (bench/child_steps.py): torchvision's SSD300 step on the batch in batch_file."""
  child_steps.serve(*torchvision_step(batch_file, freeze_at, device, dtype))


def ssd_config(args, batch: int, consistent: bool):
  """configs/ssd300_torchvision.py at args.size with args.backbone, args.freeze_at and args.width_divisor."""
  from conret_jax import defaults

  config = child_steps.repo_config('ssd300_torchvision.py')
  s = config.model.ssd
  reference = defaults.ssd_config(args.size).model.ssd  # SSD512's default boxes at 512
  for key in ('image_size', 'min_ratio', 'max_ratio', 'first_ratio', 'aspect_ratios', 'steps'):
    s[key] = reference[key]
  config.data.image_size = args.size
  s.backbone = args.backbone
  if args.backbone != 'vgg16':
    s.norm, s.extra_norm = 'frozen_bn', 'bn'  # an ImageNet trunk's statistics; NVIDIA's SSD-ResNet extras
  if args.freeze_at is not None:
    s.freeze_at = args.freeze_at
  s.width_divisor = args.width_divisor
  s.allow_random_frozen = True  # random weights are all a timing needs
  config.train.global_batch_size = config.eval.global_batch_size = batch
  config.consistent.enabled = consistent
  config.model.compute_dtype = args.dtype
  return config


def _params_cell(v) -> str:
  return f'{v["trainable_params"]:,}'


def _table(result) -> str:
  lines = [child_steps.table(result['variants'], result['ratios'], {'trainable params': _params_cell})]
  if result['width_divisor'] > 1:
    lines.append(f'ours narrowed by width_divisor={result["width_divisor"]}: a check that it runs, not a comparison')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=300, choices=(300, 512))
  parser.add_argument('--batch', type=int, default=0, help='images per step (0: 2 on CPU, 32 elsewhere)')
  parser.add_argument('--pairs', type=int, default=3, help='rounds of blocks over the columns')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per block')
  parser.add_argument('--backbone', default='vgg16', choices=('vgg16', 'resnet18', 'resnet34', 'resnet50'))
  parser.add_argument('--freeze_at', type=int, default=None, help="frozen prefix, both sides (default: the config's)")
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--width_divisor', type=int, default=1, help='narrows ours only (a quick check, not a timing)')
  parser.add_argument('--json_out', default='')
  parser.add_argument('--torch_worker', action='store_true', help='(internal) be the torchvision child process')
  parser.add_argument('--batch_file', default='', help='(internal) the torchvision worker batch')
  parser.add_argument('--torch_device', default='cpu', help='(internal) the torchvision worker device')
  args = parser.parse_args(argv)
  if args.torch_worker:
    return torch_worker(args.batch_file, args.freeze_at, args.torch_device, args.dtype)

  with_torchvision = args.size == 300 and args.backbone == 'vgg16'
  if with_torchvision:
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')  # read when JAX's backend starts, below
  from conret_jax.cli import xla_flags

  xla_flags.apply()  # conret-train's flags, before JAX starts a backend (module docstring)
  import jax
  import step_compare  # bench/step_compare.py, next to this file

  from conret_jax import detectors
  from conret_jax.model import conv_lowering
  from conret_jax.train import bench

  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
  backend = jax.default_backend()
  batch = args.batch or (2 if backend == 'cpu' else 32)
  configs = {name: ssd_config(args, batch, name == 'conssd') for name in ('ssd', 'conssd')}
  hw = (args.size, args.size)
  ours = {name: bench.StepRunner(config, hw, jax.devices()[:1]) for name, config in configs.items()}
  runners = {}
  tv = None
  if with_torchvision:
    with tempfile.TemporaryDirectory() as tmp:
      batch_file = os.path.join(tmp, 'batch.npz')
      np.savez(batch_file, **jax.device_get(ours['ssd'].batch))  # the very arrays our steps train on
      freeze_at = configs['ssd'].model.ssd.freeze_at
      device = child_steps.torch_device(backend)
      flags = [
        f'--batch_file={batch_file}',
        f'--freeze_at={freeze_at}',
        f'--torch_device={device}',
        f'--dtype={args.dtype}',
      ]
      tv = child_steps.StepProcess(__file__, flags)
    runners['torchvision'] = tv.run
  runners.update({name: runner.run for name, runner in ours.items()})  # ours ran one step after compiling
  times = child_steps.alternate(runners, args.pairs, args.steps)
  if tv:
    tv.close()

  variants = {name: child_steps.summary(*times[name], batch) for name in runners}
  for name, runner in ours.items():
    mask = detectors.from_config(runner.config).trainable_mask(runner.state.params)
    sizes = jax.tree.leaves(jax.tree.map(lambda p, m: p.size if m else 0, runner.state.params, mask))
    variants[name].update(
      trainable_params=int(sum(sizes)),
      compile_time_s=runner.compile_time_s,
      step_gflops=runner.flops / 1e9,
      loss=float(runner.metrics['loss']),
    )
  if tv:
    variants['torchvision']['trainable_params'] = tv.info['trainable_params']
  ratios = child_steps.ratios(variants, [('conssd', 'ssd')] + ([(name, 'torchvision') for name in ours] if tv else []))
  result = {
    'started': started,
    **step_compare.run_environment(),
    'size': args.size,
    'batch': batch,
    'backbone': args.backbone,
    'freeze_at': configs['ssd'].model.ssd.freeze_at,
    'width_divisor': args.width_divisor,
    'dtype': args.dtype,
    'conv_lowering': conv_lowering.resolve('auto'),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'steps_per_block': args.steps,
    'rounds': args.pairs,
    'load_avg_end': list(os.getloadavg()),
    'torchvision_info': tv.info if tv else None,
    'variants': variants,
    'ratios': ratios,
  }
  step_compare.emit(_table(result), result, json_out=args.json_out)


if __name__ == '__main__':
  main()
