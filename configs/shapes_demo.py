"""The embedded default: ConRetinaNet on the synthetic shapes dataset, sized for a laptop CPU.

  conret-train --config=configs/shapes_demo.py --workdir=runs/shapes_demo
  conret-train --config=configs/shapes_demo.py:consistent=false --workdir=runs/shapes_retinanet   # baseline

The dataset (overlapping shapes of several classes told apart by form, with inter-class occlusion, the situation
of the paper's Figure 2) is generated on first use into ~/.cache/conret_jax/shapes. A narrow ResNet-18 trained from
scratch with GroupNorm, 256x256 inputs, 4000 training images, 800 steps of batch 16: the whole run, evaluation
included, took under 9 minutes on two CPU cores and reaches AP 72.1 (README; bench/RESULTS.md has the RetinaNet
baseline on the same budget).
"""

from conret_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, consistent=True, steps=800)
  config = defaults.base_config()
  m = config.model
  m.num_classes = 5
  m.backbone.depth = 18
  m.backbone.width = 16
  m.backbone.norm = 'gn'  # from scratch: no ImageNet statistics to freeze
  m.backbone.freeze_at = 0
  m.fpn.channels = 64
  m.head.channels = 64
  m.head.num_convs = 2
  m.head.norm = 'gn'
  config.consistent.enabled = args.consistent

  d = config.data
  d.image_size = 256
  d.resize = 'square'
  d.max_boxes = 16
  d.train = defaults.data_source_config(source='shapes', split='train', num_examples=4000)
  d.eval = defaults.data_source_config(source='shapes', split='val', num_examples=300)

  t = config.train
  t.global_batch_size = 16
  t.num_steps = args.steps
  t.learning_rate = 0.02
  t.warmup_fraction = 1 / 8  # 100 of 800 steps; the schedule follows --config.train.num_steps
  t.decay_fractions = (0.75, 0.92)
  t.weight_decay = 1e-4
  t.grad_clip_norm = 10.0
  t.log_every_steps = 50

  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 2
  config.eval.every_steps = 0
  config.eval.global_batch_size = 16
  config.eval.max_detections = 50
  return config
