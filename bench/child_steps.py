"""Timing another framework's train step in a child process, so its thread pool and XLA's never share a process.

The benchmark script runs itself again with --torch_worker and its own flags; the child calls `serve` with its step,
and the parent talks to it through `StepProcess`: one line "N" in, N steps timed, one JSON line back.
"""

import json
import os
import subprocess
import sys
import time


def timed(step, n: int) -> tuple[list[float], list[float]]:
  """Runs step() n times. Returns (wall seconds, process CPU seconds) per call."""
  wall, cpu = [], []
  for _ in range(n):
    t, c = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return wall, cpu


def serve(step, info: dict) -> None:
  """The child's side: two warm-up steps (first steps allocate), `info` as one JSON line, then for each line N read
  from stdin N timed steps, answered as one {"wall": [...], "cpu": [...]} JSON line."""
  step()
  step()
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    wall, cpu = timed(step, int(line))
    print(json.dumps({'wall': wall, 'cpu': cpu}), flush=True)


class StepProcess:
  """The parent's side: runs `script --torch_worker *flags` under this Python; `run(n)` times n of its steps there;
  `info` is what the child said about itself."""

  def __init__(self, script: str, flags: list[str]):
    cmd = [sys.executable, os.path.abspath(script), '--torch_worker', *flags]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._reply()

  def _reply(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the torchvision worker exited (status {self.proc.wait()}); is torch installed here?')
    return json.loads(line)

  def run(self, n: int) -> tuple[list[float], list[float]]:
    self.proc.stdin.write(f'{n}\n')
    self.proc.stdin.flush()
    reply = self._reply()
    return reply['wall'], reply['cpu']

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()
