"""Readers of pretrained-weight files: each returns {name: np.ndarray}. Nothing is downloaded; the user names a file.

  .safetensors  read with the `safetensors` package when installed, else with a small NumPy reader (the format is
                an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data)
  .npz          numpy
  .pth / .pt    needs torch; loaded with torch.load(weights_only=True) (no pickle code execution)
  .pkl          Detectron (Caffe2) weight pickles such as the ImageNet R-50.pkl / R-101.pkl, written by Python 2: a
                dict name -> array, possibly nested under 'blobs' (next to a 'cfg' string) and holding '*_momentum'
                blobs (dropped). Read with a restricted unpickler that can only rebuild NumPy arrays and dtypes out
                of dicts, lists, tuples, strings and numbers: any other global the pickle names (os.system,
                builtins.eval, a class) is refused with an error naming it, before anything is called.

Every reader raises FileNotFoundError naming the path when there is no such file, and ValueError (naming the path)
when the file is not of its format.
"""

import importlib
import json
import os
import pickle
import struct

import numpy as np

# ---------------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
  'F64': '<f8',
  'F32': '<f4',
  'F16': '<f2',
  'I64': '<i8',
  'I32': '<i4',
  'I16': '<i2',
  'I8': 'i1',
  'U8': 'u1',
  'BOOL': '?',
  'BF16': '<u2',
}


def read_safetensors(path: str) -> dict:
  """{name: np.ndarray} from a .safetensors file, with NumPy only (BF16 is widened to float32)."""
  with open(path, 'rb') as f:
    data = f.read()
  (n,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8 : 8 + n])
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _ST_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    dtype = np.dtype(_ST_DTYPES[info['dtype']])
    begin, end = info['data_offsets']
    count = int(np.prod(info['shape'], dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ValueError(f'{path}: tensor {name!r} has {end - begin} bytes for shape {info["shape"]}')
    arr = np.frombuffer(data, dtype, count, offset=8 + n + begin).reshape(info['shape'])
    if info['dtype'] == 'BF16':
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out[name] = arr
  return out


# ---------------------------------------------------------------------------------------------------- torch


def _load_torch(path: str) -> dict:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path}: .pth files need torch; convert to .safetensors or .npz, or install torch') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('model', 'state_dict'):  # training checkpoints nest the state dict
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items() if hasattr(v, 'numpy')}


# ---------------------------------------------------------------------------------------------------- pickles


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` as protocol-2 pickles use it, to carry bytes as a latin-1 str; other codecs are refused."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise pickle.UnpicklingError(
      f'refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text '
      f'(how pickles carry bytes) is decoded'
    )
  return text.encode('latin1')


def _array_global(module: str, name: str):
  """The object for an allowed pickle global, or None. Only what rebuilding NumPy arrays, dtypes and scalars needs:
  numpy.ndarray, numpy.dtype, <numpy core>.multiarray._reconstruct / .scalar (protocol <= 4), <numpy core>.numeric.
  _frombuffer (protocol 5), and _codecs.encode limited to latin1. <numpy core> is numpy.core (NumPy 1, and every
  Python 2 pickle) or numpy._core (NumPy 2); both resolve to the installed NumPy's module."""
  if module == 'numpy' and name in ('ndarray', 'dtype'):
    return getattr(np, name)
  if module == '_codecs' and name == 'encode':
    return _latin1_encode
  allowed = {'multiarray': ('_reconstruct', 'scalar'), 'numeric': ('_frombuffer',)}
  for core in ('numpy.core.', 'numpy._core.'):
    sub = module[len(core) :] if module.startswith(core) else None
    if name in allowed.get(sub, ()):
      return getattr(_numpy_core(sub), name)
  return None


def _numpy_core(sub: str):
  try:
    return importlib.import_module('numpy._core.' + sub)  # NumPy 2 (importing numpy.core.* warns there)
  except ImportError:
    return importlib.import_module('numpy.core.' + sub)


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler whose only globals are those of `_array_global`; it never imports a module the pickle names."""

  def find_class(self, module, name):
    found = _array_global(module, name)
    if found is None:
      raise pickle.UnpicklingError(
        f'refused global {module}.{name}: a weight pickle may only hold NumPy arrays '
        f'in dicts, lists and tuples (nothing in the file was run)'
      )
    return found


def read_array_pickle(path: str) -> dict:
  """{name: np.ndarray} from a Detectron-style weight pickle (Python 2 or 3), loaded with `_ArrayUnpickler`.

  Unwraps a top-level 'blobs' dict (Detectron's saved models keep 'cfg' beside it), drops '*_momentum' blobs (SGD
  state) and None values (Detectron stores some preserved blobs as None). Raises ValueError naming the path for a
  refused global, an unreadable pickle, or a value that is not a numeric array.
  """
  with open(path, 'rb') as f:
    try:
      obj = _ArrayUnpickler(f, encoding='latin1').load()  # latin1: Python 2 str -> array bytes, as NumPy documents
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise ValueError(f'{path}: not a weight pickle this reader accepts: {e}') from e
  if isinstance(obj, dict) and isinstance(obj.get('blobs'), dict):
    obj = obj['blobs']
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a dict of arrays (or {{"blobs": dict}}), found {type(obj).__name__}')
  out = {}
  for name, value in obj.items():
    if str(name).endswith('_momentum') or value is None:
      continue
    arr = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else None
    if arr is None or arr.dtype.kind not in 'biuf':
      kind = type(value).__name__ if arr is None else f'array of {arr.dtype}'
      raise ValueError(f'{path}: blob {name!r} is a {kind}, not a numeric array')
    out[str(name)] = arr
  return out


# ---------------------------------------------------------------------------------------------------- dispatch


def load_state_dict(path: str) -> dict:
  """{name: np.ndarray} from .safetensors, .npz, .pth/.pt/.bin (torch) or .pkl (Detectron), by extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.safetensors', '.npz', '.pth', '.pt', '.bin', '.pkl'):
    raise ValueError(f'{path}: unknown weight file type {ext!r} (expected .safetensors, .npz, .pth, .pkl)')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if ext == '.safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError:
      return read_safetensors(path)
    return {k: np.asarray(v) for k, v in load_file(path).items()}
  if ext == '.npz':
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if ext == '.pkl':
    return read_array_pickle(path)
  return _load_torch(path)
