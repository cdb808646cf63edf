"""conret-import: convert a torchvision / timm / Detectron weight file into an orbax checkpoint for config.init_from.

  conret-import --format torchvision_retinanet --input retinanet_resnet50_fpn_coco.pth --output /ckpt/tv_retinanet
  conret-import --format torchvision_resnet --input resnet50.safetensors --output /ckpt/r50 \
      --config configs/conretinanet_coco.py
  conret-import --format timm_resnet --input model.safetensors --output /ckpt/r101 --config cfg.py:depth=101
  conret-import --format detectron_resnet --input R-50.pkl --output /ckpt/detectron_r50
  conret-import --format torchvision_ssd --input ssd300_vgg16_coco.pth --output /ckpt/tv_ssd300
  conret-import --format torchvision_vgg16 --input vgg16.pth --output /ckpt/vgg16_ssd \
      --config configs/paper/table5_ssd.py:backbone=vgg16

--input: .safetensors or .npz (no torch needed), .pth/.pt (torch, loaded with weights_only=True), or .pkl (Detectron's
ImageNet R-50.pkl / R-101.pkl, read with an unpickler that only rebuilds NumPy arrays; see conret_jax/weight_files.py).
--config FILE[:ARG]: a config file whose get_config(ARG) describes the target network (the backbone depth must match
the file). Default: configs/retinanet_torchvision.py for torchvision_retinanet and configs/ssd300_torchvision.py for
torchvision_ssd (when run from a source checkout), conret_jax.defaults.base_config() (ResNet-50) for the ResNet
formats, with backbone.stride_in_1x1=True for detectron_resnet, conret_jax.defaults.ssd_config() (SSD300-VGG16) for
torchvision_vgg16. A ResNet import serves an SSD-ResNet too (its trunk takes res2-res4 of the file). Detectron's
weights expect its input normalization: train with model.pixel_mean = defaults.DETECTRON_PIXEL_MEAN_RGB and
model.pixel_std = defaults.DETECTRON_PIXEL_STD (a note says so otherwise).
--output DIR: written as an orbax StandardCheckpointer checkpoint of the variables dict; layout in conret_jax/weights
(whole model for torchvision_retinanet and torchvision_ssd, only the 'backbone' subtrees for the ResNet and VGG-16
formats). DIR must not exist; the checkpoint is written next to it and moved into place when complete, so DIR never
holds half of one.
A mistake (a missing, damaged or mismatched --input, a bad --config, an --output that exists or cannot be written,
a missing or unknown flag) ends in one line `conret-import: error: ...` and exit status 2; --debug (or
CONRET_DEBUG=1) shows its traceback instead, as for the other tools.
"""

import argparse
import importlib.util
import inspect
import os
import sys

from conret_jax import defaults, weights
from conret_jax.cli import tool
from conret_jax.defaults import base_config
from conret_jax.errors import ConfigError, UserError, WeightFileError, WorkdirError
from conret_jax.model.resnet import count_params

IMPORTERS = {
  'torchvision_retinanet': weights.from_torchvision_retinanet,
  'torchvision_resnet': weights.from_torchvision_resnet,
  'timm_resnet': weights.from_timm_resnet,
  'detectron_resnet': weights.from_detectron_resnet,
  'torchvision_ssd': weights.from_torchvision_ssd,
  'torchvision_vgg16': weights.from_torchvision_vgg16,
}
_REPO_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
# The formats of a whole published detector: their network is described by a config file of the source checkout.
_DETECTOR_CONFIGS = {'torchvision_retinanet': 'retinanet_torchvision.py', 'torchvision_ssd': 'ssd300_torchvision.py'}


