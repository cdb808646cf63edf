"""ConSSD on the synthetic shapes dataset, sized for two CPU cores: configs/shapes_demo.py's data, SSD300.

  conret-train --config=configs/ssd_shapes_demo.py --workdir=runs/ssd_shapes_demo
  conret-train --config=configs/ssd_shapes_demo.py:consistent=false --workdir=runs/ssd_shapes   # plain SSD

SSD300 on a narrow ResNet-18 trunk trained from scratch (conv4_x without its stride, width 16; GroupNorm in the trunk
and the extra layers, as the RetinaNet demo has), the default boxes of torchvision's SSD300 (8732), 5 classes, 4000
training images warped to 300 x 300 with SSD's augmentation, 640 steps of batch 16: fewer than the RetinaNet demo's
800, so that a run fits 15 minutes on two cores. Data: configs/shapes_demo.py. What it reaches, and in how long,
over three paired seeds against plain SSD, at 640 and at 800 steps: bench/RESULTS.md, "The SSD shapes demo at 640
steps".
"""

from conret_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, consistent=True, steps=640)
  config = defaults.ssd_config(300)
  m = config.model
  m.num_classes = 5
  s = m.ssd
  s.backbone = 'resnet18'
  s.width_divisor = 4  # width 16, as the RetinaNet demo's ResNet-18
  s.norm = 'gn'  # from scratch: no ImageNet statistics to freeze
  s.extra_norm = 'gn'
  s.freeze_at = 0
  config.consistent.enabled = args.consistent

  d = config.data
  d.image_size = 300
  d.resize = 'stretch'
  d.augment = 'ssd'
  d.random_flip = False  # SSD's augmentation flips itself
  d.max_boxes = 16
  d.train = defaults.data_source_config(source='shapes', split='train', num_examples=4000)
  d.eval = defaults.data_source_config(source='shapes', split='val', num_examples=300)

  t = config.train
  t.global_batch_size = 16
  t.num_steps = args.steps
  t.learning_rate = 0.02
  t.warmup_fraction = 1 / 8  # 80 of 640 steps; the schedule follows --config.train.num_steps
  t.decay_fractions = (0.75, 0.92)
  t.weight_decay = 1e-4
  t.grad_clip_norm = 10.0
  t.log_every_steps = 50

  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 2
  config.eval.every_steps = 0
  config.eval.global_batch_size = 16
  config.eval.max_detections = 100
  return config
