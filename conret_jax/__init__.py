"""conret_jax: ConRetinaNet (consistent optimization for single-shot detection) in JAX/Flax.

The public API:
  build_model(config) -> flax module            the network of the config's detector family
  init_variables(model, rng, image_hw)          its variables ('params' and the non-trained collections)
  detect(model, variables, images, config)      jitted inference: boxes, scores, classes, valid
  load(workdir, step=None) -> Predictor         a trained run; .predict(uint8 images) -> detections in image pixels
  export.export(predictor, output)              the predictor as a TensorFlow SavedModel (conret-export)
  weights                                       importers for torchvision / timm / Detectron weights
Attributes load lazily, so `import conret_jax.core...` never pulls in Flax or TensorFlow.
"""

import importlib

__version__ = '0.1.0'

_LAZY = {
  'build_model': ('conret_jax.detectors', 'build_model'),
  'init_variables': ('conret_jax.detectors', 'init_variables'),
  'detect': ('conret_jax.inference', 'detect'),
  'load': ('conret_jax.predictor', 'load'),
  'weights': ('conret_jax.weights', None),
  'export': ('conret_jax.export', None),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module conret_jax has no attribute {name!r}')
  module_name, attr = _LAZY[name]
  module = importlib.import_module(module_name)
  return module if attr is None else getattr(module, attr)
