"""`conret-make-shapes --output DIR --num-train N --num-val M --seed S`: writes the synthetic shapes dataset.

Layout (COCO): DIR/train/*.jpg, DIR/val/*.jpg, DIR/annotations/instances_{train,val}.json. Use it with
`--config.data.train.source=coco_json --config.data.train.annotation_file=DIR/annotations/instances_train.json
 --config.data.train.image_dir=DIR/train` (same for eval with val), or let source 'shapes' generate into its cache.
"""

import argparse

from conret_jax.data import shapes


def main(argv=None):
  parser = argparse.ArgumentParser(prog='conret-make-shapes', description=__doc__.splitlines()[0])
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('--num-train', type=int, default=shapes.DEFAULT_NUM_EXAMPLES['train'])
  parser.add_argument('--num-val', type=int, default=shapes.DEFAULT_NUM_EXAMPLES['val'])
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  paths = shapes.generate(args.output, args.num_train, args.num_val, args.seed)
  for split, path in paths.items():
    print(f'{split}: {path}')


if __name__ == '__main__':
  main()
