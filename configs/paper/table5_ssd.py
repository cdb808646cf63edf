"""Table 5 of the paper: SSD512 with and without consistent optimization, VGG-16 and ResNet-50, COCO minival.

  conret-import --format=torchvision_vgg16 --input=vgg16.pth --output=weights/vgg16_ssd \
      --config=configs/paper/table5_ssd.py:backbone=vgg16                            # once: ImageNet weights
  conret-train --config=configs/paper/table5_ssd.py:backbone=vgg16,consistent=true \
      --config.init_from=weights/vgg16_ssd --workdir=...
  conret-import --format=torchvision_resnet --input=resnet50.pth --output=weights/r50   # for backbone=resnet50

Arguments: backbone ('vgg16' | 'resnet50'), consistent (true | false), weights (vgg16 only: 'torchvision', the
IMAGENET1K_V1 classifier weights, normalized with ImageNet's mean and std, fc6 / fc7 subsampled from its classifier;
or 'features', torchvision's IMAGENET1K_FEATURES port of the SSD authors' VGG-16, normalized as torchvision's SSD:
x - 255 * (0.48235, 0.45882, 0.40784)). The paper (Section 6.4) re-implements SSD512 in PyTorch from torchvision's
ImageNet models without giving its recipe; this config takes torchvision's SSD recipe (configs/ssd300_torchvision.py:
SSD augmentation, batch 32, lr 0.002, 120 epochs) at 512 with the SSD paper's COCO SSD512 default boxes
(core/default_boxes.SSD512). VGG-16: conv1 and conv2 frozen (Caffe SSD; torchvision's recipe freezes conv1 only).
ResNet-50: NVIDIA's SSD-ResNet layout (model/ssd_resnet.py) with frozen batch norm and the stem and res2 frozen
(Detectron's fine-tuning, as the RetinaNet configs), extra layers with batch norm (NVIDIA's). Both need
`config.init_from`.
Consistent optimization: two classification and two regression terms, alpha 1, refined stage 0.6 / 0.5.
The paper's AP / AP50 / AP75 are in PAPER below (SSD_PAPER: SSD512 as Liu et al. report it, the table's first row).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ssd300_torchvision  # noqa: E402  (configs/ is not a package; big_vision-style sibling import)

from conret_jax import defaults  # noqa: E402

PAPER = {
  ('vgg16', False): (28.9, 47.9, 30.6),
  ('vgg16', True): (30.5, 49.6, 31.7),
  ('resnet50', False): (30.6, 50.0, 32.2),
  ('resnet50', True): (31.9, 51.0, 33.8),
}
SSD_PAPER = (28.8, 48.5, 30.3)
SSD_FEATURES_MEAN = tuple(255 * v for v in (0.48235, 0.45882, 0.40784))


def get_config(arg=None):
  args = defaults.parse_arg(arg, backbone='vgg16', consistent=True, weights='torchvision')
  if (args.backbone, True) not in PAPER:
    raise ValueError(f"backbone={args.backbone!r}: expected 'vgg16' or 'resnet50'")
  if args.weights not in ('torchvision', 'features') or (args.weights == 'features' and args.backbone != 'vgg16'):
    raise ValueError(f"weights={args.weights!r}: expected 'torchvision', or 'features' with backbone=vgg16")
  config = defaults.ssd_config(512)
  m = config.model
  m.num_classes = 80
  s = m.ssd
  s.backbone = args.backbone
  s.freeze_at = 2
  if args.backbone == 'resnet50':
    s.norm, s.extra_norm = 'frozen_bn', 'bn'
  if args.weights == 'features':
    m.pixel_mean, m.pixel_std = SSD_FEATURES_MEAN, (1.0, 1.0, 1.0)
  config.consistent.enabled = args.consistent
  ssd300_torchvision.coco_data(config)
  ssd300_torchvision.torchvision_training(config)
  config.eval.global_batch_size = 16
  return config
