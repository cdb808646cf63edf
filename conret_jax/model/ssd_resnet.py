"""A ResNet as SSD's base network: the layout of NVIDIA's SSD300 v1.1 (DeepLearningExamples PyTorch/Detection/SSD,
ssd/model.py), which MLPerf's SSD-ResNet34 benchmark also follows.

  trunk    the ResNet (torchvision's, model/resnet.py) up to conv4_x (res4, `layer3`), whose first block's stride is
           removed, so conv4_x keeps stride 8: 38 x 38 at 300, 64 x 64 at 512, like VGG's conv4_3. It is the first
           source (1024 channels for ResNet-50, 256 for ResNet-18/34); conv5_x is not used.
  extras   conv 1x1 -> norm -> ReLU -> conv 3x3 -> norm -> ReLU per extra layer, convs without bias (NVIDIA: batch
           norm), with NVIDIA's channels: outputs 512, 512, 256, 256, 256 from 1x1s of 256, 256, 128, 128, 128.
           SSD300: three stride-2 layers, then two unpadded 3x3s: 38 -> 19 -> 10 -> 5 -> 3 -> 1 (six sources, the
           maps of core/default_boxes.SSD300). SSD512 (not in NVIDIA's code; the paper's Table 5 trains an SSD512
           on ResNet-50 without giving its layers): NVIDIA's layers extended the way Caffe's SSD512 extends SSD300,
           five stride-2 layers and a 4x4 one with padding 1: 64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1 (seven sources, the
           maps of core/default_boxes.SSD512), the sixth layer again 256 channels from a 1x1 of 128.

Module names are the ResNet's (conret_jax.weights imports torchvision ResNet weights into the trunk; layer4 and fc
of the file are not used). `width_divisor` divides the trunk's width (64) and every extra layer's channels.
"""

from conret_jax.model import resnet
from conret_jax.model.layers import Compute
from conret_jax.model.ssd_extras import ExtraLayer

DEPTHS = (18, 34, 50)
NUM_STAGES = 3  # res2 .. res4 (layer1 .. layer3)

RESNET_EXTRAS = {
  300: (
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 1, 0),
    ExtraLayer(128, 256, 3, 1, 0),
  ),
  512: (
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 4, 1, 1),
  ),
}


def trunk(depth: int, width_divisor: int, norm: str, freeze_at: int, compute: Compute) -> resnet.ResNet:
  """The ResNet up to conv4_x with that stage's stride removed; returns (C4,) at stride 8."""
  if depth not in DEPTHS:
    raise ValueError(f'an SSD ResNet has depth in {DEPTHS}, got {depth}')
  return resnet.ResNet(
    depth=depth,
    width=64 // width_divisor,
    norm=norm,
    freeze_at=freeze_at,
    compute=compute,
    first_output=4,
    num_stages=NUM_STAGES,
    last_stage_stride=1,
    name='backbone',
  )


def source_size(image_size: int) -> int:
  """The side of conv4_x for a square input: the stem's 7x7 stride-2 conv and 3x3 stride-2 pool, then res3's
  stride-2 3x3 conv (torchvision's padding) -- 300 -> 150 -> 75 -> 38."""
  side = (image_size + 2 * 3 - 7) // 2 + 1
  side = (side + 2 * 1 - 3) // 2 + 1
  return (side + 2 * 1 - 3) // 2 + 1
