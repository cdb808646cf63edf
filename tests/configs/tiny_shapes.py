"""The demo (configs/shapes_demo.py) shrunk for tests that run the real command-line tools: a width-8 ResNet-18,
16-channel FPN (P3-P5) and head, 128x128 inputs, a few dozen synthetic images.

  --config=tests/configs/tiny_shapes.py:steps=8,batch=4,train_images=48,eval_images=8,cache=/tmp/shapes
"""

import os
import sys

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')
)
import shapes_demo  # noqa: E402  (configs/ is not a package)

from conret_jax import defaults  # noqa: E402


def get_config(arg=None):
  args = defaults.parse_arg(arg, steps=8, batch=4, train_images=48, eval_images=8, cache='')
  c = shapes_demo.get_config(f'steps={args.steps}')
  c.model.backbone.width = 8
  c.model.fpn.channels = 16
  c.model.fpn.max_level = 5  # P3-P5: two fewer levels to trace and compile (P6-P7: tests/model)
  c.model.head.channels = 16
  c.model.head.num_convs = 1
  c.data.image_size = 128
  for source, n in ((c.data.train, args.train_images), (c.data.eval, args.eval_images)):
    source.num_examples = n
    source.cache_dir = args.cache
  c.train.global_batch_size = args.batch
  c.train.warmup_steps = 2
  c.train.log_every_steps = 1
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 2
  c.eval.global_batch_size = args.batch
  c.eval.visualize = 2
  c.eval.topk_per_level = 50
  c.eval.max_detections = 10
  c.eval.score_threshold = 0.0  # a few steps leave every score below the default 0.05: evaluate real boxes anyway
  return c