def load_config(spec: str):
  """get_config(arg) of the Python file in `spec` = 'path/to/config.py[:arg]'."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  module_spec = importlib.util.spec_from_file_location('conret_import_config', path)
  if module_spec is None:  # no loader for its extension (a config.json, a weight file)
    raise ConfigError(f'config file {path!r} is not a Python file: --config takes a .py file that defines get_config()')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's file (a syntax error, a bad import): as the absl tools treat a --config
    raise ConfigError(f'config file {path!r} fails to load: {type(e).__name__}: {e}') from e
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {path!r} defines no get_config() function')
  takes_arg = bool(inspect.signature(module.get_config).parameters)
  return module.get_config(arg or None) if takes_arg else module.get_config()


def default_config(fmt: str):
  if fmt in _DETECTOR_CONFIGS:
    path = os.path.join(_REPO_CONFIGS, _DETECTOR_CONFIGS[fmt])
    if not os.path.isfile(path):
      raise FileNotFoundError(f'pass --config configs/{_DETECTOR_CONFIGS[fmt]} (not found next to the package)')
    return load_config(path)
  if fmt == 'torchvision_vgg16':
    return defaults.ssd_config()
  config = base_config()
  if fmt == 'detectron_resnet':
    config.model.backbone.stride_in_1x1 = True
    config.model.pixel_mean, config.model.pixel_std = defaults.DETECTRON_PIXEL_MEAN_RGB, defaults.DETECTRON_PIXEL_STD
  return config


def _pixel_note(fmt: str, config) -> str:
  """A reminder when Detectron weights are imported for a config that normalizes pixels otherwise, else ''."""
  m = config.model
  want = (defaults.DETECTRON_PIXEL_MEAN_RGB, defaults.DETECTRON_PIXEL_STD)
  if fmt != 'detectron_resnet' or (tuple(m.pixel_mean), tuple(m.pixel_std)) == want:
    return ''
  return (
    f'conret-import: note: Detectron weights expect model.pixel_mean={want[0]} and model.pixel_std={want[1]} '
    f'(RGB); this config has {tuple(m.pixel_mean)} and {tuple(m.pixel_std)}'
  )


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes (a missing or unknown flag, a bad choice) are UserErrors: main prints them as one line,
  not argparse's usage line and message."""

  def error(self, message):
    raise UserError(f'{message} (see {self.prog} --help)')


def _parser() -> argparse.ArgumentParser:
  parser = _ArgumentParser(prog='conret-import', description=__doc__.split('\n')[0])
  parser.add_argument('--format', required=True, choices=sorted(IMPORTERS))
  parser.add_argument('--input', required=True, help='.safetensors, .npz, .pth or .pkl (Detectron) weight file')
  parser.add_argument('--output', required=True, help='checkpoint directory to create')
  parser.add_argument('--config', default='', help='config file[:arg] describing the target network')
  parser.add_argument('--debug', action='store_true', help='show the traceback of user errors (also: CONRET_DEBUG=1)')
  return parser


def main(argv=None) -> int:
  """Runs the import; 0 when written, 2 after one line `conret-import: error: ...` on stderr for a user error."""
  argv, args = sys.argv[1:] if argv is None else list(argv), None
  try:
    args = _parser().parse_args(argv)
    config, variables = convert(args)
  except UserError as e:  # every mistake is one line naming the file, not a traceback
    if tool.debug_requested(argv) or (args is not None and args.debug):  # args.debug: argparse takes --deb too
      raise
    print(f'conret-import: error: {e}', file=sys.stderr)
    return 2
  note = _pixel_note(args.format, config)
  if note:
    print(note, file=sys.stderr)
  counts = ', '.join(f'{c}: {count_params(v):,}' for c, v in variables.items())
  print(f'conret-import: wrote {args.output} ({counts})')
  return 0


def convert(args):
  """(config, variables) of the import `args` asks for, written to args.output. Raises UserError: WorkdirError for
  an --output that exists or cannot be written (checked first, in milliseconds), ConfigError, WeightFileError for an
  --input that is missing, damaged, or of another network than the config's."""
  if os.path.exists(args.output):
    raise WorkdirError(f'--output {args.output} already exists; choose a new directory')
  weights.check_output(args.output)
  try:
    config = load_config(args.config) if args.config else default_config(args.format)
  except (OSError, ValueError, TypeError) as e:
    raise ConfigError(f'--config={args.config}: {e}') from None
  state_dict = weights.load_state_dict(args.input)
  try:
    variables = IMPORTERS[args.format](state_dict, config)
  except ValueError as e:
    raise WeightFileError(f'{args.input}: {e}') from None
  weights.save_imported(args.output, variables)
  return config, variables


if __name__ == '__main__':
  sys.exit(main())
