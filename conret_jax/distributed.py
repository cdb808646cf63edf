"""Multi-process start-up: join the JAX distributed system before any other JAX call.

One training run is one process per host (TPU VM worker, GPU node) or per GPU. Each process must call
`initialize()` before it touches a device; afterwards `jax.devices()` lists every device of every process and the
sharded train step runs over all of them.

Where the process layout comes from, first match wins:
  1. arguments / absl flags: --coordinator_address, --num_processes, --process_id (and --local_device_ids);
  2. environment: CONRET_COORDINATOR, CONRET_NUM_PROCESSES, CONRET_PROCESS_ID, CONRET_LOCAL_DEVICE_IDS
     (launch/local_multiprocess.py sets them; any launcher can);
  3. a cluster that `jax.distributed.initialize()` detects by itself (jax 0.10 docs: "If you are using TPU,
     Slurm, or Open MPI, all arguments are optional"): a multi-worker Cloud TPU slice, a Slurm step with more
     than one task, an Open MPI job with more than one rank;
  4. otherwise one process: nothing to do.
Values from 1 and 2 combine per field, so on Slurm `--coordinator_address` alone overrides only the address.
"""

import dataclasses
import glob
import importlib.util
import logging
import os
import urllib.request
from collections.abc import Callable, Mapping, Sequence

ENV_COORDINATOR = 'CONRET_COORDINATOR'
ENV_NUM_PROCESSES = 'CONRET_NUM_PROCESSES'
ENV_PROCESS_ID = 'CONRET_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'CONRET_LOCAL_DEVICE_IDS'

# PCI ids of TPU chips (Google's vendor id also covers its virtual NIC, so the device id matters).
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = frozenset({'0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076'})
_METADATA_URL = 'http://{host}/computeMetadata/v1/instance/attributes/{key}'

_initialized_plan = None  # the Plan applied by initialize(); makes a second call a no-op


@dataclasses.dataclass(frozen=True)
class Plan:
  """What initialize() will do.

  mode: 'single' (no distributed system), 'explicit' (all of address/count/id known), or 'auto:<cluster>'
    (jax.distributed.initialize detects what `kwargs` leaves out).
  kwargs: keyword arguments for jax.distributed.initialize (empty for 'single').
  """

  mode: str
  kwargs: dict


def _int_or_none(value, name: str, unset: int):
  if value is None or value == '' or value == unset:
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f'{name} must be an integer, got {value!r}') from e


def _device_ids_or_none(value):
  if value is None or value == '' or value == []:
    return None
  if isinstance(value, str):
    value = [v for v in value.split(',') if v.strip()]
  return [int(v) for v in value]


def _env_int(environ: Mapping[str, str], key: str) -> int:
  try:
    return int(environ.get(key, '0'))
  except ValueError:
    return 0


def _tpu_chip_count(pci_devices: str = '/sys/bus/pci/devices') -> int:
  """TPU chips attached to this VM, read from PCI ids in sysfs (no JAX backend start)."""
  count = 0
  for vendor_path in glob.glob(os.path.join(pci_devices, '*', 'vendor')):
    try:
      with open(vendor_path) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor_path), 'device')) as f:
        count += f.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return count


