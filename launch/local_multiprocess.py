#!/usr/bin/env python3
"""Runs N copies of a command on this machine as one multi-process JAX job on fake CPU devices.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      conret-train --config=configs/shapes_demo.py --workdir=/tmp/run

Each copy gets JAX_PLATFORMS=cpu, XLA_FLAGS with --xla_force_host_platform_device_count=D, and
CONRET_COORDINATOR / CONRET_NUM_PROCESSES / CONRET_PROCESS_ID, which conret_jax.distributed.initialize() reads.
This exercises the multi-host code paths (process-local batches, global arrays, checkpoints written by every
process) without a pod. Output lines are prefixed "[p<i>] ". If one copy fails, the others are stopped (SIGTERM,
then SIGKILL after --grace_period) and the launcher exits with the failing code. SIGINT/SIGTERM are forwarded.
Standard library only, so it runs before the project is installed.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def free_port() -> int:
  """A TCP port that was free a moment ago (the OS picks it when binding port 0)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(base: dict, process_id: int, num_processes: int, devices_per_process: int, coordinator: str) -> dict:
  """The environment of process `process_id`: base plus the CPU-device and coordinator settings."""
  env = dict(base)
  xla_flags = _DEVICE_COUNT_FLAG.sub('', env.get('XLA_FLAGS', '')).split()
  xla_flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env['XLA_FLAGS'] = ' '.join(xla_flags)
  env['JAX_PLATFORMS'] = 'cpu'
  env['CONRET_COORDINATOR'] = coordinator
  env['CONRET_NUM_PROCESSES'] = str(num_processes)
  env['CONRET_PROCESS_ID'] = str(process_id)
  env['PYTHONUNBUFFERED'] = '1'  # so the prefixed lines arrive as they are printed
  # JAX's persistent compilation cache is written by process 0 only and, on CPU, keyed per process: with a warm
  # cache process 0 loads a program that process 1 still compiles, and gloo gives up on the first collective after
  # 30 s. Every process compiles for itself instead.
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  return env


def _pump(index: int, stream, lock: threading.Lock) -> None:
  """Copies a child's output to our stdout, line by line, with its prefix."""
  prefix = f'[p{index}] '.encode()
  out = sys.stdout.buffer
  for line in iter(stream.readline, b''):
    with lock:
      out.write(prefix + line if line.endswith(b'\n') else prefix + line + b'\n')
      out.flush()
  stream.close()


class Launcher:
  """Starts the processes, watches them, and stops them together."""

  def __init__(self, command, num_processes, devices_per_process, grace_period):
    self.command = command
    self.num_processes = num_processes
    self.devices_per_process = devices_per_process
    self.grace_period = grace_period
    self.procs = []
    self.threads = []
    self.lock = threading.Lock()
    self.stop_signal = None  # the signal we were asked to stop with, if any

  def log(self, message: str) -> None:
    with self.lock:
      sys.stdout.flush()
      print(f'[launcher] {message}', file=sys.stderr, flush=True)

  def start(self) -> None:
    coordinator = f'127.0.0.1:{free_port()}'
    self.log(f'{self.num_processes} processes x {self.devices_per_process} CPU devices, coordinator {coordinator}')
    for i in range(self.num_processes):
      env = child_env(os.environ, i, self.num_processes, self.devices_per_process, coordinator)
      # Own process group per child, so a stop reaches whatever the command spawned (e.g. `bash -c ...`).
      proc = subprocess.Popen(
        self.command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
      )
      thread = threading.Thread(target=_pump, args=(i, proc.stdout, self.lock), daemon=True)
      thread.start()
      self.procs.append(proc)
      self.threads.append(thread)

  def signal_all(self, signum) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signum)
        except ProcessLookupError:
          pass

  def stop_all(self, signum=signal.SIGTERM) -> None:
    """Sends `signum` to the running processes, then SIGKILL to those still alive after the grace period."""
    self.signal_all(signum)
    deadline = time.monotonic() + self.grace_period
    while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(0.05)
    if any(p.poll() is None for p in self.procs):
      self.log(f'still running after {self.grace_period:g}s: SIGKILL')
      self.signal_all(signal.SIGKILL)
    for proc in self.procs:
      proc.wait()

  def _on_signal(self, signum, frame) -> None:
    self.stop_signal = signum

  def run(self) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, self._on_signal)
    self.start()
    failed = None  # (index, returncode) of the first process that failed
    while True:
      if self.stop_signal is not None:
        self.log(f'got {signal.Signals(self.stop_signal).name}: forwarding to all processes')
        self.stop_all(self.stop_signal)
        break
      codes = [p.poll() for p in self.procs]
      failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed is not None:
        self.log(f'p{failed[0]} exited with {failed[1]}: stopping the others')
        self.stop_all(signal.SIGTERM)
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.05)
    for thread in self.threads:
      thread.join(timeout=5)
    if self.stop_signal is not None:
      return 128 + self.stop_signal
    if failed is not None:
      code = failed[1]
      return code if code > 0 else 128 - code  # killed by signal -s: shell convention 128+s
    return 0


def parse_args(argv):
  parser = argparse.ArgumentParser(
    usage='%(prog)s [--num_processes=N] [--devices_per_process=D] [--grace_period=S] -- COMMAND [ARGS...]',
    description=__doc__.split('\n', 1)[0],
  )
  parser.add_argument('--num_processes', type=int, default=2, help='processes to start')
  parser.add_argument('--devices_per_process', type=int, default=2, help='fake CPU devices in each process')
  parser.add_argument(
    '--grace_period', type=float, default=10.0, help='seconds between SIGTERM and SIGKILL when stopping the processes'
  )
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1 :]
  if not args.command:
    parser.error('no COMMAND after --')
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return Launcher(args.command, args.num_processes, args.devices_per_process, args.grace_period).run()


if __name__ == '__main__':
  sys.exit(main())
