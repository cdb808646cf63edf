"""The StableHLO version jax2tf writes into a SavedModel, set to one TensorFlow can read.

jax 0.10.2 serializes its modules at StableHLO 1.15.0 (its WEEK_4 compatibility target), but the XlaCallModule op of
TensorFlow 2.21 reads versions up to 1.13.7: every `lax.top_k` (part of post-processing) is then written as a
`vhlo.composite_v2` the op cannot deserialize. tf.saved_model.save succeeds anyway; the model fails on its first
call. `portable_serialization` makes jax write at the WEEK_12 target (1.13.7 with jax 0.10.2) while it is active.

No public jax API chooses the target, so this replaces one private function (jax._src.export._export's
`_module_to_bytecode`) and restores it on exit. On a jax whose private names differ it raises ExportError instead
of guessing; conret_jax/export/writer.py calls the written model before keeping it, so a target TensorFlow
cannot read still fails the export rather than shipping a model that does not run.
"""

import contextlib

from conret_jax.errors import ExportError

TESTED_JAX = '0.10.2'  # the jax version this patch was written and tested against (with TensorFlow 2.21)


def _private_api():
  """(the _export module, the function that serializes a module at WEEK_12): ExportError where jax lacks them."""
  import jax

  try:
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jax._src.lib.mlir.dialects import hlo

    _export._module_to_bytecode  # the name this module replaces
    requirement = hlo.StablehloCompatibilityRequirement.WEEK_12
    target = hlo.get_version_from_compatibility_requirement(requirement)
    serialize = _jax.mlir.serialize_portable_artifact
  except (ImportError, AttributeError) as e:
    raise ExportError(
      f'jax {jax.__version__} lacks the private API the export uses to write StableHLO that TensorFlow reads '
      f'({type(e).__name__}: {e}); the export was written for jax {TESTED_JAX}: install that version to export'
    ) from e

  def module_to_bytecode(module) -> bytes:
    return serialize(module, target, xla_bridge.get_backend().serialize_with_sdy)

  return _export, module_to_bytecode


def target_version() -> str:
  """The StableHLO version `portable_serialization` writes (e.g. '1.13.7')."""
  from jax._src.lib.mlir.dialects import hlo

  return hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_12)


@contextlib.contextmanager
def portable_serialization():
  """While active, jax.export (and so jax2tf) serializes modules at the WEEK_12 StableHLO target."""
  export_module, module_to_bytecode = _private_api()
  original = export_module._module_to_bytecode
  export_module._module_to_bytecode = module_to_bytecode
  try:
    yield
  finally:
    export_module._module_to_bytecode = original
