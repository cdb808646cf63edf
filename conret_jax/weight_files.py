"""Readers of pretrained-weight files: each returns {name: np.ndarray}. Nothing is downloaded; the user names a file.

  .safetensors  a NumPy reader (the format is an 8-byte little-endian header length, a JSON header {name: {dtype,
                shape, data_offsets}}, the data). The header is checked against the file before any tensor is read.
  .npz          numpy (allow_pickle=False), after every member of the zip archive is checked against its CRC
  .pth / .pt    (and .bin) need torch; loaded with torch.load(weights_only=True) (torch's restricted unpickler: no
                pickle code execution). The container is checked first, without torch: a complete zip archive
                holding a data.pkl (torch >= 1.6), or torch's legacy format.
  .pkl          Detectron (Caffe2) weight pickles such as the ImageNet R-50.pkl / R-101.pkl, written by Python 2: a
                dict name -> array, possibly nested under 'blobs' (next to a 'cfg' string) and holding '*_momentum'
                blobs (dropped). Read with a restricted unpickler that can only rebuild NumPy arrays and dtypes out
                of dicts, lists, tuples, strings and numbers: any other global the pickle names (os.system,
                builtins.eval, a class) is refused with an error naming it, before anything is called, and so is a
                BUILD (set-state) opcode aimed at an allowed global rather than at an object the pickle rebuilt.

Every reader raises WeightFileError (a ValueError) naming the path: WeightFileNotFoundError (also a
FileNotFoundError) when there is no such file, '<path> is damaged: <what>' when the bytes contradict their format
(cut short, a header that disagrees with the data), and a message naming the problem for a file of another kind.
"""

import importlib
import json
import math
import os
import pickle
import struct
import tarfile
import zipfile
import zlib

import numpy as np

from conret_jax.errors import WeightFileError, WeightFileNotFoundError


def _damaged(path: str, what: str) -> WeightFileError:
  return WeightFileError(f'{path} is damaged: {what}')


def _numeric_arrays(path: str, items, what: str) -> dict:
  """{str(name): array} of `items`, or WeightFileError naming the first value that is not a numeric NumPy array."""
  out = {}
  for name, value in items:
    arr = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else None
    if arr is None or arr.dtype.kind not in 'biuf':
      kind = type(value).__name__ if arr is None else f'array of {arr.dtype}'
      raise WeightFileError(f'{path}: {what} {name!r} is a {kind}, not a numeric array')
    out[str(name)] = arr
  return out


# ---------------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
  'F64': '<f8',
  'F32': '<f4',
  'F16': '<f2',
  'I64': '<i8',
  'I32': '<i4',
  'I16': '<i2',
  'I8': 'i1',
  'U64': '<u8',
  'U32': '<u4',
  'U16': '<u2',
  'U8': 'u1',
  'BOOL': '?',
  'BF16': '<u2',
}


def _sizes(value) -> bool:
  """Whether a JSON value is a list of non-negative integers (JSON's true and false are not sizes)."""
  return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _safetensors_layout(path: str, header: bytes, data_size: int) -> dict:
  """{name: (dtype code, shape, begin, end)} of a .safetensors header, checked against the `data_size` bytes of data
  that follow it: every entry has a known dtype, a shape of sizes and data_offsets [begin, end] inside the data
  holding exactly shape x dtype size bytes, and the tensors tile the data with no gap or overlap (the format allows
  neither, and a tensor read from bytes that are not its own is garbage that no later check would notice).
  Raises WeightFileError naming the first problem.
  """
  try:
    entries = json.loads(header.decode('utf-8'))
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
    raise _damaged(path, f'its {len(header)}-byte header is not JSON ({e})') from None
  if not isinstance(entries, dict):
    raise _damaged(path, f'its header is a JSON {type(entries).__name__}, not an object of tensors')
  layout = {}
  for name, info in entries.items():
    if name == '__metadata__':
      continue
    where = f'tensor {name!r}'
    if not isinstance(info, dict):
      raise _damaged(path, f'{where} is described by a {type(info).__name__}, not an object')
    for key in ('dtype', 'shape', 'data_offsets'):
      if key not in info:
        raise _damaged(path, f'{where} has no {key!r}')
    code, shape, offsets = info['dtype'], info['shape'], info['data_offsets']
    if not isinstance(code, str) or code not in _ST_DTYPES:
      raise WeightFileError(f'{path}: {where} has unsupported dtype {code}')
    if not _sizes(shape):
      raise _damaged(path, f'{where} has shape {shape!r}, not a list of sizes')
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] <= data_size):
      raise _damaged(path, f'{where} has data_offsets {offsets!r}, not a range inside the {data_size} bytes of data')
    begin, end = offsets
    want = math.prod(shape) * np.dtype(_ST_DTYPES[code]).itemsize
    if end - begin != want:
      raise _damaged(path, f'{where} has {end - begin} bytes of data, but shape {shape} of {code} needs {want}')
    layout[name] = (code, tuple(shape), begin, end)
  position, previous = 0, None
  for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: item[1][2:]):
    if begin < position:
      raise _damaged(path, f'tensors {previous!r} and {name!r} overlap (bytes {begin} to {position} of the data)')
    if begin > position:
      raise _damaged(path, f'bytes {position} to {begin} of the data belong to no tensor')
    position, previous = end, name
  if position != data_size:
    raise _damaged(path, f'the last {data_size - position} bytes of the data belong to no tensor')
  return layout


