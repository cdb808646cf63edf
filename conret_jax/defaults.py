"""The full configuration schema, with RetinaNet/ConRetinaNet defaults.

Every file in `configs/` starts from `base_config()` and overrides what its experiment changes, so every config
carries every key: a typo on the command line (`--config.trian.seed=1`) is an error, not a silently new key.
Defaults follow Detectron's RetinaNet R50-FPN 1x and the paper (Section 6.1: alpha=1, mu_pos=0.6, mu_neg=0.5).
"""

import ml_collections
import numpy as np

from conret_jax.core.constants import BOX_DELTA_CLAMP

# Input normalization of the pretrained weights `conret-import` reads, on the 0..255 RGB scale.
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)  # torchvision / timm: ImageNet mean and std
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
# Detectron's (Caffe2) ResNets: BGR means (102.9801, 115.9465, 122.7717), std 1. The importer turns their first
# conv to RGB input, so the means are given here in RGB order.
DETECTRON_PIXEL_MEAN_RGB = (122.7717, 115.9465, 102.9801)
DETECTRON_PIXEL_STD = (1.0, 1.0, 1.0)


def data_source_config(**overrides) -> ml_collections.ConfigDict:
  """One dataset source; every source carries all fields so any config can point at any dataset."""
  c = ml_collections.ConfigDict()
  c.source = 'shapes'  # 'tfds' | 'coco_json' | 'tfrecord' | 'shapes'
  c.name = 'coco/2017'  # tfds builder name
  c.split = 'train'  # tfds split expression, or shapes split name ('train' / 'val')
  c.data_dir = ''  # tfds data_dir (local or gs://)
  c.annotation_file = ''  # coco_json: instances_*.json
  c.image_dir = ''  # coco_json: folder of the images named in the json
  c.tfrecord_pattern = ''  # tfrecord: files written by conret_jax.data.tfrecord
  c.cache_dir = ''  # shapes: where the synthetic dataset is generated ('' = ~/.cache/conret_jax/shapes)
  c.num_examples = 0  # shapes: images in this split (0 = the shapes default for the split)
  c.update(overrides)
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every key of every config, with its default (one builder per section, below)."""
  config = ml_collections.ConfigDict()
  config.init_from = ''  # weights written by `conret-import` to start from (ImageNet backbone or a whole detector)
  config.model = _model()
  config.loss = _loss()
  config.consistent = _consistent()
  config.data = _data()
  config.train = _train()
  config.checkpoint = _checkpoint()
  config.eval = _eval()
  return config


def _model() -> ml_collections.ConfigDict:
  """config.model: the network, its anchors and box coding."""
  m = ml_collections.ConfigDict()
  # The detector family (conret_jax/detectors.py): 'retinanet' (RetinaNet / ConRetinaNet: the backbone, fpn, head
  # and anchors sections below) | 'ssd' (SSD / ConSSD: the ssd section; start from `ssd_config()`).
  m.family = 'retinanet'
  m.num_classes = 80
  # How class index k maps to the dataset's categories: 'contiguous' (k is the k-th smallest category id) or
  # 'category_id' (k IS the category id; torchvision's 91-way COCO head, num_classes > the largest id).
  m.class_layout = 'contiguous'
  m.compute_dtype = 'float32'  # 'bfloat16' on TPU/GPU; params and losses stay float32
  # Convolution precision: 'default' (the platform's: TF32 for float32 on recent GPUs) | 'high' | 'highest' (full
  # float32, e.g. for parity with a float32 reference).
  m.matmul_precision = 'default'
  # How convolutions reach the compiler: 'auto' (on the CPU backend 'matmul': 1x1 convolutions as matrix products
  # and stride-1 kernel gradients on a pre-padded input, where XLA's kernel gradients are slow; XLA convolutions
  # elsewhere) | 'xla' | 'matmul'. Numerics only: the same convolution up to float summation order
  # (conret_jax/model/conv_lowering.py).
  m.conv_lowering = 'auto'
  m.pixel_mean = IMAGENET_PIXEL_MEAN  # RGB on the [0, 255] scale; must match the pretrained weights
  m.pixel_std = IMAGENET_PIXEL_STD
  # What fills the padding around an image: 'mean' (pixel_mean, zero after normalization: torchvision and Detectron)
  # or 'black' (0, what runs trained before this key existed saw; their saved configs read as 'black').
  m.pad_pixels = 'mean'

  b = m.backbone = ml_collections.ConfigDict()
  b.depth = 50  # 18 | 34 | 50 | 101 | 152
  b.width = 64  # stem channels; stages use width * (1, 2, 4, 8) (x4 for bottlenecks). Tiny test models use 8.
  b.norm = 'frozen_bn'  # 'frozen_bn' | 'bn' (cross-replica under jit: statistics over the global batch) | 'gn'
  b.freeze_at = 2  # 0: train all; 1: freeze stem; 2: stem + res2 (Detectron FREEZE_AT=2); up to 5
  b.stride_in_1x1 = False  # False: torchvision (stride on 3x3); True: Caffe2/Detectron (stride on 1x1)
  # Frozen layers (frozen_bn, or freeze_at > 0) never leave their initial values, so training refuses to start
  # without config.init_from (ImageNet weights). True trains them from their random init all the same.
  b.allow_random_frozen = False

  f = m.fpn = ml_collections.ConfigDict()
  f.channels = 256
  f.min_level = 3
  f.max_level = 7
  f.p6_from = 'c5'  # 'c5' (paper/Detectron) | 'p5' (torchvision)

  h = m.head = ml_collections.ConfigDict()
  h.variant = 'consistent'  # 'consistent' (Fig. 4d) | 'cascade' (Fig. 4b) | 'gated_cascade' (Fig. 4c)
  h.num_convs = 4
  h.channels = 256
  h.norm = ''  # '' | 'gn'
  h.prior_prob = 0.01

  a = m.anchors = ml_collections.ConfigDict()
  a.base_scale = 4.0  # base anchor size = base_scale * stride
  a.scales_per_octave = 3  # scales 2^(i / scales_per_octave)
  a.aspect_ratios = (0.5, 1.0, 2.0)  # height / width
  a.sizes = ()  # explicit sizes per level, e.g. torchvision's ((32, 40, 50), ...); overrides base_scale
  a.offset = 0.5  # anchor centre at (i + offset) * stride; torchvision uses 0.0
  a.round_base = False  # round base anchors to integers (torchvision)

  m.box_weights = (1.0, 1.0, 1.0, 1.0)  # encode/decode weights (wx, wy, ww, wh)
  m.box_clamp = BOX_DELTA_CLAMP
  m.ssd = _ssd()
  return m


def _ssd() -> ml_collections.ConfigDict:
  """config.model.ssd: the SSD family's network and default boxes (model/ssd.py); torchvision's ssd300_vgg16."""
  s = ml_collections.ConfigDict()
  s.image_size = 300  # the fixed square input: 300 (SSD300) | 512 (SSD512); config.data.image_size must equal it
  # Base network: 'vgg16' (conv4_3 + fc7, model/vgg.py) | 'resnet18' | 'resnet34' | 'resnet50' (conv4_x without its
  # stride, NVIDIA's SSD-ResNet: model/ssd_resnet.py).
  s.backbone = 'vgg16'
  s.width_divisor = 1  # every base and extra layer's channels divided by this (narrow demo models); divides 64
  s.norm = ''  # the base network's: '' for vgg16 (it has none); 'frozen_bn' | 'bn' | 'gn' for the ResNets
  s.extra_norm = ''  # the extra layers': '' (biased convs: VGG's) | 'bn' (NVIDIA's ResNet extras) | 'gn'
  # Frozen prefix: vgg16 blocks conv1..conv<k> (0..5; Caffe SSD and torchvision freeze 2 with ImageNet weights);
  # ResNets as model.backbone.freeze_at (1: stem, k: stem + res2..res<k>; 0..4).
  s.freeze_at = 0
  s.allow_random_frozen = False  # frozen layers need config.init_from unless this is True
  # Default-box scales in percent of the image side (core/default_boxes.ssd_scales, Caffe SSD's rule): the first
  # source gets first_ratio, the others min_ratio .. max_ratio in equal integer steps. SSD300: 15, 90, 7
  # (torchvision); SSD512 on COCO: 10, 90, 4 (the SSD paper's footnote).
  s.min_ratio = 15
  s.max_ratio = 90
  s.first_ratio = 7
  s.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))  # per source: a > 1 adds a wide and a tall box each
  s.steps = (8, 16, 32, 64, 100, 300)  # per source: pixels between default-box centres
  s.clip = True  # clamp default boxes' width and height to the image (torchvision's DefaultBoxGenerator)
  return s


def _loss() -> ml_collections.ConfigDict:
  """config.loss: the losses and the matching of stage 1 (RetinaNet's)."""
  lc = ml_collections.ConfigDict()
  lc.focal_alpha = 0.25
  lc.focal_gamma = 2.0
  lc.smooth_l1_beta = 0.11  # Detectron's RetinaNet; 0.0 gives L1 (torchvision)
  lc.box_loss_weight = 1.0
  lc.allow_low_quality_matches = True  # stage 1 only; refined stages match on quality alone
  # SSD's MultiBox loss (conret_jax/multibox.py): hard negatives per positive (3:1), at least this many per image
  # (also without objects), and which negatives a refined stage's term scores: 'per_stage' (its own) | 'stage0'.
  lc.neg_pos_ratio = 3.0
  lc.min_negatives = 0
  lc.refined_negatives = 'per_stage'
  return lc


def _consistent() -> ml_collections.ConfigDict:
  """config.consistent: consistent optimization (the paper, Section 4)."""
  c = ml_collections.ConfigDict()
  c.enabled = True  # False: plain RetinaNet, i.e. one classification and one regression term
  c.num_cls_terms = 2  # Eq. 1 terms: labels of the original anchors, then of each refined stage
  c.num_reg_terms = 2  # Eq. 2 terms; each term beyond the first adds one box conv (footnote 2)
  c.alpha = 1.0  # weight of every refined classification term
  c.pos_iou_thresholds = (0.5, 0.6, 0.7)  # per stage: stage 1 is RetinaNet's 0.5/0.4 (Table 3)
  c.neg_iou_thresholds = (0.4, 0.5, 0.6)
  c.inference_reg_steps = 0  # regressions applied at inference; 0 = all trained ones (Table 3 "2*" = 1)
  return c


def _data() -> ml_collections.ConfigDict:
  """config.data: the input pipeline and its two sources."""
  d = ml_collections.ConfigDict()
  d.image_size = 512  # square: the padded side; short_side: the short side; stretch: the side of the S x S input
  # 'square' (long side to image_size, pad to square) | 'short_side' (Detectron) | 'stretch' (warped to
  # image_size x image_size, aspect not kept, no padding: SSD)
  d.resize = 'square'
  # Training augmentation beyond random_flip and scale_jitter: 'none' | 'ssd' (SSD's photometric distortion,
  # zoom-out onto a pixel_mean canvas, min-IoU crop and its own flip: conret_jax/data/ssd_augment.py; needs
  # resize='stretch', random_flip=False and no scale_jitter).
  d.augment = 'none'
  d.max_size = 1333  # short_side: cap on the long side
  # Training scale jitter (Table 6), (low, high): square: the scale times a random factor in [low, high]; short_side
  # (high <= 1): the short side drawn from image_size - k * 32 within [low, high] * image_size (Detectron).
  d.scale_jitter = (1.0, 1.0)
  d.random_flip = True
  d.max_boxes = 100
  d.shuffle_buffer = 1024
  d.num_parallel_calls = -1  # -1: tf.data AUTOTUNE
  d.prefetch = 2  # batches prefetched to the devices
  d.train = data_source_config(split='train')
  d.eval = data_source_config(split='val')
  return d


def _train() -> ml_collections.ConfigDict:
  """config.train: the optimizer, its schedule and the loop."""
  t = ml_collections.ConfigDict()
  t.global_batch_size = 16
  t.num_steps = 90_000
  t.learning_rate = 0.01  # at reference_batch_size; scaled linearly with global_batch_size
  t.reference_batch_size = 16
  t.momentum = 0.9
  t.weight_decay = 1e-4  # coupled L2 on conv kernels; normalization scales and offsets get none
  t.bias_lr_factor = 2.0  # conv biases: learning rate x this (Detectron's BIAS_DOUBLE_LR; torchvision: 1)
  t.bias_weight_decay = 0.0  # conv biases: weight decay (Detectron: none; torchvision: weight_decay)
  # The schedule follows num_steps: warm-up and decays at fractions of it (Detectron 1x: 500 of 90k steps, decays
  # at 60k and 80k = 2/3 and 8/9). Absolute steps, when given (warmup_steps >= 0, decay_steps non-empty), win.
  t.warmup_fraction = 500 / 90_000
  t.warmup_steps = -1  # -1: round(warmup_fraction * num_steps)
  t.warmup_factor = 1.0 / 3
  t.decay_fractions = (2 / 3, 8 / 9)
  t.decay_steps = ()  # (): round(decay_fractions * num_steps)
  t.decay_factor = 0.1
  t.grad_clip_norm = 0.0  # 0 disables
  t.seed = 0
  t.log_every_steps = 20
  # Non-finite loss or gradient: the step's update is dropped on device; up to this many such steps in a row are
  # skipped (each logged with its step and terms) before training stops. 0: stop at the first.
  t.skip_nonfinite_steps = 0
  t.fsdp_axis_size = 1  # >1 shards params and optimizer state over an 'fsdp' mesh axis
  return t


def _checkpoint() -> ml_collections.ConfigDict:
  """config.checkpoint: when checkpoints are written and how many are kept."""
  k = ml_collections.ConfigDict()
  k.every_steps = 5000
  k.keep = 3
  return k


def _eval() -> ml_collections.ConfigDict:
  """config.eval: evaluation and post-processing."""
  e = ml_collections.ConfigDict()
  e.every_steps = 0  # 0: only at the end of training
  e.at_end = True  # evaluate when training finishes; False leaves it to `conret-eval` (e.g. a separate eval job)
  e.global_batch_size = 8
  e.score_threshold = 0.05
  e.topk_per_level = 1000  # candidates per pyramid level before NMS (RetinaNet's post-processing)
  # > 0: candidates are instead each class's top k over all anchors (torchvision's SSD: 400); 0: per level.
  e.topk_per_class = 0
  e.nms_iou = 0.5
  e.max_detections = 100
  e.num_images = 0  # evaluate only the first N images (0 = all)
  e.visualize = 8  # validation images drawn with their ground truth and detections after each evaluation (0: none)
  e.visualize_score_threshold = 0.3  # detections.png draws detections scoring at least this
  e.coco_backend = 'auto'  # COCO scoring: 'faster_coco_eval' (C++), 'pycocotools', or 'auto' (the first installed)
  return e


def ssd_config(image_size: int = 300) -> ml_collections.ConfigDict:
  """base_config() for the SSD family (model.family='ssd'), SSD300 or SSD512 on COCO: torchvision's ssd300_vgg16
  default boxes at 300, the SSD paper's COCO SSD512 ones at 512 (core/default_boxes.SSD300 / SSD512); SSD's
  matching (0.5 / 0.5, each object's best default box) and Table 3's refined stages (0.6 / 0.5, 0.7 / 0.6:
  multibox.SSD_STAGES); torchvision's SSD box coding (10, 10, 5, 5) and smooth L1 (beta 1); torchvision's SSD
  post-processing (score > 0.01, top 400 per class, NMS 0.45, 200 detections)."""
  config = base_config()
  m = config.model
  m.family = 'ssd'
  s = m.ssd
  s.image_size = image_size
  if image_size == 512:
    s.min_ratio, s.max_ratio, s.first_ratio = 10, 90, 4
    s.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))
    s.steps = (8, 16, 32, 64, 128, 256, 512)
  elif image_size != 300:
    raise ValueError(f'SSD takes 300 or 512, got {image_size}')
  m.box_weights = (10.0, 10.0, 5.0, 5.0)
  c = config.consistent
  c.pos_iou_thresholds = (0.5, 0.6, 0.7)
  c.neg_iou_thresholds = (0.5, 0.5, 0.6)
  config.loss.smooth_l1_beta = 1.0
  config.data.image_size = image_size
  e = config.eval
  e.score_threshold = 0.01
  e.topk_per_class = 400
  e.nms_iou = 0.45
  e.max_detections = 200
  return config


