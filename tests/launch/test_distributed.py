"""conret_jax.distributed: how the process layout is resolved, cluster detection, flags, idempotent start-up."""

import http.server
import threading

import pytest

from conret_jax import distributed


@pytest.fixture(autouse=True)
def _no_tpu_chips(monkeypatch):
  """Tests describe their TPU (or none) themselves, whatever machine runs them."""
  monkeypatch.setattr(distributed, '_tpu_chip_count', lambda: 0)


NO_TPU = lambda environ: 0  # noqa: E731  (a tpu_workers probe for a machine without TPUs)

SLURM_STEP = {
  'SLURM_JOB_ID': '77',
  'SLURM_NTASKS': '8',
  'SLURM_STEP_NODELIST': 'gpu[01-02]',
  'SLURM_PROCID': '3',
  'SLURM_LOCALID': '3',
}


def test_explicit_arguments_win_over_env_and_cluster():
  env = {'CONRET_COORDINATOR': 'envhost:1', 'CONRET_NUM_PROCESSES': '4', 'CONRET_PROCESS_ID': '2', **SLURM_STEP}
  plan = distributed.resolve('10.0.0.1:1234', 2, 1, environ=env, tpu_workers=NO_TPU)
  assert plan == distributed.Plan(
    'explicit', {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
  )


def test_env_vars_used_when_arguments_unset():
  env = {
    'CONRET_COORDINATOR': '127.0.0.1:5555',
    'CONRET_NUM_PROCESSES': '4',
    'CONRET_PROCESS_ID': '3',
    'CONRET_LOCAL_DEVICE_IDS': '0,1',
  }
  plan = distributed.resolve(environ=env, tpu_workers=NO_TPU)
  assert plan.mode == 'explicit'
  assert plan.kwargs == {
    'coordinator_address': '127.0.0.1:5555',
    'num_processes': 4,
    'process_id': 3,
    'local_device_ids': [0, 1],
  }


def test_arguments_and_env_combine_per_field():
  env = {'CONRET_COORDINATOR': 'h:1', 'CONRET_NUM_PROCESSES': '4', 'CONRET_PROCESS_ID': '0'}
  plan = distributed.resolve(process_id=2, environ=env, tpu_workers=NO_TPU)
  assert plan.kwargs == {'coordinator_address': 'h:1', 'num_processes': 4, 'process_id': 2}


@pytest.mark.parametrize(
  'env, cluster',
  [
    (SLURM_STEP, 'slurm'),
    ({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '1', 'OMPI_MCA_orte_hnp_uri': '1;tcp://h:1'}, 'ompi'),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'),
    ({'MEGASCALE_NUM_SLICES': '2'}, 'tpu'),
  ],
)
def test_clusters_are_left_to_jax_autodetection(env, cluster):
  plan = distributed.resolve(environ=env, tpu_workers=distributed.tpu_pod_workers)
  assert plan == distributed.Plan(f'auto:{cluster}', {})


@pytest.mark.parametrize(
  'env',
  [
    {},
    {
      'SLURM_JOB_ID': '5',
      'SLURM_NTASKS': '1',
      'SLURM_PROCID': '0',
      'SLURM_LOCALID': '0',
      'SLURM_STEP_NODELIST': 'n1',
    },  # a one-task Slurm job
    {'SLURM_JOB_ID': '5', 'SLURM_NTASKS': '4'},  # the sbatch shell itself, outside srun
    {'OMPI_COMM_WORLD_SIZE': '1'},
    {'TPU_WORKER_HOSTNAMES': 'localhost'},  # a single-host TPU VM
    {'CONRET_NUM_PROCESSES': '1'},
  ],
)
def test_single_process_needs_no_distributed_system(env):
  assert distributed.resolve(environ=env, tpu_workers=distributed.tpu_pod_workers).mode == 'single'


def test_open_mpi_5_uses_mpi4py_or_explains(monkeypatch):
  env = {'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '1'}  # no orte URI: Open MPI 5
  has_mpi4py = {'value': True}
  monkeypatch.setattr(
    distributed.importlib.util, 'find_spec', lambda name: object() if name == 'mpi4py' and has_mpi4py['value'] else None
  )
  assert distributed.resolve(environ=env, tpu_workers=NO_TPU) == distributed.Plan(
    'auto:mpi4py', {'cluster_detection_method': 'mpi4py'}
  )
  has_mpi4py['value'] = False
  with pytest.raises(RuntimeError, match='pip install mpi4py'):
    distributed.resolve(environ=env, tpu_workers=NO_TPU)


def test_partial_layout_on_a_cluster_passes_the_given_fields_only():
  plan = distributed.resolve(coordinator_address='gpu01:9999', environ=SLURM_STEP, tpu_workers=NO_TPU)
  assert plan == distributed.Plan('auto:slurm', {'coordinator_address': 'gpu01:9999'})


def test_partial_layout_without_cluster_is_an_error_naming_what_is_missing():
  with pytest.raises(ValueError, match='num_processes, process_id'):
    distributed.resolve(coordinator_address='h:1', environ={}, tpu_workers=NO_TPU)
  with pytest.raises(ValueError, match='process_id must be in'):
    distributed.resolve('h:1', 2, 2, environ={}, tpu_workers=NO_TPU)
  with pytest.raises(ValueError, match='CONRET_NUM_PROCESSES must be an integer'):
    distributed.resolve(environ={'CONRET_NUM_PROCESSES': 'two'}, tpu_workers=NO_TPU)


def _write_pci(root, name, vendor, device):
  d = root / name
  d.mkdir()
  (d / 'vendor').write_text(vendor + '\n')
  (d / 'device').write_text(device + '\n')


def test_tpu_chips_are_counted_by_pci_device_id(tmp_path, monkeypatch):
  monkeypatch.undo()  # the real sysfs reader, on a fake sysfs
  _write_pci(tmp_path, '0000:00:04.0', '0x1ae0', '0x0042')  # Google's virtual NIC: same vendor, not a TPU
  _write_pci(tmp_path, '0000:00:05.0', '0x1ae0', '0x0062')  # TPU v5p chips
  _write_pci(tmp_path, '0000:00:06.0', '0x1ae0', '0x0062')
  _write_pci(tmp_path, '0000:00:07.0', '0x10de', '0x2330')  # an NVIDIA GPU
  assert distributed._tpu_chip_count(str(tmp_path)) == 2
  assert distributed._tpu_chip_count(str(tmp_path / 'missing')) == 0


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A stand-in for the GCE metadata server of a 4-worker TPU slice."""

  def do_GET(self):  # noqa: N802
    ok = (
      self.headers.get('Metadata-Flavor') == 'Google'
      and self.path == '/computeMetadata/v1/instance/attributes/worker-network-endpoints'
    )
    body = b'w0:0:10.0.0.2,w1:1:10.0.0.3,w2:2:10.0.0.4,w3:3:10.0.0.5' if ok else b''
    self.send_response(200 if ok else 404)
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


def test_tpu_pod_workers_from_the_metadata_server(monkeypatch):
  server = http.server.HTTPServer(('127.0.0.1', 0), _Metadata)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    env = {'GCE_METADATA_IP': f'127.0.0.1:{server.server_port}'}
    monkeypatch.setattr(distributed, '_tpu_chip_count', lambda: 4)
    assert distributed.tpu_pod_workers(env) == 4
    assert distributed.detect_cluster(env) == 'tpu'
    monkeypatch.setattr(distributed, '_tpu_chip_count', lambda: 0)  # not a TPU VM: the server is not asked
    assert distributed.tpu_pod_workers(env) == 0
  finally:
    server.shutdown()
    server.server_close()


def test_initialize_single_process_is_a_noop_and_idempotent(monkeypatch):
  for key in (
    'CONRET_COORDINATOR',
    'CONRET_NUM_PROCESSES',
    'CONRET_PROCESS_ID',
    'SLURM_JOB_ID',
    'OMPI_COMM_WORLD_SIZE',
    'TPU_WORKER_HOSTNAMES',
    'TPU_PROCESS_ADDRESSES',
    'MEGASCALE_NUM_SLICES',
  ):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setattr(distributed, '_initialized_plan', None)
  first = distributed.initialize()
  assert first.mode == 'single'
  # A second call must not resolve again, even with a multi-process environment now visible.
  monkeypatch.setenv('CONRET_NUM_PROCESSES', '2')
  assert distributed.initialize() is first
  assert distributed.is_main_process()
  assert distributed.process_info().startswith('process 0/1 on ')


def test_define_flags_twice_and_initialize_from_flags(monkeypatch):
  from absl import flags

  fv = flags.FlagValues()
  distributed.define_flags(fv)
  distributed.define_flags(fv)  # a second definition would raise DuplicateFlagError without the guard
  fv(['prog', '--coordinator_address=h:1', '--num_processes=4', '--process_id=3', '--local_device_ids=0,1'])
  captured = {}
  monkeypatch.setattr(distributed, 'initialize', lambda *a: captured.setdefault('args', a))
  distributed.initialize_from_flags(fv)
  assert captured['args'] == ('h:1', 4, 3, ['0', '1'])
  assert distributed.resolve(*captured['args'], environ={}).kwargs['local_device_ids'] == [0, 1]
