"""Weight-file readers (conret_jax/weight_files.py): safetensors, npz, and the restricted reader of Detectron's
pickles, which rebuilds NumPy arrays and nothing else."""

import builtins
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import model_reference as ref
import numpy as np
import pytest

from conret_jax import weight_files
from conret_jax.errors import WeightFileError


def _write_safetensors(path, tensors, bf16=()):
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name, arr in tensors.items():
    if name in bf16:
      raw, dtype = (arr.astype(np.float32).view(np.uint32) >> 16).astype('<u2').tobytes(), 'BF16'
    else:
      raw, dtype = np.ascontiguousarray(arr).tobytes(), {'float32': 'F32', 'int64': 'I64'}[arr.dtype.name]
    header[name] = {'dtype': dtype, 'shape': list(arr.shape), 'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(head)) + head + b''.join(blobs))


def test_loaders_round_trip(tmp_path):
  sd = ref.retinanet_state_dict(np.random.default_rng(0), ref.tiny_config())
  _write_safetensors(tmp_path / 'w.safetensors', sd)
  np.savez(tmp_path / 'w.npz', **sd)
  for loaded in (
    weight_files.read_safetensors(str(tmp_path / 'w.safetensors')),
    weight_files.load_state_dict(str(tmp_path / 'w.safetensors')),
    weight_files.load_state_dict(str(tmp_path / 'w.npz')),
  ):
    assert sorted(loaded) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k])


def test_safetensors_bf16_is_widened(tmp_path):
  x = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)  # exactly representable except 1e-3
  _write_safetensors(tmp_path / 'b.safetensors', {'x': x}, bf16=('x',))
  got = weight_files.read_safetensors(str(tmp_path / 'b.safetensors'))['x']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got[:3], x[:3])
  assert abs(got[3] - 1e-3) < 1e-5


def _raw_safetensors(header, data=b'', length=None) -> bytes:
  """A .safetensors file as bytes, exactly as given: the header need not describe the data (`length` overrides the
  8-byte header length)."""
  head = json.dumps(header).encode()
  return struct.pack('<Q', len(head) if length is None else length) + head + data


def _f32(offsets, shape=(1,)):
  return {'dtype': 'F32', 'shape': list(shape), 'data_offsets': list(offsets)}


