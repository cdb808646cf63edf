"""`conret-make-shapes --output DIR --num_train N --num_val M --seed S`: writes the synthetic shapes dataset.

Layout (COCO): DIR/train/*.jpg, DIR/val/*.jpg, DIR/annotations/instances_{train,val}.json. Use it with
`--config.data.train.source=coco_json --config.data.train.annotation_file=DIR/annotations/instances_train.json
 --config.data.train.image_dir=DIR/train` (same for eval with val), or let source 'shapes' generate into its cache.
"""

import argparse
import os

from conret_jax.data import shapes


def main(argv=None):
  parser = argparse.ArgumentParser(prog='conret-make-shapes', description=__doc__.splitlines()[0])
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument(
    '--num_train', '--num-train', type=int, default=shapes.DEFAULT_NUM_EXAMPLES['train'], help='training images'
  )
  parser.add_argument(
    '--num_val', '--num-val', type=int, default=shapes.DEFAULT_NUM_EXAMPLES['val'], help='validation images'
  )
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    parser.error(f'--output={args.output} is a file, not a directory')
  if min(args.num_train, args.num_val) < 1:
    parser.error('--num_train and --num_val must be at least 1')
  paths = shapes.generate(args.output, args.num_train, args.num_val, args.seed)
  for split, path in paths.items():
    print(f'{split}: {path}')


if __name__ == '__main__':
  main()
