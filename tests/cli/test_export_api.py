"""conret_jax.export in process: short_side's two padded shapes (landscape and portrait in one call) with
class_layout=category_id, stretch's two scale factors, the predictor's category ids under both class layouts, the
signatures' input checks, and an output written whole or not at all."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf
from test_export import assert_same

import conret_jax
from conret_jax import errors
from conret_jax.data.info import ClassLayout
from conret_jax.data.sizes import pad_value_of
from conret_jax.export import writer
from conret_jax.predictor import prepare_image
from tests.cli.conftest import save_run, tiny_config

CATEGORY_ID = ClassLayout('category_id', 8, (2, 3, 5), ('two', 'three', 'five'))
CONTIGUOUS = ClassLayout('contiguous', 5, (3, 7, 11, 15, 19), ('a', 'b', 'c', 'd', 'e'))


@pytest.fixture(scope='module')
def short_side_run(tmp_path_factory):
  """A saved run of the tiny model with short_side resizing (128 x 256 landscape, 256 x 128 portrait) whose class k
  is category id k, for categories 2, 3 and 5 of 8 classes; with eval.max_detections=7 for assert_same."""
  config = tiny_config()
  config.data.resize, config.data.max_size = 'short_side', 256
  config.model.class_layout, config.model.num_classes = 'category_id', 8
  config.eval.max_detections = 7
  workdir = str(tmp_path_factory.mktemp('short_side'))
  save_run(config, workdir, 3, layout=CATEGORY_ID)
  return workdir


@pytest.fixture(scope='module')
def exported(short_side_run, tmp_path_factory):
  predictor = conret_jax.load(short_side_run)
  output = str(tmp_path_factory.mktemp('out') / 'new' / 'model')  # its parent folder does not exist yet
  path = conret_jax.export.export(predictor, output, platforms=('cpu', 'cuda'))  # serialized for both, run on cpu
  return predictor, tf.saved_model.load(path)


def _call_module_ops(function) -> list:
  """The XlaCallModule ops (one per padded shape) in a concrete function and the functions it calls."""
  graphs = [function.graph.as_graph_def()]
  nodes = [n for g in graphs for n in g.node] + [n for g in graphs for f in g.library.function for n in f.node_def]
  return [n for n in nodes if n.op == 'XlaCallModule']


def _images():
  rs = np.random.RandomState(7)
  landscape = rs.randint(0, 256, (90, 160, 3)).astype(np.uint8)
  portraits = rs.randint(0, 256, (3, 200, 120, 3)).astype(np.uint8)
  return landscape, portraits


def test_landscape_and_portrait_in_one_call_and_a_portrait_batch_of_three(exported):
  predictor, loaded = exported
  landscape, portraits = _images()
  want = predictor.predict([landscape, portraits[0]])
  encoded = tf.stack([tf.io.encode_png(image) for image in (landscape, portraits[0])])
  both = {k: v.numpy() for k, v in loaded.signatures['serving_bytes'](image_bytes=encoded).items()}
  for row, result in enumerate(want):
    assert_same(both, row, result)
  batch = {k: v.numpy() for k, v in loaded.signatures['serving_default'](images=tf.constant(portraits)).items()}
  for row, result in enumerate(predictor.predict(list(portraits))):
    assert_same(batch, row, result)
  assert set(batch['classes'].ravel()) <= {-1, 2, 3, 5}
  labels = loaded.labels()
  assert labels['category_ids'].numpy().tolist() == [2, 3, 5]
  modules = _call_module_ops(loaded.signatures['serving_bytes'])
  assert len(modules) == 2 and {tuple(n.attr['platforms'].list.s) for n in modules} == {(b'CPU', b'CUDA')}
  assert labels['names'].numpy().astype(str).tolist() == ['two', 'three', 'five']


def test_stretch_maps_x_and_y_back_by_their_own_factors(tmp_path):
  """resize='stretch' (SSD's warp to S x S, aspect not kept): sy != sx, in both signatures as in predict."""
  config = tiny_config()
  config.data.resize, config.eval.max_detections = 'stretch', 7
  save_run(config, str(tmp_path / 'run'), 1, layout=CONTIGUOUS)
  predictor = conret_jax.load(str(tmp_path / 'run'))
  loaded = tf.saved_model.load(conret_jax.export.export(predictor, str(tmp_path / 'model')))
  landscape, portraits = _images()
  want = predictor.predict([landscape, portraits[0]])
  encoded = tf.stack([tf.io.encode_png(image) for image in (landscape, portraits[0])])
  both = {k: v.numpy() for k, v in loaded.signatures['serving_bytes'](image_bytes=encoded).items()}
  one = {k: v.numpy() for k, v in loaded.signatures['serving_default'](images=tf.constant(landscape[None])).items()}
  for row, result in enumerate(want):
    assert_same(both, row, result)
  assert_same(one, 0, want[0])
  assert (want[0]['boxes'][:, [0, 2]] <= 160).all() and (want[0]['boxes'][:, [1, 3]] <= 90).all()


WRONG = {
  'float32': (np.zeros((2, 64, 64, 3), np.float32), 'was expected to be a uint8 tensor but is a float tensor'),
  'rank 3': (np.zeros((64, 64, 3), np.uint8), r'images \[64,64,3\] is not compatible with expected shape \[\?,\?,'),
  '4 channels': (np.zeros((1, 64, 64, 4), np.uint8), r'images \[1,64,64,4\] is not compatible with expected shape'),
}


@pytest.mark.parametrize('wrong', WRONG, ids=list(WRONG))
def test_a_wrong_input_names_the_expected_signature(exported, wrong):
  _, loaded = exported
  images, message = WRONG[wrong]
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    loaded.signatures['serving_default'](images=tf.constant(images))
  with pytest.raises(TypeError, match=r"TensorSpec\(shape=\(None, None, None, 3\), dtype=tf.uint8, name='images'\)"):
    loaded.serve_images(tf.constant(images))  # the restored tf.function names its input_signature
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'image_bytes \[2,1\] is not compatible'):
    loaded.signatures['serving_bytes'](image_bytes=tf.constant([[b'x'], [b'y']]))