def _tpu_metadata(key: str, environ: Mapping[str, str], timeout_s: float = 2.0) -> str:
  """One attribute of this TPU VM from the GCE metadata server, or '' when unreachable."""
  host = environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(_METADATA_URL.format(host=host, key=key), headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      return response.read().decode().strip()
  except OSError:
    return ''


def tpu_pod_workers(environ: Mapping[str, str] | None = None) -> int:
  """How many processes a TPU run here spans: workers of the slice (>1 for a pod slice, also any multislice run);
  0 when this is not a TPU VM. Single-host TPU VMs (e.g. v5litepod-8) give 1 and need no distributed system."""
  environ = os.environ if environ is None else environ
  if _env_int(environ, 'MEGASCALE_NUM_SLICES') > 1:
    return _env_int(environ, 'MEGASCALE_NUM_SLICES')  # a lower bound on the workers; only >1 matters
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES')  # GKE sets these
  if hosts:
    return len([h for h in hosts.split(',') if h.strip()])
  # Only ask the metadata server on a real TPU VM: elsewhere the lookup would just time out.
  if 'TPU_SKIP_MDS_QUERY' in environ or _tpu_chip_count() == 0:
    return 0
  endpoints = _tpu_metadata('worker-network-endpoints', environ)
  return len([e for e in endpoints.split(',') if e.strip()]) or 1


def detect_cluster(
  environ: Mapping[str, str] | None = None, tpu_workers: Callable[[Mapping[str, str]], int] = tpu_pod_workers
) -> str:
  """Name of the multi-process cluster JAX can configure itself for: 'tpu', 'slurm', 'ompi', 'mpi4py' or ''."""
  environ = os.environ if environ is None else environ
  if 'SLURM_JOB_ID' in environ and _env_int(environ, 'SLURM_NTASKS') > 1:
    # JAX reads the step's variables, which exist only inside `srun`; in a bare sbatch/salloc shell, run alone.
    if all(k in environ for k in ('SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')):
      return 'slurm'
    logging.warning(
      'Slurm job with SLURM_NTASKS=%s but not inside `srun`: running as a single process. '
      'Launch with `srun conret-train ...` for one process per task.',
      environ['SLURM_NTASKS'],
    )
  if _env_int(environ, 'OMPI_COMM_WORLD_SIZE') > 1:
    if 'OMPI_MCA_orte_hnp_uri' in environ:  # what JAX's Open MPI detection reads (Open MPI 4)
      return 'ompi'
    if importlib.util.find_spec('mpi4py') is not None:  # Open MPI 5 (PMIx): JAX can ask MPI itself
      return 'mpi4py'
    raise RuntimeError(
      'Open MPI job without OMPI_MCA_orte_hnp_uri (Open MPI 5?): pip install mpi4py, or pass '
      '--coordinator_address/--num_processes/--process_id.'
    )
  if tpu_workers(environ) > 1:
    return 'tpu'
  return ''


def resolve(
  coordinator_address: str = '',
  num_processes: int = 0,
  process_id: int = -1,
  local_device_ids: Sequence[int] | str | None = None,
  *,
  environ: Mapping[str, str] | None = None,
  tpu_workers: Callable[[Mapping[str, str]], int] = tpu_pod_workers,
) -> Plan:
  """Decides how to join the distributed system, without touching JAX. Unset: '', 0, -1, None."""
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV_COORDINATOR, '') or None
  count = _int_or_none(num_processes, 'num_processes', 0)
  if count is None:
    count = _int_or_none(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES, 0)
  index = _int_or_none(process_id, 'process_id', -1)
  if index is None:
    index = _int_or_none(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID, -1)
  device_ids = _device_ids_or_none(local_device_ids)
  if device_ids is None:
    device_ids = _device_ids_or_none(environ.get(ENV_LOCAL_DEVICE_IDS))

  kwargs = {
    k: v
    for k, v in (
      ('coordinator_address', address),
      ('num_processes', count),
      ('process_id', index),
      ('local_device_ids', device_ids),
    )
    if v is not None
  }
  if count is not None and count < 1:
    raise ValueError(f'num_processes must be >= 1, got {count}')
  if count is not None and index is not None and not 0 <= index < count:
    raise ValueError(f'process_id must be in [0, {count}), got {index}')
  if count == 1:
    return Plan('single', {})
  if address is not None and count is not None and index is not None:
    return Plan('explicit', kwargs)
  cluster = detect_cluster(environ, tpu_workers)
  if cluster == 'mpi4py':  # opt-in in JAX: the only detection that is not automatic
    kwargs['cluster_detection_method'] = 'mpi4py'
  if cluster:
    return Plan(f'auto:{cluster}', kwargs)
  if address is not None or count is not None or index is not None:
    missing = [
      n for n, v in (('coordinator_address', address), ('num_processes', count), ('process_id', index)) if v is None
    ]
    raise ValueError(
      f'Multi-process run needs {", ".join(missing)} as well (flags --{missing[0]}=... or env '
      f'{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); no Slurm/Open MPI/TPU pod found.'
    )
  return Plan('single', {})


