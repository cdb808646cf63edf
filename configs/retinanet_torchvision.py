"""torchvision's retinanet_resnet50_fpn (v1) as a conret_jax config: the architecture and post-processing of the
published COCO model, so `conret-import --format torchvision_retinanet` weights give torchvision's detections.

  ResNet-50 (stride on the 3x3), frozen BN, torchvision's trainable_backbone_layers=3 (stem + res2 frozen);
  FPN P3-P7 with P6 from P5; 4-conv towers without norm; 91 classes whose index IS the COCO category id
  (model.class_layout='category_id'; 0 = background);
  anchors 32..812 px (3 sizes per level x ratios 0.5/1/2), centred at i * stride (offset 0), rounded base anchors;
  box weights (1, 1, 1, 1); matching 0.5 / 0.4 with low-quality matches; L1 box loss; plain RetinaNet.
  Inference: score > 0.05, top 1000 per level, class-aware NMS 0.5, 300 detections.
  Data: torchvision resizes the short side to 800 (long side <= 1333); COCO 2017 from TFDS by default.
  Training (torchvision's recipe): biases like weights (lr x 1, weight decay 1e-4).

Score published weights without training: with no checkpoint in the workdir, conret-eval evaluates config.init_from:
  conret-import --format=torchvision_retinanet --input=retinanet_resnet50_fpn_coco.pth --output=weights/tv_retinanet
  conret-eval --config=configs/retinanet_torchvision.py --config.init_from=weights/tv_retinanet --workdir=runs/tv \
      --config.data.eval.data_dir=/data/tensorflow_datasets
"""

from conret_jax.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  m = config.model
  m.num_classes = 91
  m.class_layout = 'category_id'  # class k is COCO category k (0 and the unused ids are never a dataset class)
  m.pixel_mean = (123.675, 116.28, 103.53)  # ImageNet mean/std on the 0..255 scale (torchvision's 0..1 values x 255)
  m.pixel_std = (58.395, 57.12, 57.375)
  m.backbone.depth = 50
  m.backbone.width = 64
  m.backbone.norm = 'frozen_bn'
  m.backbone.freeze_at = 2
  m.backbone.stride_in_1x1 = False
  m.fpn.channels = 256
  m.fpn.min_level, m.fpn.max_level = 3, 7
  m.fpn.p6_from = 'p5'
  m.head.variant = 'consistent'  # with consistent.enabled=False: one class conv, one box conv (plain RetinaNet)
  m.head.num_convs = 4
  m.head.channels = 256
  m.head.norm = ''
  m.head.prior_prob = 0.01
  m.anchors.sizes = ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
  m.anchors.aspect_ratios = (0.5, 1.0, 2.0)
  m.anchors.offset = 0.0
  m.anchors.round_base = True
  m.box_weights = (1.0, 1.0, 1.0, 1.0)

  config.consistent.enabled = False
  config.loss.smooth_l1_beta = 0.0  # L1
  config.train.bias_lr_factor = 1.0  # torchvision's recipe: biases train like weights
  config.train.bias_weight_decay = config.train.weight_decay
  config.loss.allow_low_quality_matches = True
  # Stage 1 matching is consistent.pos/neg_iou_thresholds[0] = 0.5 / 0.4 (the defaults).

  config.data.resize = 'short_side'
  config.data.image_size = 800
  config.data.max_size = 1333
  for source, split in ((config.data.train, 'train'), (config.data.eval, 'validation')):
    source.source, source.name, source.split = 'tfds', 'coco/2017', split

  e = config.eval
  e.score_threshold = 0.05
  e.topk_per_level = 1000
  e.nms_iou = 0.5
  e.max_detections = 300
  return config
