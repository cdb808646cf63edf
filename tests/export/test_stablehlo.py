"""The StableHLO target of the export: TensorFlow runs lax.top_k (post-processing's) only when jax serializes for it,
the private jax function is restored after use, a jax without it is one clear error, and a SavedModel that does not
run is never kept (writer.verify)."""

import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.experimental import jax2tf

from conret_jax import defaults
from conret_jax.errors import ExportError
from conret_jax.export import stablehlo, writer


def _top_k_in_tf():
  """A tf.function running jax's lax.top_k on [2, 10] through jax2tf, traced now (under whatever serialization is
  active). Static shapes: a batched top_k with a symbolic batch does not convert at all (module.py maps it)."""
  converted = jax2tf.convert(jax.jit(lambda x: jax.lax.top_k(x, 3)), with_gradient=False)
  fn = tf.function(converted, input_signature=[tf.TensorSpec([2, 10], tf.float32)], autograph=False)
  fn.get_concrete_function()
  return fn


def test_top_k_runs_in_tensorflow_with_the_portable_target():
  x = np.random.default_rng(0).normal(size=(2, 10)).astype(np.float32)
  with stablehlo.portable_serialization():
    fn = _top_k_in_tf()
  values, indices = fn(tf.constant(x))
  want_values, want_indices = jax.lax.top_k(x, 3)
  np.testing.assert_array_equal(values.numpy(), want_values)
  np.testing.assert_array_equal(indices.numpy(), want_indices)
  assert stablehlo.target_version().startswith('1.')


def test_without_it_top_k_fails_when_called_not_when_traced():
  fn = _top_k_in_tf()  # jax's default target: traced (and savable) without complaint
  try:
    fn(tf.constant(np.zeros((2, 10), np.float32)))
  except tf.errors.OpError as e:
    assert 'vhlo' in str(e) or 'deserialize' in str(e).lower(), str(e)[:2000]
  else:
    pytest.skip("this TensorFlow reads jax's default StableHLO target: export/stablehlo.py may be retired")


def test_the_private_function_is_restored_even_after_an_error():
  from jax._src.export import _export

  original = _export._module_to_bytecode
  with pytest.raises(KeyError):
    with stablehlo.portable_serialization():
      assert _export._module_to_bytecode is not original
      raise KeyError
  assert _export._module_to_bytecode is original


def test_a_jax_without_the_private_names_is_one_clear_error(monkeypatch):
  from jax._src.export import _export

  monkeypatch.delattr(_export, '_module_to_bytecode')
  with pytest.raises(ExportError, match=rf'jax {jax.__version__} lacks the private API .* written for jax 0\.10\.2'):
    with stablehlo.portable_serialization():
      pass


def test_verify_refuses_a_saved_model_that_does_not_run(tmp_path):
  """A model whose signatures run an unpatched top_k saves fine, and verify names the failure."""
  top_k = _top_k_in_tf()

  def outputs(batch):
    values, indices = top_k(tf.zeros([2, 10]) + tf.cast(batch, tf.float32))
    return {'boxes': values, 'scores': values, 'classes': indices, 'num_detections': indices[:, 0]}

  module = tf.Module()
  images = tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')
  module.serve_images = tf.function(lambda images: outputs(tf.shape(images)[0]), input_signature=[images])
  encoded = tf.TensorSpec([None], tf.string, name='image_bytes')
  module.serve_bytes = tf.function(lambda image_bytes: outputs(tf.shape(image_bytes)[0]), input_signature=[encoded])
  signatures = {'serving_default': module.serve_images, 'serving_bytes': module.serve_bytes}
  tf.saved_model.save(module, str(tmp_path), signatures=signatures)
  config = defaults.base_config()
  try:
    top_k(tf.zeros([2, 10]))
  except tf.errors.OpError:
    with pytest.raises(ExportError, match=r'the exported model does not run \(serving_bytes\)'):
      writer.verify(str(tmp_path), config.data)
  else:
    pytest.skip("this TensorFlow reads jax's default StableHLO target: nothing here fails")
