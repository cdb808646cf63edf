"""Weight-file readers (conret_jax/weight_files.py): safetensors, npz, and the restricted reader of Detectron's
pickles, which rebuilds NumPy arrays and nothing else."""

import builtins
import json
import os
import pickle
import struct

import model_reference as ref
import numpy as np
import pytest

from conret_jax import weight_files


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
