"""The package's imports flow one way: every module imports only from lower layers or its own component, there are
no cycles, and the model, the loss, the step and the config checks import without TensorFlow.

Layers, lowest first (a component is a subpackage, or a top-level module on its own):
  0 core                                     box math, anchors, matching, targets, losses, NMS: nothing else
  1 errors, fileio                           no imports from the package
  2 the config schema and shared contracts   defaults, stages, batch
  3 components, which do not import each other: model, data, the losses (consistent, multibox), mesh, coco_metrics,
                                             visualize, analysis_figures, run_record, distributed, weight_files,
                                             flops
  4 detectors (a family's model + loss)      5 config_checks
  6 inference, weights, eval_files          7 evaluation, detect_bench (use inference)       8 analysis
  9 train                                    10 predictor (conret_jax.load)                  11 export (SavedModel)
  12 cli
Function-level imports count like module-level ones.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'conret_jax'

LAYERS = {
  'core': 0,
  'errors': 1,
  'fileio': 1,
  'defaults': 2,
  'stages': 2,
  'batch': 2,
  'model': 3,
  'data': 3,
  'consistent': 3,
  'multibox': 3,
  'mesh': 3,
  'coco_metrics': 3,
  'visualize': 3,
  'analysis_figures': 3,
  'run_record': 3,
  'distributed': 3,
  'weight_files': 3,
  'flops': 3,
  'detectors': 4,
  'config_checks': 5,
  'inference': 6,
  'weights': 6,
  'eval_files': 6,
  'evaluation': 7,
  'detect_bench': 7,
  'analysis': 8,
  'train': 9,
  'predictor': 10,
  'export': 11,
  'cli': 12,
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
  """conret_jax modules that `path` imports anywhere in it (module level or inside functions)."""
  tree = ast.parse(path.read_text())
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[: len(package.split('.')) - node.level + 1] + ([base] if base else []))
      # `from a.b import c`: the module a.b.c if there is one, else a.b.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    found |= {t for t in targets if t.split('.')[0] == 'conret_jax' and t != 'conret_jax'}
  return found


def _component(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def _graph():
  modules = _modules()
  return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
  missing = sorted({_component(m) for m in _modules()} - set(LAYERS) - {''})
  assert not missing, f'modules without a layer in this test: {missing}'


def test_imports_only_go_down():
  upward = []
  for module, imported in _graph().items():
    if module == 'conret_jax':  # the lazy public API at the top names what it exports
      continue
    for target in imported:
      mine, theirs = _component(module), _component(target)
      if mine != theirs and LAYERS[theirs] >= LAYERS[mine]:
        upward.append(f'{module} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})')
  assert not upward, '\n'.join(sorted(upward))


def test_no_import_cycles():
  graph = _graph()
  state, cycles = {}, []

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        cycles.append(' -> '.join(path[path.index(nxt) :] + [nxt]) if nxt in path else f'{node} -> {nxt}')
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, '\n'.join(cycles)


BLOCK_TENSORFLOW = """
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} is blocked: this import must work without TensorFlow')

sys.meta_path.insert(0, NoTensorFlow())
import conret_jax.model.retinanet, conret_jax.consistent, conret_jax.multibox, conret_jax.detectors
import conret_jax.train.step
import conret_jax.train.state, conret_jax.train.bench, conret_jax.config_checks, conret_jax.inference
from conret_jax import config_checks, defaults
config = defaults.base_config()
config.init_from = '/weights'
config_checks.validate_training(config)  # the checks run too, not only import
ssd = defaults.ssd_config(300)
ssd.init_from = '/weights'
config_checks.validate_training(ssd)  # every family's
from jax._src import xla_bridge
# conret-train checks its config before jax.distributed.initialize, which must precede any backend start.
assert not xla_bridge.backends_are_initialized(), 'the config checks started a JAX backend'
print('imported without TensorFlow')
"""


def test_the_model_loss_step_and_config_checks_import_without_tensorflow(tmp_path):
  script = tmp_path / 'no_tf.py'
  script.write_text(BLOCK_TENSORFLOW)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'imported without TensorFlow' in proc.stdout


@pytest.mark.parametrize('module', ['conret_jax.core.boxes', 'conret_jax.core.matching', 'conret_jax.core.nms'])
def test_core_imports_nothing_else_from_the_package(module):
  imported = _graph()[module]
  assert all(t.startswith('conret_jax.core') for t in imported), imported