@pytest.mark.parametrize(
  'raw, damage',
  [
    (b'\x10\x00\x00', '3 bytes, fewer than the 8-byte header length'),
    (_raw_safetensors({}, bytes(2038), length=123456), 'header length 123456 runs past the end of the 2048-byte file'),
    (struct.pack('<Q', 4) + b'{"a"', 'its 4-byte header is not JSON'),
    (_raw_safetensors([1, 2]), 'its header is a JSON list, not an object of tensors'),
    (_raw_safetensors({'a': [0, 4]}, bytes(4)), "tensor 'a' is described by a list, not an object"),
    (_raw_safetensors({'a': {'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)), "tensor 'a' has no 'dtype'"),
    (
      _raw_safetensors({'a': _f32((0, 4), shape=(-1,))}, bytes(4)),
      r"tensor 'a' has shape \[-1\], not a list of sizes",
    ),
    (
      _raw_safetensors({'a': _f32((-4, 0))}, bytes(4)),
      r"'a' has data_offsets \[-4, 0\], not a range inside the 4 bytes",
    ),
    (_raw_safetensors({'a': _f32((0, 8), (2,))}, bytes(4)), r"'a' has data_offsets \[0, 8\], not a range inside the 4"),
    (
      _raw_safetensors({'a': _f32((0, 8))}, bytes(8)),
      r"tensor 'a' has 8 bytes of data, but shape \[1\] of F32 needs 4",
    ),
    (_raw_safetensors({'a': _f32((0, 8), (2,)), 'b': _f32((4, 8))}, bytes(8)), "tensors 'a' and 'b' overlap"),
    (_raw_safetensors({'a': _f32((0, 4)), 'b': _f32((8, 12))}, bytes(12)), 'bytes 4 to 8 of the data belong to no'),
    (_raw_safetensors({'a': _f32((0, 4))}, bytes(8)), 'the last 4 bytes of the data belong to no tensor'),
  ],
)
def test_damaged_safetensors_are_named_before_any_tensor_is_read(tmp_path, raw, damage):
  path = tmp_path / 'resnet50.safetensors'
  path.write_bytes(raw)
  with pytest.raises(WeightFileError, match=f'^{path} is damaged: .*{damage}') as e:
    weight_files.load_state_dict(str(path))
  assert '\n' not in str(e.value)


def test_safetensors_layout_may_list_tensors_in_any_order(tmp_path):
  """The format orders nothing in the header: only the byte ranges must tile the data (here b, an empty e, a)."""
  a, b = np.array([1.5, -2.0], np.float32), np.arange(3, dtype=np.int64)
  header = {
    'a': _f32((24, 32), (2,)),
    'e': _f32((24, 24), (0, 3)),
    'b': {'dtype': 'I64', 'shape': [3], 'data_offsets': [0, 24]},
  }
  (tmp_path / 'w.safetensors').write_bytes(_raw_safetensors(header, b.tobytes() + a.tobytes()))
  got = weight_files.load_state_dict(str(tmp_path / 'w.safetensors'))
  np.testing.assert_array_equal(got['a'], a)
  np.testing.assert_array_equal(got['b'], b)
  assert got['e'].shape == (0, 3)


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _flip_inside(raw: bytes, part: bytes) -> bytes:
  """`raw` with one byte in the middle of its copy of `part` changed, as a disk or a transfer might."""
  i = raw.index(part) + len(part) // 2
  return raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :]


_WEIGHT = np.arange(64, dtype=np.float32)


def _stray_member_npz() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as archive:
    archive.writestr('conv1.weight.npy', _npz_bytes())  # any bytes that are not a .npy
  return buf.getvalue()


@pytest.mark.parametrize(
  'raw, message',
  [
    (b'', r'w.npz is empty \(0 bytes\)'),
    (_npz_bytes(w=_WEIGHT)[:300], 'w.npz is damaged: no zip directory at its end'),
    (
      _flip_inside(_npz_bytes(w=_WEIGHT), _WEIGHT.tobytes()),
      'w.npz is damaged: member w.npy of its zip archive is corrupt',
    ),
    (_npz_bytes(), 'w.npz holds no tensors'),
    (_stray_member_npz(), "w.npz: member 'conv1.weight' is a bytes, not a numeric array"),
  ],
)
def test_damaged_or_empty_npz(tmp_path, raw, message):
  (tmp_path / 'w.npz').write_bytes(raw)
  with pytest.raises(WeightFileError, match=message):
    weight_files.load_state_dict(str(tmp_path / 'w.npz'))


def test_unknown_extension():
  with pytest.raises(ValueError, match='unknown weight file type'):
    weight_files.load_state_dict('weights.h5')


# ---------------------------------------------------------------------------------------------------- pickles


def _py2_pickle(obj) -> bytes:
  """Protocol-2 bytes laid out as Python 2's cPickle writes Detectron's blobs (dicts, unicode names, None, NumPy 1
  float32 arrays: numpy.core.multiarray._reconstruct, and the raw data as a Python 2 byte str, BINSTRING)."""

  def dump(x):
    if isinstance(x, dict):
      return b'}(' + b''.join(dump(k) + dump(v) for k, v in x.items()) + b'u'
    if isinstance(x, str):
      return b'X' + struct.pack('<I', len(x.encode())) + x.encode()
    if x is None:
      return b'N'
    if isinstance(x, tuple):
      return b'(' + b''.join(b'J' + struct.pack('<i', d) for d in x) + b't'
    raw = np.ascontiguousarray(x, '<f4').tobytes()
    dtype = b'cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb'
    return (
      b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01'
      + dump(x.shape)
      + dtype
      + b'\x89T'
      + struct.pack('<i', len(raw))
      + raw
      + b'tb'
    )

  return b'\x80\x02' + dump(obj) + b'.'


@pytest.mark.parametrize('writer', ['python2', 'protocol2', 'protocol5'])
def test_detectron_pickle_round_trip(tmp_path, writer):
  rng = np.random.default_rng(6)
  blobs = {
    'conv1_w': rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
    'res_conv1_bn_s': rng.standard_normal(4).astype(np.float32),
    'fc1000_b': np.zeros(10, np.float32),
  }
  saved = {
    'blobs': {**blobs, 'conv1_w_momentum': np.ones((4, 3, 7, 7), np.float32), 'preserved': None},
    'cfg': 'MODEL:\n  TYPE: generalized_rcnn\n',
  }
  path = tmp_path / 'R-50.pkl'
  if writer == 'python2':
    path.write_bytes(_py2_pickle(saved))
  else:
    path.write_bytes(pickle.dumps(saved, protocol=int(writer[-1])))
  got = weight_files.load_state_dict(str(path))
  assert sorted(got) == sorted(blobs)
  for k, v in blobs.items():
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], v)


class _Payload:
  """A class a pickle might name: the reader must not import or build it."""


class _Call:
  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize(
  'make, refused',
  [
    (lambda marker: _Call(os.system, f'touch {marker}'), f'{os.system.__module__}.system'),
    (lambda marker: _Call(builtins.eval, f'open({str(marker)!r}, "w").close()'), '__builtin__.eval'),  # Python 2 name
    (lambda marker: _Payload(), f'{__name__}._Payload'),
  ],
)
def test_pickle_with_code_is_refused_unrun(tmp_path, make, refused):
  marker = tmp_path / 'ran'
  path = tmp_path / 'evil.pkl'
  blobs = {'conv1_w': np.ones((2, 3, 1, 1), np.float32), 'res_conv1_bn_s': make(marker)}
  path.write_bytes(pickle.dumps({'blobs': blobs}, protocol=2))
  with pytest.raises(ValueError, match=f'evil.pkl: .*refused global {refused}') as e:
    weight_files.load_state_dict(str(path))
  assert 'nothing in the file was run' in str(e.value)
  assert not marker.exists()


def test_pickle_codecs_and_non_arrays_are_refused(tmp_path):
  path = tmp_path / 'codec.pkl'
  path.write_bytes(b'\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.')
  with pytest.raises(ValueError, match='rot13'):
    weight_files.load_state_dict(str(path))
  path.write_bytes(pickle.dumps({'conv1_w': [1.0, 2.0], 'x': np.array([1, 'a'], object)}, protocol=2))
  with pytest.raises(ValueError, match="blob 'conv1_w' is a list, not a numeric array"):
    weight_files.load_state_dict(str(path))


@pytest.mark.parametrize('ext', ['.pkl', '.npz', '.safetensors', '.pth'])
def test_missing_file_is_named(tmp_path, ext):
  path = str(tmp_path / f'absent{ext}')
  with pytest.raises(FileNotFoundError, match=f'{path}: no such file'):
    weight_files.load_state_dict(path)


def _torch_zip(data_pkl: bytes) -> bytes:
  """A .pth laid out as torch.save writes one since torch 1.6: an uncompressed zip of archive/data.pkl (the pickle)
  and archive/version."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr('archive/data.pkl', data_pkl)
    archive.writestr('archive/version', '3\n')
  return buf.getvalue()


_DATA_PKL = pickle.dumps({'conv1.weight': 1.0, 'bn1.weight': 2.0}, protocol=2)


@pytest.mark.parametrize(
  'raw, damage',
  [
    (_torch_zip(_DATA_PKL)[:-40], 'no zip directory at its end: a torch file is a zip archive'),
    (_flip_inside(_torch_zip(_DATA_PKL), _DATA_PKL), 'member archive/data.pkl of its zip archive is corrupt'),
    (
      b'<!DOCTYPE html><html>Not Found</html>',
      r"it is neither a zip archive \(torch.save since torch 1.6\) nor torch's",
    ),
  ],
)
def test_damaged_pth_is_named_without_torch(tmp_path, monkeypatch, raw, damage):
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed: the check must not need it
  path = tmp_path / 'resnet50.pth'
  path.write_bytes(raw)
  with pytest.raises(WeightFileError, match=f'^{path} is damaged: {damage}'):
    weight_files.load_state_dict(str(path))


def test_pth_zip_without_a_pickle_is_refused(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as archive:
    archive.writestr('weights/readme.txt', 'not a torch file')
  (tmp_path / 'w.pth').write_bytes(buf.getvalue())
  with pytest.raises(WeightFileError, match='w.pth: a zip archive without data.pkl'):
    weight_files.load_state_dict(str(tmp_path / 'w.pth'))


# torch.load(weights_only=True)'s UnpicklingError for a refused global: several lines, advice to allow-list it.
_TORCH_REFUSAL = (
  'Weights only load failed. This file can still be loaded, to do so you have two options, do those steps only if '
  'you trust the source of the checkpoint. \n\t(1) Re-running `torch.load` with `weights_only` set to `False` will '
  'likely succeed, but it can result in arbitrary code execution.\n\tWeightsUnpickler error: Unsupported global: '
  'GLOBAL posix.system was not an allowed global by default. Please use `torch.serialization.add_safe_globals('
  '[system])` to allowlist this global if you trust this class/function.\n\nCheck the documentation of torch.load.'
)
# The same refusal in torch 2.14's words: the global is named on a line of its own, after the advice.
_TORCH_REFUSAL_2_14 = (
  'Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in '
  '`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely '
  'succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source.'
  '\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation '
  'of torch.load to learn more about types accepted by default with weights_only.'
)


@pytest.mark.parametrize(
  'error, message',
  [
    (
      pickle.UnpicklingError(_TORCH_REFUSAL),
      'w.pth: torch refused it: Unsupported global: GLOBAL posix.system was not an allowed global by default '
      '(nothing in the file was run)',
    ),
    (
      pickle.UnpicklingError(_TORCH_REFUSAL_2_14),
      'w.pth: torch refused it: Trying to load unsupported GLOBAL posix.system whose module posix is blocked '
      '(nothing in the file was run)',
    ),
    (
      RuntimeError('PytorchStreamReader failed reading file data/0: invalid header or archive is corrupted\nmore'),
      'w.pth is damaged: PytorchStreamReader failed reading file data/0: invalid header or archive is corrupted',
    ),
  ],
)
def test_what_torch_refuses_is_one_line(tmp_path, monkeypatch, error, message):
  """A stand-in for torch raising what torch.load raises: the reader's handling needs no torch to be tested."""

  def load(*args, **kwargs):
    raise error

  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(load=load))
  (tmp_path / 'w.pth').write_bytes(_torch_zip(_DATA_PKL))
  with pytest.raises(WeightFileError) as e:
    weight_files.load_state_dict(str(tmp_path / 'w.pth'))
  assert str(e.value) == f'{tmp_path / "w.pth"}{message[len("w.pth") :]}'


