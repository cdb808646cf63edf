"""torchvision's ssd300_vgg16 as a conret_jax config: the architecture, pre- and post-processing of the published
COCO model, so `conret-import --format torchvision_ssd` weights give torchvision's detections.

  VGG-16 base (conv4_3 L2-normalized, pool5 3x3/1, fc6 dilated 6, fc7), torchvision's extra layers conv8_2-conv11_2;
  6 sources, 8732 default boxes (scales 0.07 .. 1.05, ratios 2 / 2,3, steps 8 .. 300, clipped);
  91 classes whose index IS the COCO category id (model.class_layout='category_id'; the import gives class 0, which
  no category has, a unit that never scores); plain SSD; box weights (10, 10, 5, 5).
  Pre-processing (SSD's GeneralizedRCNNTransform with fixed_size=(300, 300)): the image warped to 300 x 300, then
  (x / 255 - (0.48235, 0.45882, 0.40784)) / (1 / 255), i.e. x - 255 * mean on the 0..255 scale.
  Post-processing (SSD.postprocess_detections): softmax, per class the scores > 0.01 and their top 400, class-aware
  NMS 0.45, 200 detections.
  Training (torchvision's references/detection recipe for ssd300_vgg16): SSD augmentation, batch 32, lr 0.002,
  momentum 0.9, weight decay 5e-4 on kernels and biases, 120 epochs of COCO with decays at 80 and 110, a 1000-step
  linear warm-up from 0.001; conv1 frozen (trainable_backbone_layers=4 freezes the VGG features before the first
  max-pool), so training needs init_from.

Score the published weights without training (with no checkpoint in the workdir, conret-eval evaluates init_from):
  conret-import --format=torchvision_ssd --input=ssd300_vgg16_coco-b556d3b4.pth --output=weights/tv_ssd300
  conret-eval --config=configs/ssd300_torchvision.py --config.init_from=weights/tv_ssd300 --workdir=runs/tv_ssd \
      --config.data.eval.data_dir=/data/tensorflow_datasets
"""

from conret_jax import defaults

COCO_TRAIN_IMAGES = 117_266  # torchvision's COCO train2017 after removing images without annotations
EPOCH_STEPS = COCO_TRAIN_IMAGES // 32


def get_config(arg=None):
  del arg
  config = defaults.ssd_config(300)
  m = config.model
  m.num_classes = 91
  m.class_layout = 'category_id'  # class k is COCO category k, torchvision's label k
  m.pixel_mean = tuple(255 * v for v in (0.48235, 0.45882, 0.40784))
  m.pixel_std = (1.0, 1.0, 1.0)
  m.ssd.backbone = 'vgg16'
  m.ssd.freeze_at = 1
  config.consistent.enabled = False
  coco_data(config)
  torchvision_training(config)
  return config


def coco_data(config) -> None:
  """COCO 2017 from TFDS, SSD's warp to image_size x image_size and SSD's augmentation in training."""
  d = config.data
  d.image_size = config.model.ssd.image_size
  d.resize = 'stretch'
  d.augment = 'ssd'
  d.random_flip = False  # SSD's augmentation flips itself
  for source, split in ((d.train, 'train'), (d.eval, 'validation')):
    source.source, source.name, source.split = 'tfds', 'coco/2017', split


def torchvision_training(config) -> None:
  """torchvision's SSD recipe (module docstring): batch 32, lr 0.002, 120 epochs, decays at 80 and 110."""
  t = config.train
  t.global_batch_size = 32
  t.reference_batch_size = 32
  t.learning_rate = 0.002
  t.momentum = 0.9
  t.weight_decay = 5e-4
  t.bias_lr_factor = 1.0
  t.bias_weight_decay = t.weight_decay
  t.num_steps = 120 * EPOCH_STEPS
  t.decay_steps = (80 * EPOCH_STEPS, 110 * EPOCH_STEPS)
  t.warmup_steps = 1000
  t.warmup_factor = 0.001
  config.checkpoint.every_steps = 5 * EPOCH_STEPS
