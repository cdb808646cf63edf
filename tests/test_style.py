"""The tree is formatted and linted by ruff (pyproject.toml: 120 columns, 2-space indent, import order): CI fails on
any violation. `ruff format . && ruff check --fix .` repairs most of them."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('args', [('check', '.'), ('format', '--check', '.')], ids=['lint', 'format'])
def test_ruff(args):
  ruff = shutil.which('ruff', path=os.path.dirname(sys.executable)) or shutil.which('ruff')
  assert ruff, 'ruff is missing: pip install -e .[dev]'
  proc = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