def test_real_torch_refuses_code_in_a_pth(tmp_path):
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'ran'
  torch.save({'conv1.weight': torch.ones(2), 'x': _Call(os.system, f'touch {marker}')}, tmp_path / 'evil.pth')
  with pytest.raises(WeightFileError, match='evil.pth: torch refused it: .*system.*nothing in the file was run'):
    weight_files.load_state_dict(str(tmp_path / 'evil.pth'))
  assert not marker.exists()


def _x(text: str) -> bytes:
  """A pickle's BINUNICODE: opcode X, 4-byte length, UTF-8."""
  return b'X' + struct.pack('<I', len(text.encode())) + text.encode()


_DEFAULTS_STATE = b'}' + _x('__defaults__') + _x('F') + b'\x85s'  # {'__defaults__': ('F',)}


@pytest.mark.parametrize(
  'state',
  [
    _DEFAULTS_STATE,  # a dict state: fills the function's __dict__
    b'N' + _DEFAULTS_STATE + b'\x86',  # (None, slot state): setattr, which changes its real defaults
  ],
  ids=['dict', 'slots'],
)
def test_pickle_build_on_a_global_is_refused_and_changes_nothing(tmp_path, state):
  """GLOBAL numpy._core.numeric _frombuffer (an allowed global: protocol 5 rebuilds arrays with it), then BUILD:
  on the real function that would set its axis_order default to 'F' for the whole process."""
  fn = weight_files._array_global('numpy._core.numeric', '_frombuffer')
  defaults, attributes = fn.__defaults__, dict(fn.__dict__)
  raw = b'\x80\x02}' + _x('conv1_w') + b'cnumpy._core.numeric\n_frombuffer\n' + state + b'bs.'
  (tmp_path / 'evil.pkl').write_bytes(raw)
  try:
    with pytest.raises(WeightFileError, match='evil.pkl: .*refused BUILD on numpy._core.numeric._frombuffer'):
      weight_files.load_state_dict(str(tmp_path / 'evil.pkl'))
    assert fn.__defaults__ == defaults and fn.__dict__ == attributes
  finally:  # undo what a reader without the check did, for the tests after this one
    fn.__defaults__ = defaults
    fn.__dict__.clear()
    fn.__dict__.update(attributes)


def test_truncated_pickle_is_damaged(tmp_path):
  raw = pickle.dumps({'conv1_w': np.ones((4, 3), np.float32)}, protocol=2)
  (tmp_path / 'R-50.pkl').write_bytes(raw[: len(raw) // 2])
  with pytest.raises(WeightFileError, match='R-50.pkl is damaged: not a pickle it can read to the end'):
    weight_files.load_state_dict(str(tmp_path / 'R-50.pkl'))
