"""Two real JAX processes (gloo on CPU): their global train/eval batches equal the single-host pipeline's.

The simulated-host tests in test_pipeline.py cover the same layout in one process; this checks it end to end with
jax.make_array_from_process_local_data across real processes.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conret_jax.data import pipeline
from tests.data.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_processes_match_one(rect_dataset, tmp_path):
  annotation_file, image_dir, _ = rect_dataset
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'tests.data.multiprocess_worker',
        str(port),
        str(i),
        annotation_file,
        image_dir,
        str(tmp_path / f'out{i}.json'),
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  for p in procs:
    output = p.communicate(timeout=120)[0]
    assert p.returncode == 0, output.decode()[-3000:]
  results = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]
  assert results[0] == results[1]

  config = small_config(annotation_file, image_dir, batch=4, eval_batch=4)
  config.data.scale_jitter = (0.8, 1.2)
  it = pipeline.host_batches(config, start_step=1)
  for step in range(2):
    want = next(it)
    for k in ('image_id', 'boxes', 'scale'):
      np.testing.assert_allclose(results[0][f'train{step}'][k], want[k], err_msg=k)
  assert results[0]['eval_ids'] == [b['image_id'].tolist() for b in pipeline.host_batches(config, train=False)]
  assert results[0]['state']['step'] == 3
