"""RetinaNet vs ConRetinaNet on COCO: the paper's Table 4 (depth x scale) and Table 6 (1.5x with scale jitter).

  conret-import --format=torchvision_resnet --input=resnet50.pth --output=weights/r50     # once: ImageNet weights
  conret-train --config=configs/conretinanet_coco.py:depth=50,scale=500 --config.init_from=weights/r50 --workdir=...
  conret-train --config=configs/conretinanet_coco.py:depth=50,scale=500,consistent=false ...   # the baseline

Arguments: depth (50 | 101), scale (short side: 500 | 800), consistent (true | false), schedule ('1x' | '1.5x';
1.5x adds scale jitter, Table 6), weights ('torchvision' | 'detectron'): the ImageNet weights that
`config.init_from` holds. 'torchvision' (also timm's plain ResNets) puts the stride on the 3x3 conv and normalizes
with ImageNet's RGB mean and std; 'detectron' is the paper's own (Detectron's R-50.pkl / R-101.pkl, imported with
`conret-import --format=detectron_resnet`): stride on the first 1x1, Detectron's pixel means, std 1.
The backbone is frozen BN with the stem and res2 frozen (Detectron), so training needs `config.init_from`.
Data: COCO 2017 train/val, which are the 2014 trainval35k/minival splits the paper uses (point
`config.data.*.data_dir` at a prepared TFDS directory, or use `source=coco_json`).
The paper trains on 8 images per batch (4 GPUs x 2) with Detectron's schedule; here the schedule is Detectron's
1x at global batch 16 (lr 0.01, 90k steps, warm-up 500, decays at 2/3 and 8/9 of the run); a different global batch
scales the learning rate linearly, and `--config.train.num_steps` rescales the whole schedule. Biases follow
Detectron: twice the learning rate, no weight decay.
The paper's numbers are in TABLE4_AP and TABLE6_AP below.
"""

from conret_jax import defaults

# (depth, scale, consistent) -> AP, from Table 4 of the paper (minival).
TABLE4_AP = {
  (50, 500, False): 32.5,
  (50, 500, True): 33.7,
  (50, 800, False): 35.7,
  (50, 800, True): 36.4,
  (101, 500, False): 34.4,
  (101, 500, True): 35.5,
  (101, 800, False): 37.8,
  (101, 800, True): 38.7,
}
# Table 6 (test-dev, 800, 1.5x schedule with scale jitter): ConRetinaNet only.
TABLE6_AP = {50: 37.3, 101: 40.1}


def get_config(arg=None):
  args = defaults.parse_arg(arg, depth=50, scale=500, consistent=True, schedule='1x', weights='torchvision')
  if args.schedule not in ('1x', '1.5x'):
    raise ValueError(f"schedule={args.schedule!r}: expected '1x' or '1.5x'")
  if args.weights not in ('torchvision', 'detectron'):
    raise ValueError(f"weights={args.weights!r}: expected 'torchvision' or 'detectron'")
  config = defaults.base_config()
  config.model.num_classes = 80
  config.model.backbone.depth = args.depth
  config.model.backbone.stride_in_1x1 = args.weights == 'detectron'
  if args.weights == 'detectron':
    config.model.pixel_mean, config.model.pixel_std = defaults.DETECTRON_PIXEL_MEAN_RGB, defaults.DETECTRON_PIXEL_STD
  config.consistent.enabled = args.consistent
  config.data.resize = 'short_side'
  config.data.image_size = args.scale
  config.data.max_size = {500: 833, 800: 1333}.get(args.scale, int(args.scale * 1333 / 800))
  for split, source in (('train', config.data.train), ('val', config.data.eval)):
    source.source = 'tfds'
    source.name = 'coco/2017'
    source.split = 'train' if split == 'train' else 'validation'
  if args.schedule == '1.5x':
    config.train.num_steps = 135_000  # decays at 90k and 120k (2/3, 8/9)
    config.train.warmup_steps = 500  # Detectron warms up for 500 iterations whatever the schedule
    config.data.scale_jitter = (0.8, 1.0)  # short side 640, 672, ..., 800 for scale 800 (Detectron's SCALES)
  config.checkpoint.every_steps = 5000
  config.eval.every_steps = 0
  config.eval.max_detections = 100
  return config
