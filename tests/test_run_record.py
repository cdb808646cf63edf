"""What a run records about itself (conret_jax/run_record.py): a damaged run.json stops a start before anything is
written, the records are replaced whole, and which changes a resumed run may make without --accept_config_changes."""

import json
import os

import pytest

from conret_jax import defaults, run_record
from conret_jax.data import info as info_lib
from conret_jax.errors import ConfigError


def _layout():
  info = info_lib.DatasetInfo(category_ids=(3, 7), class_names=('circle', 'square'), num_examples=10)
  return info_lib.ClassLayout.of(info, defaults.base_config())


def _save(workdir, config, step=0, **kw):
  run_record.save(str(workdir), config, _layout(), step=step, processes=1, devices=1, argv=['t'], **kw)


def test_a_damaged_run_json_changes_nothing(tmp_path):
  config = defaults.base_config()
  _save(tmp_path, config)
  before = (tmp_path / 'config.json').read_text()
  (tmp_path / 'run.json').write_text('{"starts": [{"step": 0')  # cut short by a killed write
  changed = defaults.base_config()
  changed.eval.num_images = 50
  with pytest.raises(ConfigError, match=r'run\.json is damaged'):
    _save(tmp_path, changed, step=10)
  assert (tmp_path / 'config.json').read_text() == before


def test_records_are_replaced_whole(tmp_path):
  config = defaults.base_config()
  _save(tmp_path, config)
  _save(tmp_path, config, step=10, config_changes={'train.num_steps': [8, 10]})
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'run.json']  # no temporary file left behind
  run = json.loads((tmp_path / 'run.json').read_text())
  assert [s['step'] for s in run['starts']] == [0, 10]
  assert run['starts'][1]['config_changes'] == {'train.num_steps': [8, 10]}
  assert run['classes']['names'] == ['circle', 'square']


@pytest.mark.parametrize(
  'key,value,free',
  [
    ('model.compute_dtype', 'bfloat16', False),  # the training arithmetic changes
    ('model.matmul_precision', 'highest', False),
    ('train.learning_rate', 0.5, False),
    ('model.conv_lowering', 'xla', True),  # the summation order only
    ('consistent.inference_reg_steps', 1, True),
    ('eval.num_images', 50, True),
  ],
)
def test_which_changes_a_resumed_run_may_make(tmp_path, key, value, free):
  config = defaults.base_config()
  _save(tmp_path, config)
  changed = defaults.base_config()
  section, name = key.split('.')
  changed[section][name] = value
  if free:
    assert run_record.resume_changes(str(tmp_path), changed, step=100, accept=False) == {}
  else:
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
      run_record.resume_changes(str(tmp_path), changed, step=100, accept=False)
    old = config[section][name]
    assert run_record.resume_changes(str(tmp_path), changed, step=100, accept=True) == {key: [old, value]}
