"""What the side-by-side benchmarks share (bench/*_vs_torchvision.py): timing another framework's step in a child
process, so its thread pool and XLA's never share a process, and timing the columns alike.

The benchmark script runs itself again with --torch_worker and its own flags; the child calls `serve` with its step,
and the parent talks to it through `StepProcess`: one line "N" in, N steps timed, one JSON line back. The parent
times every column through `alternate` and reports each with `summary` and `table`.
"""

import importlib.util
import json
import os
import statistics
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


def repo_config(filename: str):
  """get_config() of configs/`filename` in this checkout: the config whose network a benchmark compares."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', filename)
  spec = importlib.util.spec_from_file_location(os.path.splitext(filename)[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def torch_device(jax_platform: str) -> str:
  """The torch device beside JAX's: 'cpu' on the CPU backend, else 'cuda' (the GPU JAX is on)."""
  return 'cpu' if jax_platform == 'cpu' else 'cuda'


def torch_info(device: str) -> dict:
  """The child's torch, torchvision, thread count and device, for the result's torchvision_info."""
  import torch
  import torchvision

  return {
    'torch': torch.__version__,
    'torchvision': torchvision.__version__,
    'torch_threads': torch.get_num_threads(),
    'torch_device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
    'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
  }


def alternate(runners: dict, rounds: int, steps: int) -> dict:
  """{name: (wall s, CPU s)} of `rounds` blocks of `steps` steps per column, the columns' order reversed every other
  round, so a drift of the machine's load falls on all alike. `runners` maps names to run(n) -> (wall, cpu)."""
  times = {name: ([], []) for name in runners}
  for r in range(rounds):
    for name in runners if r % 2 == 0 else list(runners)[::-1]:
      wall, cpu = runners[name](steps)
      times[name][0].extend(wall)
      times[name][1].extend(cpu)
  return times


def summary(wall: list[float], cpu: list[float], batch: int) -> dict:
  """Medians (and the wall range) of one column's steps; images/s at the median."""
  return {
    'wall_median_s': statistics.median(wall),
    'wall_min_s': min(wall),
    'wall_max_s': max(wall),
    'cpu_median_s': statistics.median(cpu),
    'images_per_s': batch / statistics.median(wall),
    'steps': len(wall),
  }


def ratios(variants: dict, pairs) -> dict:
  """'{a}_over_{b}_wall' and '_cpu': column a's median over column b's, for each (a, b) in `pairs`."""
  out = {}
  for a, b in pairs:
    for kind in ('wall', 'cpu'):
      out[f'{a}_over_{b}_{kind}'] = variants[a][f'{kind}_median_s'] / variants[b][f'{kind}_median_s']
  return out


def table(variants: dict, ratios: dict, extra: dict) -> str:
  """A Markdown row per column (`summary`'s fields, then `extra`: header -> function of the column's dict giving
  its cell), then the ratios on one line."""
  head = ['variant', 'wall median s (min-max)', 'CPU median s', 'img/s', *extra]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, v in variants.items():
    cells = [
      name,
      f'{v["wall_median_s"]:.4f} ({v["wall_min_s"]:.4f}-{v["wall_max_s"]:.4f})',
      f'{v["cpu_median_s"]:.3f}',
      f'{v["images_per_s"]:.2f}',
      *(cell(v) for cell in extra.values()),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('\n' + ', '.join(f'{k} {v:.3f}' for k, v in ratios.items()))
  return '\n'.join(lines)