def read_safetensors(path: str) -> dict:
  """{name: np.ndarray} from a .safetensors file, with NumPy only (BF16 is widened to float32), after
  `_safetensors_layout` has checked the header against the file."""
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise _damaged(path, f'{len(data)} bytes, fewer than the 8-byte header length a .safetensors file starts with')
  (n,) = struct.unpack('<Q', data[:8])
  if n > len(data) - 8:
    raise _damaged(path, f'header length {n} runs past the end of the {len(data)}-byte file')
  start = 8 + n
  out = {}
  for name, (code, shape, begin, _) in _safetensors_layout(path, data[8:start], len(data) - start).items():
    arr = np.frombuffer(data, _ST_DTYPES[code], math.prod(shape), offset=start + begin).reshape(shape)
    if code == 'BF16':
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out[name] = arr
  return out


# ---------------------------------------------------------------------------------------------------- zip archives


def _zip_members(path: str, kind: str) -> list:
  """The member names of the zip archive at `path` (`kind` names the format, for messages), once every member has
  been read against its CRC; WeightFileError (damaged) for an archive that is cut short or corrupt."""
  if not zipfile.is_zipfile(path):
    raise _damaged(path, f'no zip directory at its end: {kind} is a zip archive, and this one is cut short or not one')
  try:
    with zipfile.ZipFile(path) as archive:
      bad = archive.testzip()
      names = archive.namelist()
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise _damaged(path, f'its zip archive is unreadable ({e})') from None
  if bad is not None:
    raise _damaged(path, f'member {bad} of its zip archive is corrupt (wrong CRC or header)')
  return names


def read_npz(path: str) -> dict:
  """{name: np.ndarray} from an .npz, after `_zip_members` has checked the archive."""
  _zip_members(path, 'an .npz')
  items = []
  with np.load(path) as f:  # allow_pickle=False (NumPy's default): an object array is refused, not unpickled
    for name in f.files:
      try:
        items.append((name, f[name]))
      except (ValueError, EOFError, OSError) as e:
        raise WeightFileError(f'{path}: cannot read array {name!r} ({e})') from None
  return _numeric_arrays(path, items, 'member')


# ---------------------------------------------------------------------------------------------------- torch


def _check_torch_file(path: str) -> None:
  """WeightFileError unless `path` is laid out as torch.save writes: a complete zip archive with a data.pkl (torch
  >= 1.6), or torch's legacy format, a pickle (of a magic number first) or, oldest, a tar archive. Needs no torch."""
  with open(path, 'rb') as f:
    head = f.read(2)
  if head == b'PK':
    if not any(name.rpartition('/')[2] == 'data.pkl' for name in _zip_members(path, 'a torch file')):
      raise WeightFileError(f'{path}: a zip archive without data.pkl, not a file written by torch.save')
  elif head[:1] != pickle.PROTO and not tarfile.is_tarfile(path):
    raise _damaged(path, "it is neither a zip archive (torch.save since torch 1.6) nor torch's legacy format")


def _torch_refusal(error: Exception) -> str:
  """One line from torch's weights-only UnpicklingError, whose text spans lines and advises allow-listing: the line
  that names the refused global (its wording differs between torch versions), else the first."""
  text = str(error).partition('WeightsUnpickler error:')[2] or str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  naming = [line for line in lines if 'global' in line.lower()]
  return (naming or lines or [type(error).__name__])[0].split('. ')[0].rstrip('.')


def _load_torch(path: str) -> dict:
  _check_torch_file(path)  # before torch: a damaged file is called damaged whether or not torch is installed
  try:
    import torch
  except ImportError:
    raise WeightFileError(f'{path}: .pth files need torch; convert to .safetensors or .npz, or install torch') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise WeightFileError(f'{path}: torch refused it: {_torch_refusal(e)} (nothing in the file was run)') from None
  except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:  # torch's reader on bytes it cannot parse
    raise _damaged(path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
  for wrapper in ('model', 'state_dict'):  # training checkpoints nest the state dict
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise WeightFileError(f'{path}: holds a {type(obj).__name__}, not a state dict')
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items() if hasattr(v, 'numpy')}


# ---------------------------------------------------------------------------------------------------- pickles


