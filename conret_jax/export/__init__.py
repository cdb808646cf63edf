"""A trained run as a TensorFlow SavedModel: `conret_jax.export.export(conret_jax.load(workdir), output)`, the
library side of `conret-export`.

  module.py     the tf.Module: signatures, TF preprocessing, the jax2tf-converted inference, outputs
  stablehlo.py  the StableHLO version TensorFlow can read (a private jax function, replaced while exporting)
  writer.py     staging, verification (the saved model loaded back and called) and the move into place
"""

from conret_jax.export.writer import check_output, export

__all__ = ['check_output', 'export']