@pytest.mark.parametrize('layout', [CATEGORY_ID, CONTIGUOUS], ids=lambda layout: layout.kind)
def test_predict_returns_the_datasets_category_ids(layout, short_side_run, make_tiny_config, make_saved_run, tmp_path):
  """Class k means category id k (category_id: a class without a category is dropped) or the k-th smallest id
  (contiguous), checked against conret_jax.detect's raw classes."""
  if layout is CATEGORY_ID:
    workdir = short_side_run
  else:
    workdir = str(tmp_path)
    make_saved_run(make_tiny_config(), workdir, 2, layout=CONTIGUOUS)
  predictor = conret_jax.load(workdir)
  image = np.random.RandomState(3).randint(0, 256, (100, 140, 3)).astype(np.uint8)
  got = predictor.predict([image])[0]
  config = predictor.config
  padded, _, hw = prepare_image(image, config.data, pad_value_of(config.model))
  raw = conret_jax.detect(predictor.model, predictor.variables, padded[None], config, image_sizes=np.array([hw]))
  classes = np.asarray(raw['classes'][0])[np.asarray(raw['valid'][0])]
  if layout.kind == 'category_id':
    want = [k for k in classes if k in (2, 3, 5)]
    assert len(want) < len(classes)  # some classes stand for no category: dropped
  else:
    want = [(3, 7, 11, 15, 19)[k] for k in classes]
  names = dict(zip(layout.category_ids, layout.names))
  assert got['category_ids'].tolist() == want and len(want) >= 1
  assert got['names'] == [names[c] for c in want]


class _Broken(Exception):
  pass


def test_nothing_is_left_when_the_export_fails(monkeypatch, tmp_path):
  def write(predictor, staging, platforms):
    open(os.path.join(staging, 'saved_model.pb'), 'w').close()
    raise _Broken

  monkeypatch.setattr(writer, '_write', write)
  with pytest.raises(_Broken):
    writer.export(None, str(tmp_path / 'new' / 'deeper' / 'model'))
  assert os.listdir(tmp_path) == []  # neither the model, nor its staging folder, nor the parents it created


def test_an_existing_output_is_replaced_only_when_asked_and_only_once_complete(monkeypatch, tmp_path):
  predictor = types.SimpleNamespace(config=types.SimpleNamespace(data=None))  # read by nothing here

  def write(predictor, staging, platforms):
    open(os.path.join(staging, 'saved_model.pb'), 'w').write('new')

  monkeypatch.setattr(writer, '_write', write)
  monkeypatch.setattr(writer, 'verify', lambda path, data_config: None)
  output = tmp_path / 'model'
  output.mkdir()
  writer.export(predictor, str(output))  # an empty folder is taken
  assert (output / 'saved_model.pb').read_text() == 'new'
  (output / 'saved_model.pb').write_text('old')
  with pytest.raises(errors.OutputExistsError, match='exists and is not empty; pass --overwrite'):
    writer.export(predictor, str(output))
  assert (output / 'saved_model.pb').read_text() == 'old'
  writer.export(predictor, str(output), overwrite=True)
  assert (output / 'saved_model.pb').read_text() == 'new' and sorted(os.listdir(tmp_path)) == ['model']
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.ExportError, match='is a file, not a folder'):
    writer.export(predictor, str(tmp_path / 'file'), overwrite=True)