def schedule_steps(train_config: ml_collections.ConfigDict) -> tuple[int, tuple[int, ...]]:
  """(warm-up steps, decay steps) of the run: the absolute values when given, else fractions of num_steps,
  rounded and kept inside the run (a tiny run's last decay lands on its last step rather than after it)."""
  t = train_config
  n = int(t.num_steps)
  inside = lambda f, low: min(max(int(round(float(f) * n)), low), max(n - 1, low))
  warmup = int(t.warmup_steps) if int(t.warmup_steps) >= 0 else inside(t.warmup_fraction, 0)
  if len(t.decay_steps):
    decays = tuple(int(b) for b in t.decay_steps)
  else:
    decays = tuple(inside(f, 1) for f in t.decay_fractions)
  return warmup, decays


def learning_rate(train_config: ml_collections.ConfigDict, step, xp=np):
  """The rate of the schedule at `step`: linear warm-up from `warmup_factor`, then x`decay_factor` at each decay
  step, on `learning_rate` scaled linearly with the global batch. `xp`: numpy, or jax.numpy inside the step (one
  formula for the step and for the messages about a run's schedule)."""
  t = train_config
  base = t.learning_rate * t.global_batch_size / t.reference_batch_size
  warmup, boundaries = schedule_steps(t)
  step = xp.asarray(step, xp.float32)
  if warmup > 0:
    progress = xp.minimum(step / warmup, 1.0)
    factor = t.warmup_factor * (1.0 - progress) + progress
  else:
    factor = xp.ones_like(step)
  for boundary in boundaries:
    factor = factor * xp.where(step >= boundary, t.decay_factor, 1.0)
  return base * factor


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's argument string, `configs/x.py:depth=101,scale=800`, into typed values.

  Each key must be one of `defaults`; values take the type of their default (bools accept true/false/1/0).
  """
  result = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'config argument {item!r}: expected key=value with key in {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key}={value!r}: expected true or false')
      result[key] = value.lower() in ('true', '1')
    else:
      try:
        result[key] = kind(value)
      except ValueError:
        raise ValueError(f'config argument {key}={value!r}: expected {kind.__name__}') from None
  return ml_collections.ConfigDict(result)
