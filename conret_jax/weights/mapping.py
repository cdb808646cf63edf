"""Filling a model's variables from a named state dict, checked: the machinery every importer of conret_jax.weights
shares (each format brings its own names).

  target = target_shapes(config)          {collection: tree of ShapeDtypeStruct} of the config's network
  variables = fill(target, key_fn, state_dict, ignore, derive=None)

Every leaf of the target must find its state-dict entry with its shape (conv kernels transposed from torch's
[O, I, kh, kw] to flax's [kh, kw, I, O]) and every entry not ignored must be used, or ValueError names them.
"""

import jax
import numpy as np

from conret_jax import detectors


def target_shapes(config) -> dict:
  detector = detectors.from_config(config)
  hw = detector.input_size.smallest()
  return jax.eval_shape(lambda: detectors.init_variables(detector.module, jax.random.key(0), hw))


def backbone_target(config) -> dict:
  """{collection: {'backbone': tree of ShapeDtypeStruct}}: what a backbone import fills (ImageNet weights)."""
  return {c: {'backbone': tree['backbone']} for c, tree in target_shapes(config).items() if 'backbone' in tree}


def torch_to_flax(key: str, arr: np.ndarray, names: tuple, want: tuple) -> np.ndarray:
  """`arr` (torch layout: conv kernels [O, I, kh, kw]) as the leaf at `names` of shape `want`, or ValueError."""
  if names[-1] == 'kernel':
    want_torch = (want[3], want[2], want[0], want[1])
    if arr.shape != want_torch:
      raise ValueError(f'{key}: shape {arr.shape}, expected {want_torch} (for {"/".join(names)})')
    return arr.transpose(2, 3, 1, 0)
  if arr.shape != want:
    raise ValueError(f'{key}: shape {arr.shape}, expected {want} (for {"/".join(names)})')
  return arr


def fill(target: dict, key_fn, state_dict: dict, ignore, derive=None) -> dict:
  """Map every leaf of `target` ({collection: tree of ShapeDtypeStruct}) to its state-dict entry, checked.

  `derive(path, leaf)`, when given, supplies the leaves a format does not store: it returns their array, or None
  for a leaf to be looked up by `key_fn` as usual (`path` is without the collection, like key_fn's).
  """
  sd = {k: v for k, v in state_dict.items() if not ignore(k)}
  used, missing, unmapped, out = set(), [], [], {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = tuple(p.key for p in path)
    arr = None if derive is None else derive(names[1:], leaf)
    if arr is None:
      key = key_fn(names[1:])
      if key is None:
        unmapped.append('/'.join(names))
        continue
      if key not in sd:
        missing.append(key)
        continue
      arr = torch_to_flax(key, np.asarray(sd[key]), names, tuple(leaf.shape))
      used.add(key)
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.ascontiguousarray(arr, dtype=np.float32)
  unexpected = sorted(set(sd) - used)
  problems = []
  if unexpected:
    problems.append(f"unexpected keys (no counterpart in the config's model): {unexpected[:8]}")
  if missing:
    problems.append(f'missing keys: {missing[:8]}')
  if unmapped:
    problems.append(f'model variables with no counterpart in this format: {unmapped[:8]}')
  if problems:
    raise ValueError('; '.join(problems) + (f' ({len(unexpected)} unexpected, {len(missing)} missing in all)'))
  return out


def tracked(k: str) -> bool:
  return k.endswith('num_batches_tracked')