class _Refused(pickle.UnpicklingError):
  """What the restricted unpickler refuses on purpose (as opposed to bytes it cannot parse)."""


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` as protocol-2 pickles use it, to carry bytes as a latin-1 str; other codecs are refused."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise _Refused(
      f'refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text '
      f'(how pickles carry bytes) is decoded'
    )
  return text.encode('latin1')


def _new_dtype(obj, align=False, copy=False):
  """numpy.dtype as pickles call it (Python 2 ones pass align and copy as 0 and 1, which NumPy 2.4 deprecates),
  always returning a new dtype: the BUILD that follows sets the state of what this returns, which must never be one
  of NumPy's shared dtypes."""
  return np.dtype(obj, bool(align), True)


def _array_global(module: str, name: str):
  """The object for an allowed pickle global, or None. Only what rebuilding NumPy arrays, dtypes and scalars needs:
  numpy.ndarray, numpy.dtype, <numpy core>.multiarray._reconstruct / .scalar (protocol <= 4), <numpy core>.numeric.
  _frombuffer (protocol 5), and _codecs.encode limited to latin1. <numpy core> is numpy.core (NumPy 1, and every
  Python 2 pickle) or numpy._core (NumPy 2); both resolve to the installed NumPy's module."""
  if module == 'numpy' and name == 'ndarray':
    return np.ndarray
  if module == 'numpy' and name == 'dtype':
    return _new_dtype
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


class _Global:
  """An allowed global as the pickle holds it: calling it calls the real object (with _Global arguments unwrapped),
  and BUILD on it is refused. Handing the pickle the real object would let BUILD change it for the whole process:
  BUILD with the state (None, {'__defaults__': ...}) sets the defaults of numpy's _frombuffer, and a dict state
  fills a function's __dict__."""

  def __init__(self, qualname: str, target):
    self.qualname, self.target = qualname, target

  def __call__(self, *args):
    return self.target(*(a.target if isinstance(a, _Global) else a for a in args))

  def __setstate__(self, state):
    raise _Refused(
      f'refused BUILD on {self.qualname}: a weight pickle may only set the state of the arrays and dtypes it '
      f'rebuilds (nothing in the file was run)'
    )


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler whose only globals are those of `_array_global`, each behind a `_Global`; it never imports a module
  the pickle names."""

  def find_class(self, module, name):
    found = _array_global(module, name)
    if found is None:
      raise _Refused(
        f'refused global {module}.{name}: a weight pickle may only hold NumPy arrays '
        f'in dicts, lists and tuples (nothing in the file was run)'
      )
    return _Global(f'{module}.{name}', found)


def read_array_pickle(path: str) -> dict:
  """{name: np.ndarray} from a Detectron-style weight pickle (Python 2 or 3), loaded with `_ArrayUnpickler`.

  Unwraps a top-level 'blobs' dict (Detectron's saved models keep 'cfg' beside it), drops '*_momentum' blobs (SGD
  state) and None values (Detectron stores some preserved blobs as None). Raises WeightFileError naming the path for
  a refused global or BUILD, a damaged pickle, or a value that is not a numeric array.
  """
  with open(path, 'rb') as f:
    try:
      obj = _ArrayUnpickler(f, encoding='latin1').load()  # latin1: Python 2 str -> array bytes, as NumPy documents
    except _Refused as e:
      raise WeightFileError(f'{path}: not a weight pickle this reader accepts: {e}') from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise _damaged(path, f'not a pickle it can read to the end ({type(e).__name__}: {e})') from None
  if isinstance(obj, dict) and isinstance(obj.get('blobs'), dict):
    obj = obj['blobs']
  if not isinstance(obj, dict):
    raise WeightFileError(f'{path}: expected a dict of arrays (or {{"blobs": dict}}), found {type(obj).__name__}')
  kept = [(k, v) for k, v in obj.items() if not str(k).endswith('_momentum') and v is not None]
  return _numeric_arrays(path, kept, 'blob')


# ---------------------------------------------------------------------------------------------------- dispatch


def load_state_dict(path: str) -> dict:
  """{name: np.ndarray} from .safetensors, .npz, .pth/.pt/.bin (torch) or .pkl (Detectron), by extension; never
  empty (WeightFileError for a file without tensors)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.safetensors', '.npz', '.pth', '.pt', '.bin', '.pkl'):
    raise WeightFileError(f'{path}: unknown weight file type {ext!r} (expected .safetensors, .npz, .pth, .pkl)')
  if not os.path.isfile(path):
    raise WeightFileNotFoundError(f'{path}: no such file')
  if os.path.getsize(path) == 0:
    raise WeightFileError(f'{path} is empty (0 bytes)')
  readers = {'.safetensors': read_safetensors, '.npz': read_npz, '.pkl': read_array_pickle}
  try:
    out = readers.get(ext, _load_torch)(path)
  except OSError as e:  # a file that exists but cannot be read (permissions, I/O)
    raise WeightFileError(f'{path}: cannot read it: {e.strerror or e}') from None
  if not out:
    raise WeightFileError(f'{path} holds no tensors')
  return out