def _cpu_only(environ: Mapping[str, str]) -> bool:
  """True when JAX will run on CPU only (decided without starting a backend)."""
  import jax

  platforms = environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or ''
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  has_gpu = os.path.exists('/dev/nvidia0') or os.path.exists('/dev/nvidiactl') or os.path.exists('/dev/kfd')
  return not has_gpu and _tpu_chip_count() == 0


def initialize(
  coordinator_address: str = '',
  num_processes: int = 0,
  process_id: int = -1,
  local_device_ids: Sequence[int] | str | None = None,
) -> Plan:
  """Joins the JAX distributed system if this is a multi-process run; call it before any other JAX call.

  Args: as `resolve` (explicit values win over CONRET_* env vars, which win over cluster auto-detection).
  Returns the Plan that was applied. A second call returns the first Plan and does nothing.
  """
  global _initialized_plan
  if _initialized_plan is not None:
    return _initialized_plan
  plan = resolve(coordinator_address, num_processes, process_id, local_device_ids)
  if plan.mode != 'single':
    import jax

    if _cpu_only(os.environ):
      # CPU devices of different processes can only run collectives through gloo.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if not jax.distributed.is_initialized():
      logging.info('jax.distributed.initialize(%s) [%s]', plan.kwargs, plan.mode)
      jax.distributed.initialize(**plan.kwargs)
  _initialized_plan = plan
  return plan


def is_main_process() -> bool:
  """True on the process that writes logs, summaries and (non-collective) files: process 0."""
  import jax

  return jax.process_index() == 0


def process_info() -> str:
  """One log line about this process, e.g. 'process 1/2 on host1: 2 local / 4 global cpu devices'."""
  import socket

  import jax

  return (
    f'process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: '
    f'{jax.local_device_count()} local / {jax.device_count()} global {jax.default_backend()} devices'
  )


def define_flags(flag_values=None) -> None:
  """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids (once per FlagValues).

  flag_values: absl FlagValues to define them in (default: absl.flags.FLAGS).
  """
  from absl import flags

  fv = flags.FLAGS if flag_values is None else flag_values
  if 'coordinator_address' in fv:
    return
  flags.DEFINE_string(
    'coordinator_address',
    '',
    'host:port of process 0 for a multi-process run '
    f'(default: ${ENV_COORDINATOR}, else Slurm/Open MPI/TPU pod auto-detection).',
    flag_values=fv,
  )
  flags.DEFINE_integer(
    'num_processes', 0, f'Processes in the run (0: ${ENV_NUM_PROCESSES} or auto-detect).', flag_values=fv
  )
  flags.DEFINE_integer(
    'process_id', -1, f'This process, 0..num_processes-1 (-1: ${ENV_PROCESS_ID} or auto).', flag_values=fv
  )
  flags.DEFINE_list(
    'local_device_ids',
    None,
    'Local device ids this process uses (default: JAX decides; under '
    'Slurm/Open MPI on GPUs that is one GPU per process, so set it for one process per node).',
    flag_values=fv,
  )


def initialize_from_flags(flag_values=None) -> Plan:
  """initialize() with the values of the flags defined by define_flags() (absl must have parsed argv)."""
  from absl import flags

  fv = flags.FLAGS if flag_values is None else flag_values
  return initialize(fv.coordinator_address, fv.num_processes, fv.process_id, fv.local_device_ids)
