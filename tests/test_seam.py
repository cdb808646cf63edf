"""The family seam holds: the code that trains, evaluates, analyzes, benchmarks and serves a detector never names a
detector family, imports a family's modules or reads a family's own config keys. It talks to
`conret_jax.detectors` only, so adding a family is its modules plus one entry in detectors.FAMILIES.
"""

import ast
import pathlib
import re

import pytest

from conret_jax import detectors

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'conret_jax'
# Tools that exist to import or compare one family's published weights name it by purpose.
PURPOSE_NAMED = {'cli/import_weights.py'}
# The callers: the train loop, state and step, inference, evaluation, analysis, the benchmarks, the tools and the
# SavedModel export.
CALLERS = sorted(
  p
  for p in [PACKAGE / 'inference.py', PACKAGE / 'evaluation.py', PACKAGE / 'analysis.py', PACKAGE / 'detect_bench.py']
  + [PACKAGE / 'data' / 'bench.py']
  + list((PACKAGE / 'train').glob('*.py'))
  + list((PACKAGE / 'cli').glob('*.py'))
  + list((PACKAGE / 'export').glob('*.py'))
  if str(p.relative_to(PACKAGE)) not in PURPOSE_NAMED
)
# A family's network, loss and anchors live in these; callers reach them through detectors.py.
FAMILY_MODULES = ('conret_jax.model', 'conret_jax.consistent', 'conret_jax.multibox')


# What code calls a config section when it reads a key of it (`config.model.fpn`, `m = config.model; m.fpn`).
SECTION_ALIASES = {'model': {'model', 'm', 'model_config'}, 'loss': {'loss', 'lc', 'loss_config'}}


def _docstring_nodes(tree) -> set[int]:
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        ids.add(id(body[0].value))
  return ids


def _reads_own_key(node: ast.Attribute, own_keys) -> str:
  """The own key `node` reads (`<section alias>.<key>`), or ''."""
  parent = node.value
  parent_name = parent.attr if isinstance(parent, ast.Attribute) else getattr(parent, 'id', '')
  for key in own_keys:
    section, name = key.split('.')[:2]
    if node.attr == name and parent_name in SECTION_ALIASES[section]:
      return key
  return ''


def seam_violations(source: str) -> list[str]:
  """What in `source` reaches past the seam: family modules imported, a family named in code (an identifier, or a
  string that is a family's name) or a family's own config key read (`config.model.fpn`, or the key's dotted name in
  a string). Docstrings, comments and prose in strings may speak of families."""
  tree = ast.parse(source)
  docstrings = _docstring_nodes(tree)
  names = {f.lower() for f in detectors.FAMILIES}
  own_keys = [k for family in detectors.FAMILIES.values() for k in family.own_keys]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or '']
      if isinstance(node, ast.ImportFrom):
        modules += [f'{node.module}.{a.name}' for a in node.names]
      found += [f'imports {m}' for m in modules if m.startswith(FAMILY_MODULES)]
    elif isinstance(node, ast.Attribute) and _reads_own_key(node, own_keys):
      found.append(f'reads {_reads_own_key(node, own_keys)}')
    elif isinstance(node, (ast.Name, ast.Attribute)):
      identifier = node.id if isinstance(node, ast.Name) else node.attr
      found += [f'names {identifier}' for n in names if n in identifier.lower()]
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
      found += [f'says {node.value!r}' for n in names if node.value.lower() == n]
      found += [f'says {node.value!r}' for k in own_keys if re.search(rf'\b{re.escape(k)}\b', node.value)]
  return found


@pytest.mark.parametrize('path', CALLERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_callers_stay_behind_the_seam(path):
  assert not seam_violations(path.read_text()), seam_violations(path.read_text())


def test_the_check_catches_what_it_looks_for():
  """Each kind of violation is found, so a clean result above means something."""
  assert all((PACKAGE / p).is_file() for p in PURPOSE_NAMED)  # an exemption never outlives its file
  assert seam_violations('from conret_jax.model import retinanet\n')
  assert seam_violations('import conret_jax.consistent\n')
  assert seam_violations('x = config.model.fpn.max_level\n')
  assert seam_violations("if config.model.family == 'retinanet': pass\n")
  assert seam_violations('m = RetinaNetThing()\n')
  assert seam_violations("key = 'model.anchors.sizes'\n")
  assert seam_violations('m = config.model\nlevels = m.fpn.max_level\n')
  assert seam_violations('gamma = config.loss.focal_gamma\n')
  assert not seam_violations('"""RetinaNet, in a docstring."""\nx = detector.anchors(hw)  # config.model.fpn\n')


def test_every_family_declares_its_own_keys():
  from conret_jax import defaults

  config = defaults.base_config()
  for name, family in detectors.FAMILIES.items():
    assert family.own_keys, name
    for key in family.own_keys:
      node = config
      for part in key.split('.'):
        assert part in node, f'{name}: {key} is not a config key'
        node = node[part]
